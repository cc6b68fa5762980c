"""Soft-label knowledge distillation (Hinton et al. 2015), as timm's LogitDistillationTask computes it."""

import torch.nn.functional as F

from lcdistill.methods.base import Distiller


def kd_loss(student_logits, teacher_logits, temperature: float):
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature**2


class KD(Distiller):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kd_weight = float(self.recipe["kd"]["weight"])
        self.temperature = float(self.recipe["kd"]["temperature"])

    def distill_losses(self, images, logits, targets):
        teacher_logits = self.teacher_forward(images)
        if self.kd_weight == 0:
            return {}
        return {"kd": self.kd_weight * kd_loss(logits, teacher_logits, self.temperature)}
