"""Task registry: a task is one module here; `--task auto` picks one from the data layout."""

from __future__ import annotations

from pathlib import Path

from lcdistill.errors import UserError
from lcdistill.tasks.base import Batch, ExportSpec, LogitView, Metric, Outputs, Splits, Task, scaled_diff
from lcdistill.tasks.classification import Classification
from lcdistill.tasks.segmentation import Segmentation

TASKS: dict[str, Task] = {t.name: t for t in (Classification(), Segmentation())}
LEGACY = next(iter(TASKS))  # files written before the task layer hold classifiers and name no task


def get(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown task '{name}'", f"choose auto or one of: {', '.join(TASKS)}")
    return TASKS[name]


def of_meta(meta: dict) -> Task:
    """The task a model's metadata (student.json, an export's) names."""
    return get(meta.get("task") or LEGACY)


def for_data(name: str, root: str | Path) -> Task:
    """The task named, or with 'auto' the one whose layout root has. When none matches, the
    first task's scan says precisely what is missing (a folder, a split, class folders)."""
    if name != "auto":
        return get(name)
    first, *others = TASKS.values()
    # the more specific layouts (segmentation's train/images + train/masks) before the ImageFolder
    return next((t for t in (*others, first) if Path(root).is_dir() and t.detect(Path(root))), first)


__all__ = ["LEGACY", "TASKS", "Batch", "ExportSpec", "LogitView", "Metric", "Outputs", "Splits", "Task", "for_data", "get", "of_meta", "scaled_diff"]
