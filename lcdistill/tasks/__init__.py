"""Task registry: a task is one module here; `--task auto` picks one from the data layout."""

from __future__ import annotations

from pathlib import Path

from lcdistill import models
from lcdistill.errors import UserError
from lcdistill.tasks.base import Batch, ExportSpec, LogitView, Metric, Outputs, Splits, Task, scaled_diff
from lcdistill.tasks.classification import Classification
from lcdistill.tasks.detection import Detection
from lcdistill.tasks.segmentation import Segmentation

TASKS: dict[str, Task] = {t.name: t for t in (Classification(), Segmentation(), Detection())}
LEGACY = next(iter(TASKS))  # files written before the task layer hold classifiers and name no task


def get(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown task '{name}'", f"choose auto or one of: {', '.join(TASKS)}")
    return TASKS[name]


def of_meta(meta: dict) -> Task:
    """The task a model's metadata (student.json, an export's) names."""
    return get(meta.get("task") or LEGACY)


def for_data(name: str, root: str | Path, models: tuple[str | None, ...] = ()) -> Task:
    """The task named, or with 'auto' the one whose layout root has. A folder laid out for several (digit
    scenes have masks and boxes) is read as the task of the models named (a detector means detection).
    When none matches, the first task's scan says precisely what is missing (a folder, a split, class folders)."""
    if name != "auto":
        return get(name)
    first, *others = TASKS.values()
    # the more specific layouts (VOC, train/images + train/masks) before the ImageFolder
    found = [t for t in (*others, first) if Path(root).is_dir() and t.detect(Path(root))]
    if len(found) <= 1:
        return found[0] if found else first
    named = {t for spec in models if spec for t in found if _serves(t, spec)}
    if len(named) == 1:
        return named.pop()
    raise UserError(f"{root} is laid out for {' and '.join(t.name for t in found)}, and the models named do not say which",
                    f"pass --task {found[0].name} (or --task {found[1].name})")


def _serves(task: Task, spec: str) -> bool:
    """Whether a model name or run folder is one of task's."""
    path = Path(spec)
    if path.is_dir() and models.is_run(path):
        return of_meta(models.read_meta(path)) is task
    try:
        return models.parse(spec, task.name) is not None
    except UserError:  # a name the family claims but that is malformed (smp:Unet:resnet181): its own error comes at resolve
        return True


__all__ = ["LEGACY", "TASKS", "Batch", "ExportSpec", "LogitView", "Metric", "Outputs", "Splits", "Task", "for_data", "get", "of_meta", "scaled_diff"]
