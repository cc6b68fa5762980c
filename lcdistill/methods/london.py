"""LONDON: Lipschitz continuity guided KD (Shang et al., ICCV 2021).

Stage outputs of student and teacher are tapped with forward hooks and paired by
stride. For each pair of consecutive stages the transmitting matrix's spectral
norm (power iteration, differentiable) is compared between the two networks, on
the student's maps after 1x1 conv + BN connectors to the teacher's channel count
(as the authors do), or on the student's own maps (london.student_side: raw). Total = CE + KD + alpha * L_lip (+ optional feature MSE).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lcdistill.errors import UserError
from lcdistill.features import FeatureTap, describe_pairs, find_stages, pair_stages
from lcdistill.lipschitz import default_pair_weights, lipschitz_loss, stage_sigmas
from lcdistill.methods.kd import KD


def connector(in_channels: int, out_channels: int) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels))


def match_pairs(student: nn.Module, teacher: nn.Module, settings: dict, probe_size: int = 224):
    """Stage pairs for a model pair, or the user error that says why there are none."""
    try:
        return pair_stages(find_stages(student, probe_size), find_stages(teacher, probe_size), min_stride=settings["min_stride"], pairs=settings["pairs"])
    except ValueError as e:
        raise UserError(f"method london: {e}", "set london.pairs in the recipe, or use --method kd") from None


class London(KD):
    def __init__(self, student, teacher, recipe, student_cfg, teacher_cfg):
        super().__init__(student, teacher, recipe, student_cfg, teacher_cfg)
        settings = recipe["london"]
        self.alpha = float(settings["alpha"])
        self.warmup_epochs = float(settings["warmup_epochs"])
        self.feature_weight = float(settings["feature_weight"])
        self.iterations = int(settings["iterations"])
        self.distance = settings["distance"]
        self.connect = settings["student_side"] == "connected"
        self.pairs = match_pairs(student, teacher, settings)
        n_matrices = len(self.pairs) - 1
        weights = settings["pair_weights"] or default_pair_weights(n_matrices)
        if len(weights) != n_matrices:
            raise UserError(f"london.pair_weights has {len(weights)} entries but there are {n_matrices} transmitting matrices", f"give {n_matrices} weights or leave it null")
        self.register_buffer("pair_weights", torch.tensor(weights, dtype=torch.float32), persistent=False)
        self.student_names = [s.name for s, _ in self.pairs]
        self.teacher_names = [t.name for _, t in self.pairs]
        used = self.connect or self.feature_weight
        self.connectors = nn.ModuleList(connector(s.channels, t.channels) for s, t in self.pairs) if used else None
        if used and not self.alpha and not self.feature_weight:
            # alpha = 0: no loss trains them (and DDP refuses parameters without gradient), but they
            # stay, BN statistics and all, so the run's connected gap can be measured as a baseline.
            self.connectors.requires_grad_(False)
        self.student_tap = FeatureTap(student, self.student_names)
        self.teacher_tap = FeatureTap(teacher, self.teacher_names)

    def describe(self) -> list[str]:
        return describe_pairs(self.pairs)

    def extras(self) -> nn.Module | None:
        return self.connectors

    def connected(self, student_features: list[torch.Tensor], teacher_features: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for conn, s, t in zip(self.connectors, student_features, teacher_features):
            s = conn(s)
            if s.shape[-2:] != t.shape[-2:]:  # odd input sizes can round strides differently
                s = F.adaptive_avg_pool2d(s, t.shape[-2:])
            out.append(s)
        return out

    def distill_losses(self, images, logits, targets):
        self.teacher_tap.clear()
        losses = super().distill_losses(images, logits, targets)  # runs the teacher (and its tap)
        teacher_features = [f.detach().float() for f in self.teacher_tap.get(self.teacher_names)]
        raw = [f.float() for f in self.student_tap.get(self.student_names)]
        self.student_tap.clear()
        self.teacher_tap.clear()
        connected = [f.float() for f in self.connected(raw, teacher_features)] if self.connect or self.feature_weight else None
        if self.alpha:
            # Through a connector, its BN divides out the student's feature scale: the term then
            # shapes the student's features but cannot reach their scale; raw reaches it directly.
            s_sigma = stage_sigmas(connected if self.connect else raw, self.iterations)
            with torch.no_grad():
                t_sigma = stage_sigmas(teacher_features, self.iterations)
            ramp = min(1.0, self.progress / self.warmup_epochs) if self.warmup_epochs > 0 else 1.0
            losses["lip"] = self.alpha * ramp * lipschitz_loss(s_sigma, t_sigma, self.pair_weights, self.distance)
            self.stats["lip_gap"] = (s_sigma.detach() - t_sigma).abs().mean(0)
        if self.feature_weight:
            losses["feat"] = self.feature_weight * sum(F.mse_loss(s, t) for s, t in zip(connected, teacher_features))
        return losses
