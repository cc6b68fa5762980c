"""PKD: General Distillation Framework for Object Detectors via Pearson Correlation Coefficient (Cao et
al., NeurIPS 2022), as MMRazor's PKDLoss computes it.

Each feature map is standardised per channel (zero mean, unit variance over the batch and its
positions), and the loss is the MSE of the standardised student and teacher maps, halved, summed
over the matching levels (the FPN's P3-P5 of a detector: no adapter when channels match; P6 and P7 are
too small at small input sizes to carry statistics). MMRazor's detection configs weigh it 6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lcdistill.methods.base import Term


def standardise(feat: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) with each channel at zero mean and unit (sample) std over N, H and W."""
    n, c, h, w = feat.shape
    flat = feat.float().permute(1, 0, 2, 3).reshape(c, -1)
    flat = (flat - flat.mean(dim=-1, keepdim=True)) / (flat.std(dim=-1, keepdim=True) + 1e-6)
    return flat.reshape(c, n, h, w).permute(1, 0, 2, 3)


def pkd_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Sum over levels of MSE(standardised student, standardised teacher) / 2 (a student map is resized
    to the teacher's when its side differs)."""
    total = student[0].new_zeros(())
    for s, t in zip(student, teacher):
        if s.shape[-2:] != t.shape[-2:]:
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        total = total + F.mse_loss(standardise(s), standardise(t.detach())) / 2
    return total


class PKD(Term):
    name = section = "pkd"
    defaults = {
        "weight": 6.0,  # MMRazor's PKD configs for RetinaNet and Faster R-CNN
    }
    needs = frozenset({"pyramid"})
    paper = "Cao et al., PKD: General Distillation Framework for Object Detectors via Pearson Correlation Coefficient, NeurIPS 2022"
    summary = "Pearson correlation of matching feature pyramid levels (MSE of per-channel standardised maps)"

    @classmethod
    def validate(cls, settings: dict) -> None:
        cls.check_numbers(settings, at_least_zero=("weight",))

    def __init__(self, settings, ctx):
        super().__init__(settings, ctx)
        self.weight = float(settings["weight"])
        self.student_names, self.teacher_names = self.matching_levels(ctx)

    def student_taps(self) -> list[str]:
        return self.student_names

    def teacher_taps(self) -> list[str]:
        return self.teacher_names

    def describe(self) -> list[str]:
        return [f"pkd levels: {', '.join(self.student_names)}"]

    def forward(self, step):
        if not self.weight:
            return {}
        student = [step.student_features[n] for n in self.student_names]
        teacher = [step.teacher_features[n] for n in self.teacher_names]
        return {"pkd": self.weight * pkd_loss(student, teacher)}
