"""OFD: A Comprehensive Overhaul of Feature Distillation (Heo et al., ICCV 2019), as the authors'
distiller.py (clovaai/overhaul-distillation) computes it.

Stage pairs are found as for LONDON (by stride). At each stage the pre-ReLU map is read without
rewriting the model: the input of the stage's final activation module (a forward pre-hook), or the
stage output where that is already pre-activation (MobileNetV2's linear bottleneck). The student's
map goes through a 1x1 conv + BN connector to the teacher's channels. Per stage i of n:

    m     = margin per teacher channel: E[x | x < 0] for x ~ N(beta, |gamma|) of the teacher BN
            feeding that point (OFD's get_margin_from_BN; -3|gamma| when P(x < 0) <= 0.001)
    t'    = max(t, m)                                  (margin ReLU of the teacher's map)
    L_i   = sum over (N, C, H, W) of (s - t')^2 where s > t' or t' > 0   (the partial L2)
    L_ofd = weight * sum_i L_i / 2^(n-1-i) / N         (OFD ImageNet: weight 1e-4; CIFAR 1e-3)

A teacher stage with no BatchNorm before that point gets the same Gaussian margin from the mean
and standard deviation of its pre-ReLU map on the first training batch (a fallback; stored with
the method state so a resumed run keeps it).

With `london` in the method (the paper's LONDON = CE + OFD + Lipschitz), the Lipschitz term reads
this term's connected student maps and the teacher's pre-ReLU maps from `Step.shared["ofd"]`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lcdistill.errors import UserError
from lcdistill.methods.base import Term
from lcdistill.methods.london import connector
from lcdistill.models.stages import describe_pairs, find_stages, pair_stages, pre_activation
from lcdistill.models.taps import unwrap


def gaussian_margin(std: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Per channel E[x | x < 0] for x ~ N(mean, |std|^2); -3|std| where P(x < 0) <= 0.001 (OFD)."""
    s = std.detach().double().abs().clamp_min(1e-12)
    m = mean.detach().double()
    cdf = torch.special.ndtr(-m / s)
    expected = -s * torch.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / cdf.clamp_min(1e-300) + m
    return torch.where(cdf > 0.001, expected, -3 * s).float()


def partial_l2(student: torch.Tensor, teacher: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """OFD's distillation_loss: squared error to the margin-ReLU'd teacher, skipped where the
    student is already below a non-positive target; summed over everything."""
    target = torch.max(teacher, margin)
    loss = (student - target).pow(2)
    return (loss * ((student > target) | (target > 0)).float()).sum()


class OFD(Term):
    name = section = "ofd"
    defaults = {
        "weight": 1.0e-4,  # OFD's ImageNet factor (its CIFAR scripts use 1e-3)
        "min_stride": 4,  # stages with a smaller stride are not paired
        "pairs": None,  # [[student_module, teacher_module], ...] to set the pairing by hand (stage paths)
    }
    needs = frozenset({"probe"})
    paper = "Heo et al., A Comprehensive Overhaul of Feature Distillation, ICCV 2019"
    summary = "pre-ReLU stage features through 1x1 conv + BN connectors, partial L2 to the teacher's margin-ReLU'd features"

    @classmethod
    def validate(cls, settings: dict) -> None:
        cls.check_numbers(settings, at_least_zero=("weight",))

    def __init__(self, settings, ctx):
        super().__init__(settings, ctx)
        self.weight = float(settings["weight"])
        student, teacher = unwrap(ctx.student), unwrap(ctx.teacher)
        try:
            self.pairs = pair_stages(find_stages(student), find_stages(teacher), min_stride=settings["min_stride"], pairs=settings["pairs"])
        except ValueError as e:
            raise UserError(f"method ofd: {e}", "set ofd.pairs in the recipe, or use a logit term (kd, dkd, dist)") from None
        s_points = pre_activation(student, [s.name for s, _ in self.pairs])
        t_points = pre_activation(teacher, [t.name for _, t in self.pairs])
        self.student_names = [tap for tap, _ in s_points]
        self.teacher_names = [tap for tap, _ in t_points]
        self.margin_sources = [bn for _, bn in t_points]  # teacher BN paths, None: from the first batch
        modules = dict(teacher.named_modules())
        for i, ((_, t), bn) in enumerate(zip(self.pairs, self.margin_sources)):
            margin = gaussian_margin(modules[bn].weight, modules[bn].bias) if bn and getattr(modules[bn], "affine", False) else torch.zeros(t.channels)
            self.register_buffer(f"margin{i}", margin.view(1, -1, 1, 1))
        ready = [bool(bn) and getattr(modules[bn], "affine", False) for bn in self.margin_sources]
        self.margin_sources = [bn if ok else None for bn, ok in zip(self.margin_sources, ready)]
        self.register_buffer("margin_ready", torch.tensor(ready, dtype=torch.bool))
        self.connectors = nn.ModuleList(connector(s.channels, t.channels) for s, t in self.pairs)
        n = len(self.pairs)
        self.divisors = [2.0 ** (n - 1 - i) for i in range(n)]
        self.feeds = False  # set by a term that trains through these connectors (london)

    def student_taps(self) -> list[str]:
        return self.student_names

    def teacher_taps(self) -> list[str]:
        return self.teacher_names

    def trains(self) -> bool:
        return bool(self.weight) or self.feeds

    def describe(self) -> list[str]:
        """One line per stage pair: the pair, where its pre-ReLU maps are read, where its margin comes from."""
        return [f"pair {line}; ofd reads {s} <-> {t}, margin from {bn or 'the first batch'}"
                for line, s, t, bn in zip(describe_pairs(self.pairs), self.student_names, self.teacher_names, self.margin_sources)]

    def margins(self) -> list[torch.Tensor]:
        return [getattr(self, f"margin{i}") for i in range(len(self.pairs))]

    @torch.no_grad()
    def _margins_from(self, teacher_features: list[torch.Tensor]) -> None:
        for i, f in enumerate(teacher_features):
            if not self.margin_ready[i]:
                flat = f.float().transpose(0, 1).flatten(1)  # (C, N*H*W)
                margin = getattr(self, f"margin{i}")
                margin.copy_(gaussian_margin(flat.std(dim=1), flat.mean(dim=1)).view(1, -1, 1, 1))
                if dist.is_available() and dist.is_initialized():
                    dist.broadcast(margin, src=0)  # every process trains against rank 0's first-batch margins
                self.margin_ready[i] = True

    def forward(self, step):
        teacher = [step.teacher_features[n].detach().float() for n in self.teacher_names]
        raw = [step.student_features[n].float() for n in self.student_names]
        if not bool(self.margin_ready.all()):
            self._margins_from(teacher)
        connected = []
        for conn, s, t in zip(self.connectors, raw, teacher):
            s = conn(s).float()
            if s.shape[-2:] != t.shape[-2:]:  # odd input sizes can round strides differently
                s = F.adaptive_avg_pool2d(s, t.shape[-2:])
            connected.append(s)
        step.shared["ofd"] = {"student": connected, "teacher": teacher, "raw": raw}
        if not self.weight:
            return {}
        loss = sum(partial_l2(s, t, m) / d for s, t, m, d in zip(connected, teacher, self.margins(), self.divisors))
        return {"ofd": self.weight * loss / step.batch_size}
