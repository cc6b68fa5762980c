"""Distiller and Term: a method is the task's supervised loss plus a sum of named terms.

Distiller(student, teacher, task, terms).forward(batch) -> (student outputs, {"ce": .., "kd": .., "lip": ..});
the task runs each model on the batch (tasks.base.Outputs), the trainer sums the dict and knows
nothing of any term. The teacher is held, not registered: it is
never trained, saved in checkpoints, moved by the optimizer or wrapped by DDP, so the distiller's
own parameters are exactly what trains (the student, then each term's extras such as connectors).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lcdistill.errors import UserError
from lcdistill.models.taps import FeatureTap
from lcdistill.tasks import Batch, LogitView, Outputs


@dataclass
class Step:
    """What one training step offers the terms."""

    student: LogitView  # the student's class scores (and which positions carry a label), as the task gives them
    teacher: LogitView | None  # the teacher's, computed without gradient
    batch_size: int
    progress: float  # epochs done (fractional): for loss warm-ups
    student_features: dict[str, torch.Tensor] = field(default_factory=dict)  # tapped module outputs by path
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)  # what a term leaves for the terms after it (ofd's maps)


@dataclass
class Context:
    """What a term may look at when it is built."""

    student: nn.Module
    teacher: nn.Module | None
    task: Any  # what it offers the terms (Task.offers), its feature levels and logit kinds
    input_size: int | None = None  # square side the student is trained at (None: not known)
    peers: dict[str, Any] = field(default_factory=dict)  # the method's terms built so far, by name


class Term(nn.Module):
    """One named loss term of a method, in one file under methods/.

    A term declares its recipe section and its defaults (recipe defaults are built from them),
    checks its own section, and receives only that section."""

    name: str  # as written in --method
    section: str  # recipe section it reads
    defaults: dict
    paper: str = ""
    summary: str = ""
    needs_teacher = True
    logit = False  # a logit term (kd, dkd, dist): at most one per method
    after: tuple[str, ...] = ()  # terms whose shared work this one reads: built and run after them
    warmup_key: str | None = None  # the key of its section that ramps it in over epochs (guardrails check it against the run's)
    needs: frozenset[str] = frozenset()  # what a task must offer for this term (Task.offers: scores, softmax, dense, pyramid, probe)

    def __init__(self, settings: dict, ctx: Context):
        super().__init__()
        self.settings = settings
        self.stats: dict[str, torch.Tensor] = {}  # detached diagnostics of the last step, logged per epoch

    @classmethod
    def serves(cls, task) -> bool:
        """Whether the term applies to a task's models (what it needs, the task offers)."""
        return cls.needs <= task.offers

    @classmethod
    def validate(cls, settings: dict) -> None:
        """Raise UserError naming the key and the fix."""

    @classmethod
    def check_numbers(cls, settings: dict, at_least_zero: tuple[str, ...] = (), above_zero: tuple[str, ...] = ()) -> None:
        """The one check of a term's numeric keys: a number >= 0 (weights, warm-ups) or > 0 (temperatures)."""
        for key in (*at_least_zero, *above_zero):
            v, positive = settings[key], key in above_zero
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (positive and v == 0):
                raise UserError(f"{cls.section}.{key} must be a number {'> 0' if positive else '>= 0'}, got {v!r}",
                                f"pass --set {cls.section}.{key}={cls.defaults[key]}")

    def matching_levels(self, ctx: Context) -> tuple[list[str], list[str]]:
        """(student paths, teacher paths) of the task's feature-pyramid levels (Task.feature_levels), which
        must match level for level in channels; else the one-line error naming this term."""
        student, teacher = ctx.task.feature_levels(ctx.student), ctx.task.feature_levels(ctx.teacher)
        if not student or [c for _, c in student] != [c for _, c in teacher]:
            raise UserError(f"method {self.name} needs matching feature-pyramid levels in student and teacher, and this {ctx.task.name} "
                            f"pair has {len(student)} and {len(teacher)}",
                            "pair detectors with an FPN of the same channels (det:FCOS:..., tv:fcos_resnet50_fpn), or use kd or london")
        return [p for p, _ in student], [p for p, _ in teacher]

    def student_taps(self) -> list[str]:
        """Module paths of the student whose outputs the term reads."""
        return []

    def teacher_taps(self) -> list[str]:
        return []

    def trains(self) -> bool:
        """Whether a loss reaches this term's own parameters (if it has any)."""
        return True

    def describe(self) -> list[str]:
        """Lines printed at the start of a run (e.g. "pair stride 8: ..." for each stage pair)."""
        return []

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class Distiller(nn.Module):
    def __init__(self, student: nn.Module, teacher: nn.Module | None, task, terms: list[Term], loss: dict,
                 student_cfg: dict, teacher_cfg: dict | None):
        super().__init__()
        self.student = student
        self.terms = nn.ModuleList(terms)
        object.__setattr__(self, "teacher", teacher)  # held, not registered (see the module doc)
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        for term in terms:
            if not term.trains():
                term.requires_grad_(False)  # kept (BN statistics and all) but trained by no loss
        self.task = task
        self.ce_weight = float(loss["ce"])
        self.loss_settings = loss
        self.student_stats = (student_cfg["mean"], student_cfg["std"])
        self.teacher_stats = (teacher_cfg["mean"], teacher_cfg["std"]) if teacher_cfg else None
        self.progress = 0.0  # epochs done (fractional), set by the trainer before each step
        self._taps = None  # (student tap, teacher tap), hooked at the first training step

    def taps(self):
        """Forward hooks on the module paths the terms read; a distiller built only to load a run's
        method state (lcdistill lipschitz) never trains, so never hooks the models."""
        if self._taps is None:
            hook = lambda model, names: FeatureTap(model, names) if names else None  # noqa: E731
            self._taps = (hook(self.student, [n for t in self.terms for n in t.student_taps()]),
                          hook(self.teacher, [n for t in self.terms for n in t.teacher_taps()]))
        return self._taps

    def _apply(self, fn, *args, **kwargs):
        # .to(device), .to(memory_format=...) and friends move the held teacher too
        super()._apply(fn, *args, **kwargs)
        if self.teacher is not None:
            self.teacher._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # a teacher's BN statistics must not drift (the authors' code let them)
        return self

    @property
    def stats(self) -> dict[str, torch.Tensor]:
        return {k: v for term in self.terms for k, v in term.stats.items()}

    def term(self, name: str) -> Term | None:
        return next((t for t in self.terms if t.name == name), None)

    def describe(self) -> list[str]:
        return [line for term in self.terms for line in term.describe()]

    # ---- method state: the terms' own modules (connectors), saved beside the student ------
    def method_state(self) -> dict[str, torch.Tensor]:
        return {f"{t.name}.{k}": v for t in self.terms for k, v in t.state_dict().items()}

    def load_method_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load the terms' modules; a state of other shape (another version's or recipe's term) is a UserError."""
        for t in self.terms:
            own = {k.removeprefix(f"{t.name}."): v for k, v in state.items() if k.startswith(f"{t.name}.")}
            try:
                t.load_state_dict(own)
            except RuntimeError:  # missing, unexpected or resized keys: torch's message is a page long
                raise UserError(f"the checkpoint's {t.name} state does not fit this {t.name} term (its connectors differ): "
                                "it was written by another lcdistill version or recipe",
                                "start the run again, or finish it with the lcdistill version that began it") from None

    # ---- one step -----------------------------------------------------------------------
    def forward(self, batch: Batch) -> tuple[Outputs, dict[str, torch.Tensor]]:
        """The student's outputs and the method's named losses (none for a batch without targets)."""
        training = batch.targets is not None
        student_tap, teacher_tap = self.taps() if training else (None, None)
        out = self.task.forward(self.student, batch, self.student_stats, self.loss_settings if training else None)
        losses = {name: self.ce_weight * value for name, value in out.losses.items()}
        if not training or not self.terms:
            return out, losses
        teacher = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher = self.task.forward(self.teacher, batch, self.teacher_stats, predict=False).logits
        step = Step(out.logits, teacher, len(batch), self.progress, self._features(student_tap), self._features(teacher_tap))
        for term in self.terms:
            losses.update(term(step))
        return out, losses

    @staticmethod
    def _features(tap) -> dict[str, torch.Tensor]:
        """The step's tapped outputs, handed over once: the tap keeps no activations across steps."""
        if tap is None:
            return {}
        features = dict(zip(tap.names, tap.get()))
        tap.clear()
        return features
