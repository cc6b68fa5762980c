"""The end of an epoch's measuring: the task's metric on val, the best-checkpoint rule, the epoch line."""

from __future__ import annotations

import math

from rich.console import Console
from torch import nn

from lcdistill.evaluate import score
from lcdistill.train.checkpointer import Checkpointer
from lcdistill.train.runtime import Runtime


class Validator:
    """Scores models on val with the task's metric (built once) and keeps the best value seen."""

    def __init__(self, task, num_classes: int, loader, runtime: Runtime, checkpointer: Checkpointer, console: Console):
        self.task, self.loader, self.runtime, self.checkpointer, self.console = task, loader, runtime, checkpointer, console
        self.metric = task.metric(num_classes)
        self.num_classes = num_classes
        self.best = -math.inf  # the best value of the metric's `best` so far (of what is shipped)

    def score(self, model: nn.Module, stats: tuple) -> dict:
        """The task's metric on val for model fed with stats = (mean, std), over every process:
        {value name: value, ..., "images": n}."""
        model.eval()
        with self.runtime.autocast():
            return score(self.task.predictor(model), self.loader, self.runtime.device, *stats, self.task.metric(self.num_classes),
                         self.task, comm=self.runtime)

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
