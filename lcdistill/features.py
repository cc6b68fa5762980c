"""Stage discovery and feature tapping for LONDON distillation.

Models are never rewritten (torchdistill style): intermediate stage outputs
are tapped by module path with plain ``register_forward_hook`` hooks.

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

import math
import warnings
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = [
    "Stage",
    "find_stages",
    "probe_modules",
    "pair_stages",
    "FeatureTap",
    "describe_pairs",
    "describe_stages",
]


@dataclass
class Stage:
    """A tappable stage: module path, output channels, and stride (input / output H)."""

    name: str
    channels: int
    stride: int


# --------------------------------------------------------------------------- helpers


def _unwrap(model: nn.Module) -> nn.Module:
    """Return the original module behind a ``torch.compile`` wrapper (``_orig_mod``).

    Module paths are always relative to the unwrapped model, so names found on a
    model stay valid after it is compiled.
    """
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(inner, nn.Module):
            model = inner
            continue
        break
    return model


def _first_tensor(out) -> Optional[torch.Tensor]:
    """The output tensor of a module: itself, or the first tensor in a tuple/list/dict."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for item in out:
            t = _first_tensor(item)
            if t is not None:
                return t
        return None
    if isinstance(out, dict):
        for item in out.values():
            t = _first_tensor(item)
            if t is not None:
                return t
    return None


def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


_MAX_STRIDE = 64
_STRIDE_TOL = 0.25  # octaves: H may deviate from probe/stride by up to ~19% (unpadded convs)


def _stride_of(shape: Optional[Tuple[int, ...]], probe_size: int, allow_one: bool = False) -> Optional[int]:
    """Stride of a 4D NCHW feature map for a square ``probe_size`` input, or None.

    Needs H == W >= 2 (a square input gives a square NCHW map; this rejects
    channels-last (N, H, W, C) tensors, whose "W" is C) and probe/H within a
    quarter octave of a power of two in [2, 64] ([1, 64] with ``allow_one``):
    unpadded convolutions (SqueezeNet, Inception) shrink maps a little below
    probe/stride.
    """
    if shape is None or len(shape) != 4:
        return None
    h, w = int(shape[2]), int(shape[3])
    if h < 2 or h != w:
        return None
    ratio = probe_size / h
    stride = 2 ** int(round(math.log2(ratio)))
    if abs(math.log2(ratio / stride)) > _STRIDE_TOL:
        return None
    if stride < (1 if allow_one else 2) or stride > _MAX_STRIDE:
        return None
    return stride


def _check_size(probe_size: int) -> int:
    if not isinstance(probe_size, int) or probe_size < 32:
        raise ValueError(f"probe_size must be an int >= 32, got {probe_size!r}")
    return probe_size


def _second_size(probe_size: int) -> int:
    """Size of the cross-check probe: 64 pixels off, so every stride <= 64 divides the gap."""
    return probe_size - 64 if probe_size >= 128 else probe_size + 64


def _input_channels(model: nn.Module) -> int:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict):
        size = cfg.get("input_size")
        if isinstance(size, (tuple, list)) and len(size) == 3:
            return int(size[0])
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    return 3


def _param_device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    for b in model.buffers():
        if b.is_floating_point():
            return b.device, b.dtype
    return torch.device("cpu"), torch.float32


_Record = Tuple[str, Optional[Tuple[int, ...]], Tuple[int, ...]]  # (name, input shape, output shape)


def _probe(model: nn.Module, probe_size: int, names: Optional[Iterable[str]] = None) -> List[_Record]:
    """One no-grad eval-mode forward; returns ``(module path, input shape, output shape)``
    per module call, in hook-firing order.

    Only tensor outputs are recorded (first tensor of tuple/list/dict outputs).
    The root module '' is never hooked.  Every module's training flag is
    restored afterwards, and all hooks are removed even if the forward fails.
    Eval mode means BatchNorm running statistics are not touched; the input
    comes from a private generator, so the global RNG state is untouched.
    """
    model = _unwrap(model)
    wanted = None if names is None else set(names)
    fired: List[_Record] = []

    def make_hook(name: str):
        def hook(_module, inp, out):
            t = _first_tensor(out)
            if t is not None:
                i = _first_tensor(inp)
                fired.append((name, None if i is None else tuple(i.shape), tuple(t.shape)))

        return hook

    modes = [(m, m.training) for m in model.modules()]
    handles = []
    try:
        for name, module in model.named_modules():
            if name == "" or (wanted is not None and name not in wanted):
                continue
            handles.append(module.register_forward_hook(make_hook(name)))
        device, dtype = _param_device_dtype(model)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, _input_channels(model), probe_size, probe_size, generator=gen)
        x = x.to(device=device, dtype=dtype)
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return fired


def _unique_shapes(fired: Optional[Sequence[_Record]], which: int) -> Dict[str, Optional[Tuple[int, ...]]]:
    """Per module: its input (which=1) or output (which=2) shape, None if calls disagree."""
    shapes: Dict[str, set] = {}
    for rec in fired or ():
        shapes.setdefault(rec[0], set()).add(rec[which])
    return {n: (next(iter(v)) if len(v) == 1 else None) for n, v in shapes.items()}


def _scaling_stride(
    shape: Optional[Tuple[int, ...]],
    shape2: Optional[Tuple[int, ...]],
    probe_size: int,
    probe_size2: int,
    allow_one: bool = False,
) -> Optional[int]:
    """Stride from how a map's size changes between two probes 64 pixels apart.

    Every stride <= 64 divides the gap, so padded, unpadded, floor- and
    ceil-mode layers all shrink by exactly ``gap / stride`` rows.  A map that
    does not scale (``AdaptiveAvgPool2d((7, 7))``), is not square, or changes
    channels is rejected.
    """
    if shape is None or shape2 is None or len(shape) != 4 or len(shape2) != 4:
        return None
    if shape[1] != shape2[1] or shape[2] != shape[3] or shape2[2] != shape2[3]:
        return None
    if min(shape[2], shape2[2]) < 2:
        return None
    gap, dh = probe_size - probe_size2, int(shape[2]) - int(shape2[2])
    if dh == 0 or gap % dh:
        return None
    stride = gap // dh
    if stride < (1 if allow_one else 2) or stride > _MAX_STRIDE or not _is_pow2(stride):
        return None
    return stride


class _ProbeResult:
    """Strides of every hooked module's input and output, from one or two probes."""

    def __init__(self, fired, probe_size, fired2=None, probe_size2=None):
        self.fired = fired
        outs, outs2 = _unique_shapes(fired, 2), _unique_shapes(fired2, 2)
        ins, ins2 = _unique_shapes(fired, 1), _unique_shapes(fired2, 1)
        self.stages: Dict[str, Stage] = {}
        self.in_stride: Dict[str, Optional[int]] = {}
        self.out_stride: Dict[str, Optional[int]] = {}
        for name, shape in outs.items():
            if fired2 is not None and name in outs2:
                stride = _scaling_stride(shape, outs2[name], probe_size, probe_size2)
                in_stride = _scaling_stride(ins[name], ins2.get(name), probe_size, probe_size2, True)
            else:
                stride = _stride_of(shape, probe_size)
                in_stride = _stride_of(ins[name], probe_size, allow_one=True)
            self.out_stride[name] = stride
            self.in_stride[name] = in_stride
            if stride is not None:
                self.stages[name] = Stage(name=name, channels=int(shape[1]), stride=stride)

    def transition_interior(self) -> set:
        """Stages that sit inside a stride-changing module and still run at its input stride.

        Example: the 1x1 expansion conv of a downsampling inverted-residual block
        (torchvision ``features.4.conv.0``), or the BN/conv of a DenseNet transition
        before its pooling.  Such a module is the last one at its stride in firing
        order, but it starts the next stage rather than ending the current one.
        """
        interior = set()
        for name, st in self.stages.items():
            parts = name.split(".")
            for k in range(1, len(parts)):
                anc = ".".join(parts[:k])
                if anc not in self.out_stride:
                    continue
                if self.in_stride[anc] == st.stride and self.out_stride[anc] != st.stride:
                    interior.add(name)
                    break
        return interior


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


# --------------------------------------------------------------------------- public API


def _probe_twice(model: nn.Module, probe_size: int, names: Optional[Iterable[str]] = None):
    """Probe at ``probe_size`` (errors propagate) and at the cross-check size.

    Returns ``(fired, fired2, size2)``; ``fired2`` is None when the model
    rejects the second size (e.g. a ViT with a fixed input size).
    """
    fired = _probe(model, probe_size, names)
    size2 = _second_size(probe_size)
    try:
        fired2 = _probe(model, size2, names)
    except Exception:
        fired2 = None
    return fired, fired2, size2


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
    _check_size(probe_size)
    model = _unwrap(model)
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
                outs = _unique_shapes(_probe(model, probe_size, names), 2)
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
        fired, fired2, size2 = _probe_twice(model, probe_size)
    except Exception as exc:
        raise RuntimeError(
            f"stage discovery: probe forward pass on a {probe_size}x{probe_size} input "
            f"failed: {exc}. Try another probe size."
        ) from exc
    probe = _ProbeResult(fired, probe_size, fired2, size2)
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


def probe_modules(model: nn.Module, names: Sequence[str], probe_size: int = 224) -> List[Stage]:
    """Stage info (channels, stride) for explicitly named modules, in the given order.

    Raises ValueError if a name is not a module of the model, or its output is
    not a 4D NCHW feature map with a power-of-two stride.
    """
    _check_size(probe_size)
    model = _unwrap(model)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules or n == ""]
    if missing:
        raise ValueError(f"no module named {', '.join(map(repr, missing))} in the model")
    fired, fired2, size2 = _probe_twice(model, probe_size, names)
    table = _ProbeResult(fired, probe_size, fired2, size2).stages
    out = []
    for n in names:
        if n not in table:
            raise ValueError(
                f"module {n!r} does not output a single 4D (N, C, H, W) feature map that scales "
                "with the input at a power-of-two stride; it cannot be used as a distillation stage"
            )
        out.append(table[n])
    return out


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
        base = _unwrap(model)
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


class FeatureTap:
    """Taps module outputs by path with forward hooks.

    ``features[name]`` holds the latest output of each hooked module (first tensor
    if the module returns a tuple/list/dict), kept in the autograd graph.  Call
    ``clear()`` every step so no activations are kept across steps, and
    ``remove()`` when done.  Names are relative to the unwrapped model, so a
    tap made on a model keeps working after ``torch.compile(model)``.
    """

    def __init__(self, model: nn.Module, module_names: Sequence[str]):
        base = _unwrap(model)
        modules = dict(base.named_modules())
        names = list(dict.fromkeys(module_names))  # de-duplicate, keep order
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"cannot tap {', '.join(map(repr, missing))}: no such module in the model")
        self.names: List[str] = names
        self.features: Dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._make_hook(n)) for n in names]

    def _make_hook(self, name: str):
        features = self.features

        def hook(_module, _inp, out):
            t = _first_tensor(out)
            if t is not None:
                features[name] = t

        return hook

    def clear(self) -> None:
        self.features.clear()

    def get(self, names: Optional[Sequence[str]] = None) -> List[torch.Tensor]:
        """Tapped outputs in the given order (default: construction order)."""
        names = self.names if names is None else list(names)
        out = []
        for n in names:
            if n not in self.names:
                raise KeyError(f"module {n!r} is not tapped (tapped: {', '.join(self.names)})")
            t = self.features.get(n)
            if t is None:
                raise RuntimeError(
                    f"tapped module {n!r} produced no output: it did not run in the forward "
                    "pass since the last clear() (is it on the model's forward path?)"
                )
            out.append(t)
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.features.clear()

    def __enter__(self) -> "FeatureTap":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
