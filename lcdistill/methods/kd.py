"""Soft-label knowledge distillation (Hinton et al. 2015), as timm's LogitDistillationTask computes it.
Dense predictions (N, C, H, W) are distilled per position, over the positions the task marks valid."""

import torch.nn.functional as F

from lcdistill.errors import UserError
from lcdistill.methods.base import Term

def kd_loss(student_logits, teacher_logits, temperature: float, class_dim: int = -1, valid=None):
    """KL(teacher || student) of the softmax over the class dimension at temperature T, times T^2,
    averaged over the batch; for a dense prediction, the KL per position averaged over the valid
    positions (a bool mask at the prediction's spatial size; all positions when None)."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=class_dim)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=class_dim)
    if log_s.dim() <= 2:
        return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature**2
    per_pixel = (log_t.exp() * (log_t - log_s)).sum(dim=class_dim)
    if valid is None:
        return per_pixel.mean() * temperature**2
    return (per_pixel * valid).sum() / valid.sum().clamp_min(1) * temperature**2


def sigmoid_kd_loss(student_logits, teacher_logits, temperature: float, valid=None):
    """For scores a sigmoid turns into one probability per class (a dense detector's head): the KL between
    teacher's and student's Bernoulli per class at temperature T, summed over the classes, averaged over
    the positions (the valid ones, when a mask is given), times T^2."""
    s, t = student_logits.float() / temperature, teacher_logits.float() / temperature
    log_ps, log_qs, log_pt, log_qt = F.logsigmoid(s), F.logsigmoid(-s), F.logsigmoid(t), F.logsigmoid(-t)
    per = (log_pt.exp() * (log_pt - log_ps) + log_qt.exp() * (log_qt - log_qs)).sum(-1)
    if valid is None:
        return per.mean() * temperature**2
    return (per * valid).sum() / valid.sum().clamp_min(1) * temperature**2


class KD(Term):
    name = section = "kd"
    logit = True  # at most one logit term per method
    defaults = {
        "weight": 1.0,  # weight of the soft-label KL term
        "temperature": 4.0,
    }
    needs = frozenset({"scores"})
    paper = "Hinton et al., Distilling the Knowledge in a Neural Network, 2015"
    summary = "soft-label KL between teacher and student at temperature T (per labelled position on dense tasks)"

    @classmethod
    def validate(cls, settings: dict) -> None:
        cls.check_numbers(settings, above_zero=("temperature",))

    def __init__(self, settings, ctx):
        super().__init__(settings, ctx)
        kinds = {ctx.task.logit_kind(m) for m in (ctx.student, ctx.teacher) if m is not None}
        if None in kinds:
            raise UserError(f"method kd needs class scores at matching positions, and this {ctx.task.name} model pair has none to match "
                            "one to one (a two-stage or SSD detector scores proposals or anchors of its own)",
                            "use dense-head models (FCOS, RetinaNet) for both, or a method without kd (e.g. --method ce+london)")
        self.weight = float(settings["weight"])
        self.temperature = float(settings["temperature"])

    def forward(self, step):
        if self.weight == 0:
            return {}
        s, t = step.student, step.teacher
        if s.scores.shape != t.scores.shape:
            raise UserError(f"method kd: student and teacher score {tuple(s.scores.shape)} and {tuple(t.scores.shape)} positions x classes",
                            "pair models with the same grid (strides, anchors, input size), or use a method without kd")
        if s.kind == "sigmoid":
            return {"kd": self.weight * sigmoid_kd_loss(s.scores, t.scores, self.temperature, s.valid)}
        return {"kd": self.weight * kd_loss(s.scores, t.scores, self.temperature, s.class_dim, s.valid)}
