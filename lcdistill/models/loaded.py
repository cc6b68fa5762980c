"""What a built model is to the rest of the package (Loaded) and loading a weights file into one.
No family and no task in here: the families build, this holds and loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lcdistill.checkpoint import load_weights
from lcdistill.errors import UserError


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def quick_batchnorm(model: nn.Module) -> None:
    """BatchNorm running statistics at torch's default momentum 0.1 in a model trained from scratch.

    torchvision's MobileNetV3 (and the classifiers, segmentation models and detectors over it) sets 0.01, for
    its 600-epoch ImageNet recipe: over a short run the running statistics then lag the weights so far that
    eval sees another network. tv:mobilenet_v3_small on plain digits, 5 epochs: 10.0% val top-1 at every
    epoch (a constant prediction) with 0.01, 98.2% with 0.1."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is not None and module.momentum < 0.1:
            module.momentum = 0.1


@dataclass
class Loaded:
    """A built model and what is needed to feed it and to rebuild it."""

    model: nn.Module
    arch: dict  # {"source": "timm"|"tv"|"smp", "name": str, "kwargs": dict}
    num_classes: int
    data_config: dict  # mean, std, input_size, interpolation, crop_pct
    origin: str  # what the user named, for tables and logs
    spec: dict  # how to build it again (stored in a student run for eval's teacher column)
    classes: list[str] | None = None
    meta: dict = field(default_factory=dict)  # student.json of a run, if any

    @property
    def params(self) -> int:
        return params(self.model)


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


def from_weights_file(build: Callable[[], nn.Module], arch: dict, num_classes: int, weights: str, keep_head: bool,
                      label: str) -> tuple[nn.Module, str, dict]:
    """(model, origin, rebuild spec) of an architecture (built by `build`) loaded from a local weights file."""
    model = build()
    load_into(model, load_weights(Path(weights)), f"weights file {weights}", num_classes, keep_head)
    return model, f"{label} + {weights}", {**arch, "weights": str(Path(weights).resolve())}
