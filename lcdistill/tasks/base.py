"""The seam between the package and what a task (classification, segmentation, ...) is.

A Task supplies everything that differs between tasks; nothing else in the package asks which
task it runs. A Metric accumulates over batches, can be all-reduced under DDP, and says which
of its values picks the best checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


class Metric:
    """Accumulate per batch, all-reduce once, compute to named values (percentages)."""

    best: str  # the value that picks the best checkpoint (higher is better)
    columns: tuple[tuple[str, str], ...]  # (table header, value name) for the values worth a column

    def update(self, prediction: torch.Tensor, targets: torch.Tensor) -> None:
        raise NotImplementedError

    def reduce(self, all_reduce: Callable[[torch.Tensor], None]) -> None:
        """Sum the accumulated counts over DDP ranks (all_reduce works in place)."""
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError

    @property
    def count(self) -> int:
        """How many images were measured."""
        raise NotImplementedError

    @property
    def best_header(self) -> str:
        """The table header of the value `best` names, e.g. 'mIoU %'."""
        return dict((key, header) for header, key in self.columns)[self.best]

    def describe(self, values: dict[str, float]) -> str:
        """One short phrase for logs, e.g. 'top-1 97.21  top-5 99.72'."""
        return "  ".join(f"{header.removesuffix(' %')} {values[key]:.2f}" for header, key in self.columns)


@dataclass
class ExportSpec:
    """How an exported file is called: tensor names and which axes of them are dynamic."""

    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[int, str]  # axis of the input -> its name (batch, height, width)


@dataclass
class Splits:
    """What a task's scan returns: the class names and the two splits (task-specific sample lists)."""

    classes: list[str]
    train: Any
    val: Any
    skipped: list[str] = field(default_factory=list)  # unreadable files left out (--skip-bad-images)


class Task:
    """What differs between tasks. Subclasses are stateless: one instance serves a whole run."""

    name: str
    export: ExportSpec

    # ---- data ---------------------------------------------------------------------------
    def detect(self, root: Path) -> bool:
        """Whether root is laid out for this task (for --task auto)."""
        raise NotImplementedError

    def layout_hint(self) -> str:
        """The layout this task reads, for error messages."""
        raise NotImplementedError

    def scan(self, root: str | Path, check: bool = True, skip_bad: bool = False) -> Splits:
        raise NotImplementedError

    def datasets(self, splits: Splits, input_size: int, data_config: dict, recipe: dict, device: torch.device):
        """(train set, val set) yielding (image in [0, 1], target, skipped attempts)."""
        raise NotImplementedError

    def eval_dataset(self, split, meta: dict):
        """A split (splits.val, or splits.train for int8 calibration) prepared as a model recorded in
        meta (its size, crop, interpolation) wants it at eval time."""
        raise NotImplementedError

    # ---- models -------------------------------------------------------------------------
    def resolve(self, spec: str, num_classes: int, **kwargs):
        """A teacher or student by name, run folder or weights file: a models.Loaded."""
        raise NotImplementedError

    def check_model(self, loaded, role: str) -> None:
        """Refuse a model that cannot do this task (e.g. no dense output), naming it and the fix."""

    # ---- training -----------------------------------------------------------------------
    class_dim: int = 1  # the class dimension of the prediction tensor, for logit terms

    def prediction(self, raw: Any) -> torch.Tensor:
        """The prediction tensor (class scores along class_dim) from a model's raw output."""
        return raw

    def exportable(self, model: nn.Module) -> nn.Module:
        """The module to export: one whose output is the prediction tensor."""
        return model

    def loss(self, raw: Any, targets: torch.Tensor, settings: dict) -> torch.Tensor:
        """The supervised loss of a raw model output (recipe section `loss` in settings)."""
        raise NotImplementedError

    def metric(self, num_classes: int) -> Metric:
        raise NotImplementedError

    # ---- what a run and its files record ------------------------------------------------
    def metadata(self, classes: list[str]) -> dict:
        """Task fields of student.json and of exported files' metadata."""
        return {"task": self.name, "classes": classes}
