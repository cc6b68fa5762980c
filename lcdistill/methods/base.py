"""Distiller: the student, an optional frozen teacher, and a method's trainable extras.

forward(images, targets) -> (student logits, {"loss name": weighted loss tensor}).
The trainer sums the dict; it knows nothing of any particular method.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lcdistill.data import normalize


class Distiller(nn.Module):
    needs_teacher = True

    def __init__(self, student: nn.Module, teacher: nn.Module | None, recipe: dict, student_cfg: dict, teacher_cfg: dict | None):
        super().__init__()
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self.recipe = recipe
        self.ce_weight = float(recipe["loss"]["ce"])
        self.label_smoothing = float(recipe["loss"]["label_smoothing"])
        self.student_stats = (student_cfg["mean"], student_cfg["std"])
        self.teacher_stats = (teacher_cfg["mean"], teacher_cfg["std"]) if teacher_cfg else None
        self.stats: dict[str, torch.Tensor] = {}  # detached diagnostics of the last step
        self.progress = 0.0  # epochs done (fractional), set by the trainer before each step: for loss warm-ups

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # a teacher's BN statistics must not drift (the authors' code let them)
        return self

    def extras(self) -> nn.Module | None:
        """Trainable modules besides the student (connectors); saved in checkpoints, never exported."""
        return None

    def student_forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(normalize(images, *self.student_stats))

    def teacher_forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher(normalize(images, *self.teacher_stats))

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.student_forward(images)
        if targets is None:
            return logits, {}
        losses = {"ce": self.ce_weight * F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)}
        losses.update(self.distill_losses(images, logits, targets))
        return logits, losses

    def distill_losses(self, images, logits, targets) -> dict[str, torch.Tensor]:
        return {}
