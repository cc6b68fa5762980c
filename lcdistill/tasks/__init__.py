"""Task registry: a task is one module here; `--task auto` picks one from the data layout."""

from __future__ import annotations

from pathlib import Path

from lcdistill.errors import UserError
from lcdistill.tasks.base import ExportSpec, Metric, Splits, Task
from lcdistill.tasks.classification import Classification
from lcdistill.tasks.segmentation import Segmentation

TASKS: dict[str, Task] = {t.name: t for t in (Classification(), Segmentation())}


def get(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown task '{name}'", f"choose auto or one of: {', '.join(TASKS)}")
    return TASKS[name]


def for_data(name: str, root: str | Path) -> Task:
    """The task named, or with 'auto' the one whose layout root has. When none matches, the
    first task's scan says precisely what is missing (a folder, a split, class folders)."""
    if name != "auto":
        return get(name)
    first, *others = TASKS.values()
    # the more specific layouts (segmentation's train/images + train/masks) before the ImageFolder
    return next((t for t in (*others, first) if Path(root).is_dir() and t.detect(Path(root))), first)


__all__ = ["TASKS", "ExportSpec", "Metric", "Splits", "Task", "for_data", "get"]
