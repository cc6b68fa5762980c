"""DIST: Knowledge Distillation from A Stronger Teacher (Huang et al., NeurIPS 2022), as the official
code (hunto/DIST_KD, image_classification_sota lib/models/losses/dist_kd.py) computes it.

Softmax at temperature tau; inter-class relation: 1 - the mean over samples of the Pearson
correlation of student and teacher across classes; intra-class relation: the same per class across
the batch. loss = weight * tau^2 * (beta * inter + gamma * intra). Defaults beta = gamma = tau = 1
(the official ImageNet `dist`) with weight 2 (the official configs' kd_loss_weight). Dense
predictions (N, C, H, W) count every pixel as a sample, as the official segmentation code does.
"""

from __future__ import annotations

import torch

from lcdistill.errors import UserError
from lcdistill.methods.base import Term
from lcdistill.methods.dkd import rows

EPS = 1e-8  # the official code's


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Pearson correlation of each row of a with the same row of b (cosine of the centred rows)."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_parts(student_logits, teacher_logits, tau: float, class_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(inter, intra) relation losses, each times tau^2."""
    y_s = (rows(student_logits, class_dim).float() / tau).softmax(dim=1)
    y_t = (rows(teacher_logits, class_dim).float() / tau).softmax(dim=1)
    inter = 1 - pearson_rows(y_s, y_t).mean()
    intra = 1 - pearson_rows(y_s.t(), y_t.t()).mean()
    return tau**2 * inter, tau**2 * intra


def dist_loss(student_logits, teacher_logits, beta: float, gamma: float, tau: float, class_dim: int = 1) -> torch.Tensor:
    inter, intra = dist_parts(student_logits, teacher_logits, tau, class_dim)
    return beta * inter + gamma * intra


class DIST(Term):
    name = section = "dist"
    logit = True
    defaults = {
        "weight": 2.0,  # the official configs' kd_loss_weight
        "beta": 1.0,  # inter-class relation (per sample, across classes)
        "gamma": 1.0,  # intra-class relation (per class, across the batch)
        "tau": 1.0,  # softmax temperature (the official CIFAR-100 setting uses 4)
    }
    needs = frozenset({"softmax"})
    paper = "Huang et al., Knowledge Distillation from A Stronger Teacher (DIST), NeurIPS 2022"
    summary = "match Pearson correlations of softmax outputs within each sample (inter-class) and each class (intra-class)"

    @classmethod
    def validate(cls, settings: dict) -> None:
        cls.check_numbers(settings, at_least_zero=("weight", "beta", "gamma"), above_zero=("tau",))

    def __init__(self, settings, ctx):
        super().__init__(settings, ctx)
        if any(ctx.task.logit_kind(m) != "softmax" for m in (ctx.student, ctx.teacher) if m is not None):
            raise UserError(f"method dist needs softmax class scores, and this {ctx.task.name} model pair has none",
                            "use kd (or a feature term) here")
        self.weight = float(settings["weight"])
        self.beta = float(settings["beta"])
        self.gamma = float(settings["gamma"])
        self.tau = float(settings["tau"])

    def forward(self, step):
        if self.weight == 0:
            return {}
        inter, intra = dist_parts(step.student.scores, step.teacher.scores, self.tau, step.student.class_dim)
        self.stats["dist_inter"], self.stats["dist_intra"] = inter.detach(), intra.detach()
        return {"dist": self.weight * (self.beta * inter + self.gamma * intra)}
