"""Channel-wise distillation for dense prediction (Shu et al., ICCV 2021), as MMRazor's
ChannelWiseDivergence computes it.

Each channel of a (N, C, H, W) map becomes a distribution over its H*W positions (softmax at
temperature T); the loss is KL(teacher || student) summed over positions, summed over channels
and samples, divided by N * C, times T^2. Applied to the prediction (classes as channels) where the
task predicts per position, else to the task's matching feature-pyramid levels (a detector's FPN
P3-P5, summed over levels, as MMRazor's detection configs place it; the section's defaults are the
segmentation ones, not tuned for FPN maps). A
prediction of one score per class per image (N, C) has no positions to normalise over: a task whose models give
none does not offer "dense", and methods.build refuses the term there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lcdistill.methods.base import Term


def cwd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL of per-channel spatial softmaxes, averaged over channels and batch, times T^2."""
    if student.dim() != 4 or student.shape != teacher.shape:
        raise ValueError(f"cwd needs two (N, C, H, W) maps of one shape, got {tuple(student.shape)} and {tuple(teacher.shape)}")
    n, c = student.shape[:2]
    log_s = F.log_softmax(student.float().flatten(2) / temperature, dim=2)
    log_t = F.log_softmax(teacher.float().flatten(2) / temperature, dim=2)
    return (log_t.exp() * (log_t - log_s)).sum() / (n * c) * temperature**2


class CWD(Term):
    name = section = "cwd"
    defaults = {
        "weight": 3.0,  # the paper's weight for segmentation logits (MMRazor's configs use 3 or 5)
        "temperature": 4.0,  # the paper's segmentation setting (MMRazor's configs use 1)
    }
    needs = frozenset({"dense"})  # or a feature pyramid (serves)
    paper = "Shu et al., Channel-wise Knowledge Distillation for Dense Prediction, ICCV 2021"
    summary = "KL between per-channel spatial softmaxes of the predictions (classes as channels), or of FPN levels for detectors"

    @classmethod
    def serves(cls, task) -> bool:
        return "dense" in task.offers or "pyramid" in task.offers

    @classmethod
    def validate(cls, settings: dict) -> None:
        cls.check_numbers(settings, at_least_zero=("weight",), above_zero=("temperature",))

    def __init__(self, settings, ctx):
        super().__init__(settings, ctx)
        self.weight = float(settings["weight"])
        self.temperature = float(settings["temperature"])
        # on the prediction where the task predicts per position, else on its feature pyramid
        self.student_names, self.teacher_names = ([], []) if "dense" in ctx.task.offers else self.matching_levels(ctx)

    def student_taps(self) -> list[str]:
        return self.student_names

    def teacher_taps(self) -> list[str]:
        return self.teacher_names

    def forward(self, step):
        if self.weight == 0:
            return {}
        if self.student_names:
            loss = sum(cwd_loss(step.student_features[s], step.teacher_features[t].detach(), self.temperature)
                       for s, t in zip(self.student_names, self.teacher_names))
            return {"cwd": self.weight * loss}
        student, teacher, class_dim = step.student.scores, step.teacher.scores, step.student.class_dim
        if class_dim not in (1, -3):
            student, teacher = student.movedim(class_dim, 1), teacher.movedim(class_dim, 1)
        if teacher.shape[-2:] != student.shape[-2:]:
            teacher = F.interpolate(teacher.float(), size=student.shape[-2:], mode="bilinear", align_corners=False)
        return {"cwd": self.weight * cwd_loss(student, teacher, self.temperature)}
