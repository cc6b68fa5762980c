"""Stage discovery and pairing for LONDON distillation.

Models are never rewritten (torchdistill style): the stages found here are
tapped by module path with forward hooks (``lcdistill.models.taps``).

* timm models expose ``model.feature_info`` (a list of dicts with ``module``,
  ``num_chs`` and ``reduction``); the last entry per reduction is a stage,
  kept if a probe forward shows its module outputs a square 4D NCHW map with
  ``num_chs`` channels (a ViT's token outputs are dropped, so a ViT has none).
* Any other ``nn.Module`` (torchvision, hand-written) is probed: no-grad
  eval-mode forward passes at ``probe_size`` and ``probe_size - 64`` with a
  hook on every named module.  A module's stride is ``64 / (H1 - H2)`` (exact
  for every stride <= 64, padded or not; fixed-size outputs such as VGG's
  ``AdaptiveAvgPool2d((7, 7))`` and channels-last maps are rejected).  For
  each stride (a power of two, 2..64) the LAST module in hook-firing order
  with that stride is the stage.  Forward hooks fire when a module finishes,
  so a container fires after its children (torchvision resnet ->
  layer1..layer4).  Special case: a module inside a stride-changing block
  that still runs at the block's input stride (the 1x1 expansion conv of a
  downsampling inverted residual, the conv of a DenseNet transition) is
  skipped, because it starts the next stage rather than ending this one.

Every returned stage is a module whose (first tensor) output is a 4D NCHW
map ``(N, channels, ~H/stride, ~W/stride)``.
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from lcdistill.models import registry
from lcdistill.models.probe import ProbeResult, Stage, _input_channels, _param_device_dtype, check_size, named_modules, probe_forward, probe_modules, probe_twice, unique_shapes
from lcdistill.models.taps import first_tensor, unwrap


def _feature_info_dicts(model: nn.Module) -> Optional[List[dict]]:
    fi = getattr(model, "feature_info", None)
    if fi is None:
        return None
    if hasattr(fi, "get_dicts"):  # timm FeatureInfo object (features_only wrappers)
        try:
            fi = fi.get_dicts()
        except Exception:
            return None
    if not isinstance(fi, (list, tuple)) or not fi:
        return None
    out = []
    for d in fi:
        if not isinstance(d, dict) or not {"module", "num_chs", "reduction"} <= set(d):
            return None
        out.append(d)
    return out


def find_stages(model: nn.Module, probe_size: int = 224) -> List[Stage]:
    """Discover one stage per stride, sorted by stride ascending.

    timm models (``model.feature_info``): the last feature_info entry per
    reduction, kept if a probe forward confirms its module outputs a square 4D
    NCHW map with that stride and ``num_chs`` channels (channels-last or token
    outputs are dropped, so a ViT yields no stages).  If the probe forward
    itself fails, feature_info is trusted as-is (with a warning).

    Other models: probe forwards at ``probe_size`` and ``probe_size - 64`` with
    a hook on every named module; per stride (power of two, 2..64) take the
    last module in hook-firing order whose output has that stride, skipping
    modules inside a stride-changing block that still run at the block's input
    stride (the expansion conv of a downsampling inverted residual, the conv of
    a DenseNet transition): those start the next stage.

    The model's weights, buffers and per-module training flags are unchanged,
    and no hooks are left behind.  Names are relative to the unwrapped model
    (``torch.compile``'s ``_orig_mod``).
    """
    check_size(probe_size)
    model = unwrap(model)
    declared = registry.stages(model, probe_size)  # a family that knows its stages better than a probe (encoders, by depth)
    if declared is not None:
        return declared
    modules = dict(model.named_modules())
    info = _feature_info_dicts(model)
    if info is not None:
        by_red: Dict[int, List[dict]] = {}
        for d in info:
            if d["module"] in modules and d["module"] != "":
                by_red.setdefault(int(d["reduction"]), []).append(d)
        if by_red:
            names = [d["module"] for ds in by_red.values() for d in ds]
            try:
                outs = unique_shapes(probe_forward(model, probe_size, names), 2)
            except Exception as exc:  # odd input constraints: trust feature_info
                warnings.warn(
                    f"stage discovery: probe forward at {probe_size}x{probe_size} failed "
                    f"({exc!r}); using timm feature_info without verification"
                )
                return [
                    Stage(ds[-1]["module"], int(ds[-1]["num_chs"]), r)
                    for r, ds in sorted(by_red.items())
                    if r >= 2
                ]
            stages = []
            for red, ds in sorted(by_red.items()):
                # Last entry per reduction whose output is a square NCHW map with the
                # advertised channels.  feature_info is authoritative for the stride
                # (unpadded convs, e.g. inception_v3, make probe/H inexact).
                for d in reversed(ds):
                    shape = outs.get(d["module"])
                    if (
                        red >= 2
                        and shape is not None
                        and len(shape) == 4
                        and shape[1] == int(d["num_chs"])
                        and shape[2] == shape[3] >= 2
                    ):
                        stages.append(Stage(d["module"], int(d["num_chs"]), red))
                        break
            return stages
        # feature_info names do not match this module tree: fall back to probing

    try:
        fired, fired2, size2 = probe_twice(model, probe_size)
    except Exception as exc:
        raise RuntimeError(
            f"stage discovery: probe forward pass on a {probe_size}x{probe_size} input "
            f"failed: {exc}. Try another probe size."
        ) from exc
    probe = ProbeResult(fired, probe_size, fired2, size2)
    table = probe.stages
    interior = probe.transition_interior()
    last: Dict[int, str] = {}  # per stride, last module in firing order
    last_boundary: Dict[int, str] = {}  # same, skipping transition interiors
    for name, _in_shape, _out_shape in fired:  # later entries overwrite earlier ones
        st = table.get(name)
        if st is None:
            continue
        last[st.stride] = name
        if name not in interior:
            last_boundary[st.stride] = name
    return [table[last_boundary.get(s, n)] for s, n in sorted(last.items())]


def describe_stages(stages: Sequence[Stage]) -> str:
    if not stages:
        return "(none with a 4D feature map)"
    return ", ".join(f"{s.name} (stride {s.stride}, {s.channels} ch)" for s in stages)


def _no_common_error(student_stages, teacher_stages, found) -> ValueError:
    return ValueError(
        "the student/teacher model pair has no stride-separated stages in common: "
        f"LONDON needs at least two consecutive stage pairs, found {len(found)}. "
        f"Student stages: {describe_stages(student_stages)}. "
        f"Teacher stages: {describe_stages(teacher_stages)}. "
        "Use --method kd (logit distillation) for this pair, or name the stages explicitly."
    )


def pair_stages(
    student_stages: Sequence[Stage],
    teacher_stages: Sequence[Stage],
    min_stride: int = 4,
    pairs: Optional[Sequence[Sequence[str]]] = None,
    *,
    student: Optional[nn.Module] = None,
    teacher: Optional[nn.Module] = None,
    probe_size: int = 224,
) -> List[Tuple[Stage, Stage]]:
    """Pair student and teacher stages.

    Default: by equal stride, over strides present in both with stride >= min_stride,
    shallow to deep.

    Explicit ``pairs`` (``[[student_module, teacher_module], ...]``) are used as
    given, in the given order (min_stride does not apply).  A name must be one of
    the discovered stages, or -- when ``student`` / ``teacher`` models are passed --
    any module path of that model whose output is a 4D feature map (its channels
    and stride are probed).  Otherwise ValueError naming the valid stage names.

    Fewer than two pairs -> ValueError (no stride-separated stages in common).
    """
    if pairs is None:
        s_by = {s.stride: s for s in student_stages}
        t_by = {t.stride: t for t in teacher_stages}
        common = sorted(k for k in set(s_by) & set(t_by) if k >= min_stride)
        result = [(s_by[k], t_by[k]) for k in common]
    else:
        result = []
        for item in pairs:
            if isinstance(item, str) or len(item) != 2 or not all(isinstance(n, str) for n in item):
                raise ValueError(
                    f"each stage pair must be [student_module, teacher_module], got {item!r}"
                )
            s_name, t_name = item
            result.append(
                (
                    _resolve(s_name, student_stages, student, "student", probe_size),
                    _resolve(t_name, teacher_stages, teacher, "teacher", probe_size),
                )
            )
    if len(result) < 2:
        raise _no_common_error(student_stages, teacher_stages, result)
    return result


def _resolve(name, stages, model, role, probe_size) -> Stage:
    for st in stages:
        if st.name == name:
            return st
    valid = ", ".join(st.name for st in stages) or "(none found)"
    if model is not None:
        base = unwrap(model)
        if name and name in dict(base.named_modules()):
            try:
                return probe_modules(base, [name], probe_size)[0]
            except ValueError as exc:
                raise ValueError(f"{role} {exc}; valid {role} stage names: {valid}") from None
        raise ValueError(
            f"{role} model has no module named {name!r}; valid {role} stage names: {valid} "
            f"(any module path of the {role} model that outputs a 4D feature map also works)"
        )
    raise ValueError(f"{role} stage {name!r} not found; valid {role} stage names: {valid}")


def describe_pairs(pairs: Sequence[Tuple[Stage, Stage]]) -> List[str]:
    """Lines like ``stride 8: student blocks.2 (16 ch) <-> teacher layer2 (128 ch)``."""
    lines = []
    for s, t in pairs:
        head = f"stride {s.stride}" if s.stride == t.stride else f"stride {s.stride}/{t.stride}"
        lines.append(
            f"{head}: student {s.name} ({s.channels} ch) <-> teacher {t.name} ({t.channels} ch)"
        )
    return lines


# ---- pre-activation points (OFD distils features before the stage's last ReLU) -------------
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU,
                nn.Mish, nn.Hardswish, nn.Hardtanh, nn.Softplus)
_SKIP_BRANCHES = ("downsample", "shortcut", "skip")
_PASS_THROUGH = (nn.Identity, nn.Dropout)  # the identity branch's BN is not the one before the activation


def _is_activation(module: nn.Module) -> bool:
    return isinstance(module, _ACTIVATIONS) or type(module).__module__.startswith("timm.layers.activations")


def pre_activation(model: nn.Module, names: Sequence[str], probe_size: int = 224) -> List[Tuple[str, Optional[str]]]:
    """Where to read each stage's map before its final activation, without rewriting the model.

    Per stage module path: ``(tap, bn)``. ``tap`` is ``"<activation path>:in"`` (the input of the
    activation module whose output the stage returns, read by ``FeatureTap`` with a forward
    pre-hook) when the stage ends in an activation (a ResNet block's last ReLU, a BN+act), or the
    stage path itself when its output is already pre-activation (MobileNetV2's linear bottleneck).
    ``bn`` is the BatchNorm feeding that point: an ancestor BN of the activation (timm's
    BatchNormAct2d), else the last BN that ran in the stage before it (outside downsample/shortcut
    branches when there is one), None when the stage has no BatchNorm. One no-grad eval probe.
    """
    check_size(probe_size)
    model = unwrap(model)
    modules = named_modules(model, names)
    fired: List[Tuple[str, nn.Module, object]] = []
    outputs: Dict[str, object] = {}

    def hook_for(name):
        def hook(module, _inp, out):
            fired.append((name, module, first_tensor(out)))
            if name in names:
                outputs[name] = first_tensor(out)
        return hook

    wanted = lambda n: any(n == s or n.startswith(s + ".") for s in names)  # noqa: E731
    modes = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_hook(hook_for(n)) for n, m in modules.items() if n and wanted(n)]
    try:
        device, dtype = _param_device_dtype(model)
        x = torch.randn(1, _input_channels(model), probe_size, probe_size, generator=torch.Generator().manual_seed(0))
        model.eval()
        with torch.no_grad():
            model(x.to(device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode

    def same(a, b) -> bool:
        return a is b or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.data_ptr() == b.data_ptr()
                          and a.shape == b.shape and a.stride() == b.stride())

    result = []
    for stage in names:
        out = outputs.get(stage)
        inside = [(i, n, m, o) for i, (n, m, o) in enumerate(fired) if n == stage or n.startswith(stage + ".")]
        leaves = [r for r in inside if not any(True for _ in r[2].children())]
        while len(leaves) > 1 and isinstance(leaves[-1][2], _PASS_THROUGH) and same(leaves[-1][3], out):
            leaves.pop()  # an Identity (aa, drop_path) after the activation hands on the same tensor
        last = leaves[-1] if leaves else None
        tap, before = stage, len(fired)
        if last is not None and _is_activation(last[2]) and same(last[3], out):
            tap, before = f"{last[1]}:in", last[0]
            act = last[1]
            owners = [r for r in inside if isinstance(r[2], nn.modules.batchnorm._BatchNorm) and act.startswith(r[1] + ".")]
            if owners:
                result.append((tap, owners[-1][1]))
                continue
        bns = [r for r in inside if r[0] < before and isinstance(r[2], nn.modules.batchnorm._BatchNorm)]
        main = [r for r in bns if not set(r[1].split(".")) & set(_SKIP_BRANCHES)]
        pick = (main or bns)[-1][1] if bns else None
        result.append((tap, pick))
    return result
