"""LONDON: Lipschitz continuity guided KD (Shang et al., ICCV 2021).

Stage outputs of student and teacher are tapped with forward hooks and paired by
stride. For each pair of consecutive stages the transmitting matrix's spectral
norm (power iteration, differentiable) is compared between the two networks, on
the student's maps after 1x1 conv + BN connectors to the teacher's channel count
(as the authors do), or on the student's own maps (london.student_side: raw).
The term adds alpha * L_lip (+ an optional feature MSE); `--method london` is ce + kd + this term.
With ofd in the method (`ofd+london`, the paper's LONDON) the term uses OFD's stage pairs and its
pre-ReLU maps (the student's through OFD's connectors) from Step.shared, as the authors' code does,
and has no taps or connectors of its own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lcdistill.errors import UserError
from lcdistill.lipschitz import default_pair_weights, lipschitz_loss, stage_sigmas
from lcdistill.lipschitz.tm import ITERATIONS
from lcdistill.methods.base import Term
from lcdistill.models.stages import describe_pairs, find_stages, pair_stages


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


def map_side(input_size: int | None, *strides: int) -> int | None:
    """Side of a stage map at this input size (convolutions pad, so sides round up); None when unknown."""
    return None if input_size is None else min(math.ceil(input_size / stride) for stride in strides)


class London(Term):
    name = section = "london"
    warmup_key = "warmup_epochs"
    defaults = {
        "alpha": 1.0,  # weight of the Lipschitz term
        "warmup_epochs": 3,  # ramp the term's weight linearly from 0 to alpha over the first epochs (0: full weight from the start)
        "distance": "log_mse",  # log_mse (default, scale-free) | mse (authors') | relative
        "student_side": "connected",  # connected: through the connectors (authors') | raw: the student's own stage maps
        "iterations": ITERATIONS,  # power-iteration steps for each spectral norm
        "scale_free": False,  # L2-normalise each position's channel vector before the product (sigma <= 1)
        "min_positions": 4,  # leave out a transmitting matrix whose smaller map has fewer positions (1x1: rank 1)
        "min_stride": 4,  # stages with a smaller stride are not paired
        "pairs": None,  # [[student_module, teacher_module], ...] to set the pairing by hand
        "pair_weights": None,  # one weight per transmitting matrix used; default the authors' 1/2^(M-i), deepest 1/2
        "feature_weight": 0.0,  # optional MSE between connected student and teacher features
    }
    paper = "Shang et al., Lipschitz Continuity Guided Knowledge Distillation, ICCV 2021"
    summary = "match per-stage transmitting-matrix spectral norms (Lipschitz estimates) of student and teacher (on ofd's pre-ReLU maps with ofd)"
    after = ("ofd",)

    @classmethod
    def validate(cls, settings: dict) -> None:
        cls.check_numbers(settings, at_least_zero=("alpha", "warmup_epochs", "min_positions"), above_zero=("iterations",))
        if not isinstance(settings["scale_free"], bool):
            raise UserError(f"london.scale_free must be true or false, got {settings['scale_free']!r}", "pass --set london.scale_free=true")
        if settings["student_side"] not in ("raw", "connected"):
            raise UserError(f"unknown london.student_side '{settings['student_side']}'", "choose raw or connected")
        if settings["distance"] not in ("log_mse", "mse", "relative"):
            raise UserError(f"unknown london.distance '{settings['distance']}'", "choose log_mse, mse or relative")

    def __init__(self, settings, ctx):
        super().__init__(settings, ctx)
        self.alpha = float(settings["alpha"])
        self.warmup_epochs = float(settings["warmup_epochs"])
        self.feature_weight = float(settings["feature_weight"])
        self.iterations = int(settings["iterations"])
        self.scale_free = bool(settings["scale_free"])
        self.distance = settings["distance"]
        self.connect = settings["student_side"] == "connected"
        ofd = ctx.peers.get("ofd")
        self.shared = ofd is not None  # on ofd's pairs and maps (ofd+london)
        self.pairs = ofd.pairs if self.shared else match_pairs(ctx.student, ctx.teacher, settings)
        self.sides = [map_side(ctx.input_size, s.real_stride, t.real_stride) for s, t in self.pairs]  # dilation keeps maps larger
        # TM i joins pairs i and i+1 on the smaller (deeper) map; one position makes it rank 1 and
        # its sigma a mere product of feature norms, so such a matrix is left out.
        self.matrices = [i for i in range(len(self.pairs) - 1)
                         if self.sides[i + 1] is None or self.sides[i + 1] ** 2 >= settings["min_positions"]]
        if not self.matrices:
            raise UserError(f"method london: every transmitting matrix has fewer than london.min_positions={settings['min_positions']} "
                            f"positions at {ctx.input_size} px", "train at a larger --input-size, or lower london.min_positions")
        gap = next((i for i in range(max(self.matrices)) if i not in self.matrices), None)
        if gap is not None:  # maps shrink with depth, so only hand-set pairs out of depth order leave out a middle matrix
            raise UserError(f"method london: the transmitting matrix between pairs {gap + 1} and {gap + 2} is left out (a map of "
                            f"{self.sides[gap + 1] ** 2} position(s)) but a later one is kept: london.pairs are not in depth order",
                            "list london.pairs from shallow to deep, or set london.min_positions=1")
        n_matrices = len(self.matrices)
        weights = settings["pair_weights"] or default_pair_weights(n_matrices)
        if len(weights) != n_matrices:
            raise UserError(f"london.pair_weights has {len(weights)} entries but {n_matrices} transmitting matrices are used", f"give {n_matrices} weights or leave it null")
        self.register_buffer("pair_weights", torch.tensor(weights, dtype=torch.float32), persistent=False)
        self.input_size, self.min_positions = ctx.input_size, settings["min_positions"]
        # Left-out matrices are the deepest (maps shrink with depth): a pair no kept matrix (nor the
        # feature loss) reads is not tapped and gets no connector, whose parameters would get no
        # gradient (DDP refuses those).
        used_pairs = len(self.pairs) if self.feature_weight else max(self.matrices) + 2
        self.student_names = [s.name for s, _ in self.pairs[:used_pairs]]
        self.teacher_names = [t.name for _, t in self.pairs[:used_pairs]]
        used = (self.connect or self.feature_weight) and not self.shared
        if self.shared and ((self.alpha and self.connect) or self.feature_weight):
            ofd.feeds = True  # ofd's connectors train through this term even at ofd.weight 0
        # At alpha = 0 (and no feature loss) the connectors still run, BN statistics and all, so
        # the run's connected gap can be measured as a baseline; trains() keeps them frozen.
        self.connectors = nn.ModuleList(connector(s.channels, t.channels) for s, t in self.pairs[:used_pairs]) if used else None

    def student_taps(self) -> list[str]:
        return [] if self.shared else self.student_names

    def teacher_taps(self) -> list[str]:
        return [] if self.shared else self.teacher_names

    def trains(self) -> bool:
        return bool(self.alpha or self.feature_weight)

    def left_out(self, i: int) -> str | None:
        """Why transmitting matrix i (stage pair i -> i + 1) is not matched, or None when it is."""
        if i in self.matrices:
            return None
        return f"{self.sides[i + 1] ** 2} position(s) < london.min_positions {self.min_positions}"

    def describe(self) -> list[str]:
        lines = [] if self.shared else [f"pair {line}" for line in describe_pairs(self.pairs)]  # with ofd: ofd describes them
        weight = dict(zip(self.matrices, self.pair_weights.tolist()))
        for i in range(len(self.pairs) - 1):
            where = f"transmitting matrix stride {self.pairs[i][1].stride} -> {self.pairs[i + 1][1].stride}"
            side = self.sides[i + 1]
            at = f" ({side}x{side} map at {self.input_size} px)" if side is not None else ""
            lines.append(f"{where}{at}: weight {weight[i]:g}" if i in weight
                         else f"{where}{at}: left out, {self.left_out(i)}")
        return lines

    def connected(self, student_features: list[torch.Tensor], teacher_features: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for conn, s, t in zip(self.connectors, student_features, teacher_features):
            s = conn(s)
            if s.shape[-2:] != t.shape[-2:]:  # odd input sizes can round strides differently
                s = F.adaptive_avg_pool2d(s, t.shape[-2:])
            out.append(s)
        return out

    def forward(self, step):
        losses = {}
        if self.shared:
            maps = step.shared["ofd"]
            teacher_features, raw, connected = maps["teacher"], maps["raw"], maps["student"]
        else:
            teacher_features = [step.teacher_features[n].detach().float() for n in self.teacher_names]
            raw = [step.student_features[n].float() for n in self.student_names]
            connected = [f.float() for f in self.connected(raw, teacher_features)] if self.connect or self.feature_weight else None
        if self.alpha:
            # Through a connector, its BN divides out the student's feature scale: the term then
            # shapes the student's features but cannot reach their scale; raw reaches it directly.
            s_sigma = stage_sigmas(connected if self.connect else raw, self.iterations, self.scale_free, self.matrices)
            with torch.no_grad():
                t_sigma = stage_sigmas(teacher_features, self.iterations, self.scale_free, self.matrices)
            ramp = min(1.0, step.progress / self.warmup_epochs) if self.warmup_epochs > 0 else 1.0
            losses["lip"] = self.alpha * ramp * lipschitz_loss(s_sigma, t_sigma, self.pair_weights, self.distance)
            self.stats["lip_gap"] = (s_sigma.detach() - t_sigma).abs().mean(0)
        if self.feature_weight:
            losses["feat"] = self.feature_weight * sum(F.mse_loss(s, t) for s, t in zip(connected, teacher_features))
        return losses
