"""Build an architecture with a head of num_classes, load weights into it, read its data config."""

from __future__ import annotations

import timm
import torch
import torchvision
from torch import nn

from lcdistill.errors import UserError
from lcdistill.models.hub import timm_pretrained_kwargs, tv_pretrained_weights


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _replace_tv_head(model: nn.Module, num_classes: int) -> None:
    """Point a torchvision model's last Linear at num_classes (its weights stay random)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError("this torchvision model has no Linear classifier to resize", "choose another model or train it with its own classes")
    path, old = linears[-1]
    parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    setattr(parent, path.rsplit(".", 1)[-1], nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def _init_head(model: nn.Module) -> None:
    """Small init for a new classifier. timm's EfficientNet-family init draws the head from
    U(+-1/sqrt(num_classes)): with 10 classes the first logits have a std near 10 and
    the first epoch is spent recovering from it."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    if isinstance(head, nn.Linear):
        nn.init.normal_(head.weight, std=0.01)
        if head.bias is not None:
            nn.init.zeros_(head.bias)


def build(arch: dict, num_classes: int, pretrained: bool = False, flag: str = "--weights") -> nn.Module:
    """Construct the architecture with a head of num_classes; optional hub weights (head re-initialised)."""
    from lcdistill.models import segmentation

    if segmentation.is_arch(arch):  # smp:Arch:encoder and torchvision's segmentation models
        return segmentation.build(arch, num_classes, pretrained, flag)
    source, name, kwargs = arch["source"], arch["name"], dict(arch.get("kwargs") or {})
    try:
        if source == "timm":
            extra = timm_pretrained_kwargs(name, flag) if pretrained else {}
            model = timm.create_model(name, num_classes=num_classes, **extra, **kwargs)
        elif pretrained:
            model = torchvision.models.get_model(name, weights=tv_pretrained_weights(name, flag), **kwargs)
            if num_classes != 1000:
                _replace_tv_head(model, num_classes)
        else:
            model = torchvision.models.get_model(name, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise UserError(f"cannot build {source}:{name} with {kwargs} ({e})", "check student.kwargs in the recipe") from None
    if not (pretrained and num_classes == 1000):  # keep a pretrained ImageNet head
        _init_head(model)
    return model


def load_into(model: nn.Module, state: dict[str, torch.Tensor], what: str, num_classes: int, keep_head: bool = True) -> None:
    """Load a state dict, turning a classifier-size mismatch into the 'train it first' advice.

    keep_head=False (a student being fine-tuned) keeps the new head instead of the file's."""
    own = model.state_dict()
    mismatched = [k for k in state if k in own and own[k].shape != state[k].shape]
    head_only = bool(mismatched) and all(state[k].shape[0] != own[k].shape[0] and own[k].shape[0] == num_classes for k in mismatched)
    if head_only and not keep_head:
        state = {**{k: v for k, v in state.items() if k not in mismatched}, **{k: own[k] for k in mismatched}}
        mismatched = []
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if mismatched and head_only:
        got = state[mismatched[0]].shape[0]
        raise UserError(
            f"{what} has {got} classes but the data has {num_classes}",
            "fine-tune it on this data first with `lcdistill train --model NAME --data DIR` and pass that run folder",
        )
    if mismatched or missing or unexpected:
        first = (mismatched or missing or unexpected)[0]
        raise UserError(
            f"{what} does not fit the architecture (key '{first}': {len(mismatched)} mismatched, {len(missing)} missing, {len(unexpected)} unexpected)",
            "pass weights saved from the same architecture",
        )
    model.load_state_dict(state)



def from_weights_file(arch: dict, num_classes: int, weights: str, keep_head: bool, label: str) -> tuple[nn.Module, str, dict]:
    """(model, origin, rebuild spec) of an architecture loaded from a local weights file."""
    from pathlib import Path

    from lcdistill.checkpoint import load_weights

    model = build(arch, num_classes)
    load_into(model, load_weights(Path(weights)), f"weights file {weights}", num_classes, keep_head)
    return model, f"{label} + {weights}", {**arch, "weights": str(Path(weights).resolve())}


def data_config(model: nn.Module) -> dict:
    """mean/std/input size/interpolation/crop_pct from timm's pretrained_cfg (torchvision gets timm's ImageNet defaults)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return {
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "input_size": list(cfg["input_size"]),
        "interpolation": cfg.get("interpolation", "bilinear"),
        "crop_pct": float(cfg.get("crop_pct", 0.875)),
    }
