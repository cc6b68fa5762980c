"""The end of an epoch's measuring: the task's metric on val, the best-checkpoint rule, the epoch line."""

from __future__ import annotations

import math

from rich.console import Console
from rich.markup import escape
from torch import nn

from lcdistill.measure import score
from lcdistill.training.checkpointer import Checkpointer
from lcdistill.training.runtime import Runtime

COLLAPSED_VALIDATIONS = 2  # collapsed validations in a row that earn the warning (once per run)


class Validator:
    """Scores models on val with the task's metric (built once) and keeps the best value seen."""

    def __init__(self, task, num_classes: int, loader, runtime: Runtime, checkpointer: Checkpointer, console: Console,
                 optimizer: str = "sgd"):
        self.task, self.loader, self.runtime, self.checkpointer, self.console = task, loader, runtime, checkpointer, console
        self.optimizer = optimizer  # the collapse advice does not suggest what is already set
        self.metric = task.metric(num_classes)
        self.num_classes = num_classes
        self.best = -math.inf  # the best value of the metric's `best` so far (of what is shipped)
        self.scored: list[tuple[dict, object]] = []  # (values, the metric that made them) since the last epoch line
        self.collapses, self.warned = 0, False  # the student's consecutive collapsed validations; said once a run

    def score(self, model: nn.Module, stats: tuple) -> dict:
        """The task's metric on val for model fed with stats = (mean, std), over every process:
        {value name: value, ..., "images": n}."""
        model.eval()
        metric = self.task.metric(self.num_classes)
        with self.runtime.autocast():
            values = score(self.task.predictor(model), self.loader, self.runtime.device, *stats, metric, self.task, comm=self.runtime)
        self.scored = [*self.scored[-3:], (values, metric)]  # the student's, the EMA's, a teacher's: the line picks by identity
        return values

    def record(self, row: dict, val: dict, ema_val: dict | None) -> None:
        """The epoch row's val (and EMA) values."""
        row.update({f"val_{k}": v for k, v in val.items()})
        if ema_val is not None:
            row.update({f"ema_{k}": v for k, v in ema_val.items() if k != "images"})

    def keep_if_best(self, row: dict, weights: dict) -> None:
        """Save the shipped weights (the EMA copy's when there is one) as the best checkpoint when they beat the best so far."""
        key = self.metric.best
        shipped = row.get(f"ema_{key}", row[f"val_{key}"])
        if shipped > self.best:
            self.best = shipped
            self.checkpointer.save_best(weights, {"epoch": row["epoch"], key: shipped})

    def line(self, row: dict, epochs: int, losses: dict, val: dict, skipped: int) -> None:
        metric = self.metric
        if not self.runtime.main:
            return
        parts = "  ".join(f"{k} {v:.4f}" for k, v in losses.items())
        header = metric.best_header.removesuffix(" %")
        extra = f"  ema {header} {row[f'ema_{metric.best}']:.2f}" if f"ema_{metric.best}" in row else ""
        bad = f"  skipped {skipped} bad images" if skipped else ""
        self.console.print(f"epoch {row['epoch']}/{epochs}  {parts}  val {metric.describe(val)}{extra}{bad}")
        self.warn_collapse(val)
        if row["epoch"] == epochs:
            self.warn_guessing(val)

    def warn_guessing(self, val: dict) -> None:
        """One warning line when the trained model's predictions (those that made `val`) find objects but guess their classes."""
        scored = next((m for values, m in self.scored if values is val), None)
        what = scored.guessing() if scored is not None else None
        if what:
            self.console.print(f"[bold yellow]warning[/]: the model finds objects but guesses their classes ({escape(what)}): "
                               "start it from a backbone that knows them (--init RUN_OR_FILE: a run or weights file of a model trained "
                               "on these objects, or --pretrained), or train more epochs", soft_wrap=True, highlight=False)

    def warn_collapse(self, val: dict) -> None:
        """One warning line when the student's predictions (those that made `val`) collapsed at two validations in a row."""
        scored = next((m for values, m in self.scored if values is val), None)
        what = scored.collapsed() if scored is not None else None
        self.collapses = self.collapses + 1 if what else 0
        if self.collapses == COLLAPSED_VALIDATIONS and not self.warned:
            self.warned = True
            adamw = "" if "adamw" in self.optimizer.lower() else "--set schedule.optimizer=adamw, "
            self.console.print(f"[bold yellow]warning[/]: the predictions collapsed at {COLLAPSED_VALIDATIONS} validations in a row "
                               f"({escape(what)}): try a lower --lr (a higher one if the loss never fell), {adamw}"
                               "or a smaller --batch-size",
                               soft_wrap=True, highlight=False)
