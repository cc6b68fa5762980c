"""The seam between the package and what a task (classification, segmentation, ...) is.

Only a task touches what goes into a model and what comes out of it. The loop, the methods, evaluate
and export handle a `Batch` and the task's `Outputs` and never ask which task they run:

    batch = task.batch(item)                       # what the loader yields, as the task collated it
    out = task.forward(model, batch, stats, loss)  # prediction (for the metric), supervised losses,
                                                   # the logit view logit terms read
    metric.update(out.prediction, batch.targets); metric.sync(runtime); metric.compute()
    task.export.example(meta) / .compare(got, reference) / .agreement(got, reference)

A task also owns its model families (models.families, registered per task), its recipe defaults
(`recipe_defaults`, laid under the user's settings) and what its run files record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lcdistill import models
from lcdistill.data import normalize
from lcdistill.errors import UserError


@dataclass
class Batch:
    """One loader batch: images in [0, 1], the task's targets, and how many bad files each sample replaced."""

    images: Any  # [N, C, H, W] tensor (a task may hold a list of tensors)
    targets: Any
    skipped: torch.Tensor | None = None  # per sample (zeros when the loader says nothing)

    def __post_init__(self):
        if self.skipped is None:
            self.skipped = torch.zeros(len(self.images), dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.images)

    def to(self, device: torch.device, channels_last: bool = False) -> Batch:
        images, targets = move(self.images, device), move(self.targets, device)
        if channels_last and isinstance(images, torch.Tensor):
            images = images.contiguous(memory_format=torch.channels_last)
        return Batch(images, targets, self.skipped)


def move(obj, device: torch.device):
    """Tensors, and lists and dicts of them (a detector's images and targets), on device."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(move(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    return obj


@dataclass
class LogitView:
    """What logit terms (kd, dkd, dist, cwd) read of a prediction."""

    scores: torch.Tensor  # class scores along class_dim
    class_dim: int = 1
    labels: torch.Tensor | None = None  # the label of each sample or position, at the scores' size (dkd's gold class)
    valid: torch.Tensor | None = None  # which positions carry a label (None: all), at the scores' size
    kind: str = "softmax"  # how the scores become probabilities: softmax over the classes, or a sigmoid per class


@dataclass
class Outputs:
    """A model's forward pass as the task reads it."""

    prediction: Any  # what the metric reads
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # the supervised losses, unweighted (none without targets)
    logits: LogitView | None = None


class Metric:
    """Accumulate per batch, sync once over DDP ranks, compute to named values (percentages)."""

    best: str  # the value that picks the best checkpoint (higher is better)
    columns: tuple[tuple[str, str], ...]  # (table header, value name) for the values worth a column

    def update(self, prediction, targets) -> None:
        raise NotImplementedError

    def sync(self, comm) -> None:
        """Combine the ranks' states: comm.all_reduce(tensor) sums in place (counts), comm.all_gather(obj)
        returns every rank's object (detections, which must be gathered, not averaged)."""
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError

    def details(self, classes: list[str]) -> dict:
        """What eval's JSON adds beside the columns (per-class values)."""
        return {}

    def collapsed(self) -> str | None:
        """What shows the predictions collapsed (one class everywhere, accuracy at chance), as a short
        phrase for a warning, or None (also for a task that cannot tell)."""
        return None

    def guessing(self) -> str | None:
        """What shows the model finds its objects but guesses their classes (a detector whose labels on
        found boxes are near chance), as a short phrase for a warning, or None."""
        return None

    @property
    def count(self) -> int:
        """How many images were measured."""
        raise NotImplementedError

    @property
    def best_header(self) -> str:
        """The table header of the value `best` names, e.g. 'mIoU %'."""
        return dict((key, header) for header, key in self.columns)[self.best]

    def describe(self, values: dict[str, float]) -> str:
        """One short phrase for logs, e.g. 'top-1 97.21  top-5 99.72'."""
        return "  ".join(f"{header.removesuffix(' %')} {values[key]:.2f}" for header, key in self.columns)


def scaled_diff(got: torch.Tensor, reference: torch.Tensor) -> float:
    """Max |got - reference| as a fraction of the largest |reference| entry (absolute below 1): float32
    rounding grows with the scores' scale, and dense logits reach tens."""
    if got.shape != reference.shape or not torch.isfinite(got).all():  # nan would compare below any tolerance
        return float("inf")
    return (got - reference).abs().max().item() / max(1.0, reference.abs().max().item())


@dataclass
class ExportSpec:
    """How an exported file is called and checked: tensor names, which input axes are dynamic, an
    example input, how its output is compared with PyTorch's."""

    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[int, str]  # axis of the input -> its name (batch, height, width)
    unit: str = "images"  # what one int8 agreement counts: an image's class, or a pixel's
    legacy_onnx: bool = False  # export with torch.onnx's TorchScript-based exporter (torch.export cannot trace NMS)
    pt2: str = ""  # why torch.export cannot export this task's models ('' when it can)
    diff_text: str = "of the largest |logit|"  # what compare's number is, for export's lines
    agreement_text: str = "top-1 class agrees with PyTorch on"  # what agreement counts, for export's int8 line

    def check(self, x, meta: dict):
        """x as the float32 [N, C, H, W] batch the model was exported for, or a UserError saying what is off."""
        want = [int(v) for v in meta["input_size"]]
        shape = list(x.shape) if isinstance(x, torch.Tensor) else None
        fixed_ok = shape is not None and len(shape) == 4 and all(shape[i + 1] == w for i, w in enumerate(want) if i + 1 not in self.dynamic_axes)
        if not fixed_ok:
            got = f"shape {shape}" if shape is not None else f"a {type(x).__name__}"
            raise UserError(f"the model takes a [N, {', '.join(map(str, want))}] tensor, got {got}",
                            f"resize images to {want[1]}x{want[2]} with {want[0]} channels and stack them into one batch")
        if not x.is_floating_point():  # uint8 pixels would run (ONNX casts) and give silent garbage
            raise UserError(f"the model takes float input, got {x.dtype}", "scale to [0, 1] and normalise with the model's mean/std")
        return x.float()

    def call(self, run: Callable, x, meta: dict):
        """The prediction of an exported model (run: its call, the first output of several) on checked input x."""
        out = run(self.check(x, meta))
        return out[0] if isinstance(out, (list, tuple)) else out

    def parity_inputs(self, batch):
        """The inputs export parity is checked on: the batch, and its first image alone."""
        return [batch, batch[:1]]

    def calls(self, batch):
        """The inputs an export is called with for one batch, each image once: the batch itself, or one
        input per image for an export that takes one image (int8 calibration and agreement)."""
        return [batch]

    def example(self, meta: dict, batch: int = 2, device: torch.device | str = "cpu", generator: torch.Generator | None = None):
        """A random normalised input of `batch` images at the size meta records."""
        return torch.randn(batch, *meta["input_size"], device=device, generator=generator)

    def compare(self, got, reference) -> float:
        """How far an exported output is from PyTorch's, as a fraction (0: equal)."""
        return scaled_diff(got, reference)

    def agreement(self, got, reference) -> tuple[int, int]:
        """(agreeing, total) top-1 classes of an int8 output against PyTorch's."""
        want = reference.argmax(1)
        return int((got.argmax(1) == want).sum()), want.numel()


def joint_datasets(dataset, splits, input_size: int, recipe: dict):
    """(train set, val set) of a joint-transform dataset class (segmentation's, detection's): train
    augmented by the recipe's scale and flip and seeded by the run's seed, val resized only."""
    d = recipe["data"]
    scale = tuple(float(v) for v in d["scale"])
    train = dataset(splits.train, input_size, True, recipe["train"]["seed"], scale, float(d["hflip"]), d["skip_bad_images"])
    return train, dataset(splits.val, input_size, False, skip_bad=d["skip_bad_images"])


@dataclass
class Splits:
    """What a task's scan returns: the class names and the two splits (task-specific sample lists)."""

    classes: list[str]
    train: Any
    val: Any
    skipped: list[str] = field(default_factory=list)  # unreadable files left out (--skip-bad-images)
    report: str = ""  # what the scan found and did, a line for the run's header (kept background images, clipped boxes)


class Task:
    """What differs between tasks. Subclasses are stateless: one instance serves a whole run."""

    name: str
    export: ExportSpec
    # what method terms may read (Term.needs): class scores (softmax-normalised), per-position (dense)
    # predictions, feature-pyramid levels, stages found by probing with one image tensor
    offers: frozenset[str] = frozenset({"scores", "softmax", "probe"})
    hub_pipeline: str = ""  # the Hub's pipeline tag for a model card
    recipe_defaults: dict = {}  # recipe values this task sets differently from the core's (laid under the user's)
    model_hint: str = ""  # the models to pass when one of another task is named (its families' hint)

    # ---- data ---------------------------------------------------------------------------
    def detect(self, root: Path) -> bool:
        """Whether root is laid out for this task (for --task auto)."""
        raise NotImplementedError

    def layout_hint(self) -> str:
        """The layout this task reads, for error messages."""
        raise NotImplementedError

    def scan(self, root: str | Path, check: bool = True, skip_bad: bool = False) -> Splits:
        raise NotImplementedError

    def datasets(self, splits: Splits, input_size: int, data_config: dict, recipe: dict, device: torch.device):
        """(train set, val set) yielding (image in [0, 1], target, skipped attempts)."""
        raise NotImplementedError

    def eval_dataset(self, split, meta: dict):
        """A split (splits.val, or splits.train for int8 calibration) prepared as a model recorded in
        meta (its size, crop, interpolation) wants it at eval time."""
        raise NotImplementedError

    def image_transform(self, meta: dict) -> Callable:
        """One PIL image -> a float [3, H, W] tensor in [0, 1], as eval_dataset prepares images for a model recorded
        in meta (lcdistill.load's predict): here resized to the input size."""
        from torchvision.transforms import v2

        side = int(meta["input_size"][-1])
        return v2.Compose([v2.ToImage(), v2.Resize((side, side), antialias=True), v2.ToDtype(torch.float32, scale=True)])

    def batch(self, item) -> Batch:
        """A loader's item (images, targets, skipped) as a Batch."""
        return item if isinstance(item, Batch) else Batch(*item)

    # ---- models -------------------------------------------------------------------------
    def resolve(self, spec: str, num_classes: int, role: str = "model", **kwargs):
        """A teacher or student by name, run folder or weights file (models.Loaded); a model of
        another task is refused in one line naming it and the fix."""
        if not Path(spec).exists() and models.parse(spec, self.name) is None:
            other = models.parse(spec)
            if other is not None:
                raise UserError(f"{role} {spec} is a {other[0].task} model, but the data is for {self.name}", self.refusal_fix(role))
        loaded = models.resolve(spec, num_classes, task=self.name, **kwargs)
        task = (loaded.meta or {}).get("task")
        if task is not None and task != self.name:
            raise UserError(f"{role} {loaded.origin} is a {task} run, but the data is for {self.name}", self.refusal_fix(role))
        return loaded

    def refusal_fix(self, role: str) -> str:
        return f"pass a {self.name} {role} ({self.model_hint}), or a run of `lcdistill train --model NAME --data DIR` on this data"

    def configure(self, loaded, input_size: int) -> None:
        """Fit a resolved model (models.Loaded) to the input size the run trains at (a detector's own resize)."""

    def quantization_aware(self, model: nn.Module) -> str | None:
        """Why --quantize int8 cannot train model (lcdistill.quantize), or None where it can."""
        return None

    def checks(self, p) -> list[str]:
        """Warning lines (guardrails) this task adds for a prepared run (lcdistill.run.Prepared)."""
        return []

    def feature_levels(self, model: nn.Module) -> list[tuple[str, int]]:
        """(module path, channels) of the feature maps a feature-pyramid term (pkd) may tap, shallow to deep."""
        return []

    def logit_kind(self, model: nn.Module) -> str | None:
        """How model's logit view scores classes (softmax, sigmoid), None when it has none to distil one to one."""
        return "softmax"

    # ---- one forward pass ---------------------------------------------------------------
    class_dim: int = 1  # the class dimension of the prediction tensor, for logit terms

    def inputs(self, batch: Batch, mean, std):
        """What goes into a model fed with mean/std: the normalised images."""
        return normalize(batch.images, mean, std)

    def prediction(self, raw: Any):
        """The prediction (what the metric and an export read) from a model's raw output."""
        return raw

    def loss(self, raw: Any, targets, settings: dict) -> torch.Tensor:
        """The supervised loss of a raw model output (recipe section `loss` in settings)."""
        raise NotImplementedError

    def loss_name(self) -> str:
        return "ce"

    def logit_view(self, prediction, targets) -> LogitView:
        return LogitView(prediction, self.class_dim, targets)

    def forward(self, model: nn.Module, batch: Batch, stats, settings: dict | None = None, predict: bool = True) -> Outputs:
        """model on the batch (fed with stats = (mean, std)): its prediction, and with loss settings and
        targets its supervised losses and logit view. predict=False: only what terms read (a teacher's
        logit view and tapped features) is needed, and a task may skip the rest (a detector's NMS)."""
        raw = model(self.inputs(batch, *stats))
        prediction = self.prediction(raw)
        if settings is None or batch.targets is None:  # a teacher's pass, or inference: the scores alone
            return Outputs(prediction, {}, LogitView(prediction, self.class_dim))
        losses = {self.loss_name(): self.loss(raw, batch.targets, settings)}
        return Outputs(prediction, losses, self.logit_view(prediction, batch.targets))

    attackable: bool = True  # FGSM can ascend attack_loss (a detector's loss needs training mode: noise rows only)

    def attack_loss(self, prediction, targets) -> torch.Tensor:
        """The loss FGSM ascends (robustness): the plain supervised loss of a prediction."""
        return self.loss(prediction, targets, {"label_smoothing": 0.0})

    def predictor(self, model: nn.Module) -> Callable:
        """What inputs() gives -> prediction, for a PyTorch model."""
        return lambda x: self.prediction(model(x))

    def exportable(self, model: nn.Module) -> nn.Module:
        """The module to export and measure: one whose output is the prediction."""
        return model

    def shipped_params(self, model: nn.Module) -> int:
        """Parameters of what an export holds."""
        return models.params(model)

    def metric(self, num_classes: int) -> Metric:
        raise NotImplementedError

    # ---- what a run and its files record ------------------------------------------------
    def metadata(self, classes: list[str]) -> dict:
        """Task fields of student.json and of exported files' metadata."""
        return {"task": self.name, "classes": classes}
