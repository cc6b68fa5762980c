"""A student cut from its teacher (`--student prune:R`): the teacher's architecture with some modules narrowed.

Its arch dict says so in JSON, without pickle: {"source": "pruned", "name": <base spec>, "kwargs": {"base": <the
teacher's arch>, "ratio": R, "shapes": {module path: {"type": class name, width attribute: new width}}}}. This
family rebuilds it with torch alone (no pruner): build the base, narrow the listed modules in place, and the
caller loads the weights strictly. The cut itself (Torch-Pruning) is lcdistill/prune.py, run once per run.
"""

from __future__ import annotations

import torch
from torch import nn

from lcdistill.errors import UserError
from lcdistill.models import registry
from lcdistill.models.registry import Family, register

# The width attributes Torch-Pruning changes, per module kind (torch_pruning/pruner/function.py).
WIDTHS = ((nn.modules.conv._ConvNd, ("in_channels", "out_channels", "groups")),
          (nn.modules.batchnorm._BatchNorm, ("num_features",)),
          (nn.Linear, ("in_features", "out_features")),
          (nn.GroupNorm, ("num_groups", "num_channels")))
PROBE_SIZE = 64  # the input side timm's feature_info widths are read at after narrowing


def widths(module: nn.Module) -> tuple[str, ...]:
    return next((attrs for kind, attrs in WIDTHS if isinstance(module, kind)), ())


def describe(pruned: nn.Module, base: nn.Module) -> dict:
    """{module path: {"type", width attribute: new width}} for each module of pruned narrower than in base."""
    own = dict(base.named_modules())
    out = {}
    for name, module in pruned.named_modules():
        changed = {a: int(getattr(module, a)) for a in widths(module) if name in own and getattr(module, a) != getattr(own[name], a)}
        if changed:
            out[name] = {"type": type(module).__name__, **changed}
    return out


def _shape(module: nn.Module, tensor: torch.Tensor) -> list[int]:
    if isinstance(module, nn.modules.conv._ConvNd):
        out, inp = (module.in_channels, module.out_channels) if module.transposed else (module.out_channels, module.in_channels)
        return [out, inp // module.groups, *tensor.shape[2:]] if tensor.dim() > 1 else [module.out_channels]
    if isinstance(module, nn.Linear):
        return [module.out_features, module.in_features] if tensor.dim() == 2 else [module.out_features]
    return [module.num_features if isinstance(module, nn.modules.batchnorm._BatchNorm) else module.num_channels]


def narrow(model: nn.Module, shapes: dict) -> nn.Module:
    """Narrow model's listed modules in place: new widths, fresh tensors of the derived shapes (reset as the
    module's own init does, so an unloaded build is still a sane net). Resizing in place, not constructing,
    keeps subclasses (timm's BatchNormAct2d, torchvision's Conv2dNormActivation children) without knowing
    their constructors. ValueError names the first entry that does not fit."""
    modules = dict(model.named_modules())
    for name, spec in shapes.items():
        module = modules.get(name) if isinstance(spec, dict) else None
        if module is None or type(module).__name__ != spec.get("type") or not set(spec) - {"type"} <= set(widths(module)):
            raise ValueError(f"entry {name!r} ({type(module).__name__ if module is not None else 'no such module'})")
        for attr, value in spec.items():
            if attr != "type":
                if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value > getattr(module, attr):
                    raise ValueError(f"entry {name!r}: {attr} = {value!r} is not a width up to {getattr(module, attr)}")
                setattr(module, attr, value)
        if isinstance(module, nn.modules.conv._ConvNd) and (module.in_channels % module.groups or module.out_channels % module.groups):
            raise ValueError(f"entry {name!r}: {module.in_channels} -> {module.out_channels} channels in {module.groups} groups")
        for key, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if t is not None and t.dim() > 0:
                fresh = torch.empty(_shape(module, t), dtype=t.dtype, device=t.device)
                setattr(module, key, nn.Parameter(fresh, t.requires_grad) if isinstance(t, nn.Parameter) else fresh)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    refresh(model)
    return model


def unfreeze_batchnorm(model: nn.Module) -> nn.Module:
    """torchvision's FrozenBatchNorm2d (pretrained detectors) as BatchNorm2d with the same statistics: the pruner
    resizes BatchNorm only, and a cut model trains its norms again."""
    from torchvision.ops import FrozenBatchNorm2d

    for name, module in list(model.named_modules()):
        if isinstance(module, FrozenBatchNorm2d):
            bn = nn.BatchNorm2d(module.weight.numel(), eps=module.eps)
            with torch.no_grad():
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(bn, key).copy_(getattr(module, key))
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, bn)
    return model


@torch.no_grad()
def refresh(model: nn.Module) -> None:
    """Widths a timm model caches outside its modules, made true again after narrowing: `feature_info`'s
    channel counts (stage discovery keeps a stage only where the probe sees them), num_features (what
    forward_features gives) and head_hidden_size (what the classifier reads)."""
    info = getattr(model, "feature_info", None)
    if not hasattr(model, "forward_features") or not isinstance(info, list) or not all(isinstance(d, dict) and "module" in d for d in info):
        return  # not a timm classifier: torchvision's and smp's models read their widths off their modules
    modules, seen = dict(model.named_modules()), {}
    hooks = [modules[d["module"]].register_forward_hook(lambda m, i, o, key=d["module"]: seen.setdefault(key, o))
             for d in info if d["module"] in modules]
    was_training = model.training
    try:
        features = model.eval().forward_features(torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    if features.dim() == 4:
        model.num_features = int(features.shape[1])
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Linear) and hasattr(model, "head_hidden_size"):
        model.head_hidden_size = head.in_features
    for d in info:
        out = seen.get(d["module"])
        if isinstance(out, torch.Tensor) and out.dim() == 4:
            d["num_chs"] = int(out.shape[1])


def base_arch(arch: dict) -> dict:
    """The unpruned architecture under arch (a student cut from a cut student unwraps twice)."""
    while arch.get("source") == "pruned":
        arch = arch["kwargs"]["base"]
    return arch


class Pruned(Family):
    """Students cut from their teacher: any task's models, so it parses no name of its own."""

    name = "pruned"
    task = "any"
    hint = "prune:R with --teacher (a share of the teacher's FLOPs, e.g. prune:0.5)"

    def parse(self, spec: str) -> dict | None:
        return None

    def owns(self, arch: dict) -> bool:
        return arch.get("source") == "pruned"

    def spec_of(self, arch: dict) -> str:
        return f"prune:{arch['kwargs']['ratio']}"

    def build(self, arch: dict, num_classes: int, pretrained: bool = False, flag: str = "--weights") -> nn.Module:
        try:
            base, shapes = arch["kwargs"]["base"], arch["kwargs"]["shapes"]
            if not isinstance(base, dict) or not isinstance(shapes, dict):
                raise ValueError("its base and shapes must be JSON objects")
            model = registry.build(base, num_classes)
            return narrow(unfreeze_batchnorm(model), shapes)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # RuntimeError: widths that do not chain (refresh's forward)
            raise UserError(f"the pruned student's shape description does not fit its base model ({exc})",
                            "the file is damaged: use the run's own student.json, or cut the student again with --student prune:R") from None

    def library(self, arch: dict) -> str:
        return "lcdistill"


PRUNED = register(Pruned())
