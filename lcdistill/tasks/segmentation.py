"""Semantic segmentation: VOC or images/masks data, torchvision/smp encoder-decoders, per-pixel
cross-entropy (+ 0.5 x the auxiliary head's), mIoU and pixel accuracy from a confusion matrix.

Data and its checks: lcdistill.data.segmentation. Models and their names: lcdistill.models.segmentation.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lcdistill.data.segmentation import SegmentationDataset, detect_layout, scan_segmentation
from lcdistill.models import params
from lcdistill.models.segmentation import SEGMENTATION
from lcdistill.tasks.base import ExportSpec, LogitView, Metric, Splits, Task, joint_datasets
from lcdistill.tasks.score_grid import MASKS, coarse_grid, score_grid

IGNORE = 255
AUX_WEIGHT = 0.5  # torchvision's references/segmentation/train.py: losses["out"] + 0.5 * losses["aux"]
# data.scale here is the shorter side's range x the input size, not the core's RandomResizedCrop area
# range: mild jitter (0.75-1.25, `make demo-seg`'s) lets a short run from scratch learn; the VOC recipes
# set torchvision's reference range, 0.5-2.0, themselves
SCALE = [0.75, 1.25]
# No flips by default: a flip teaches wrong labels where mirroring changes the class (a mirrored digit is
# another shape, as is text, or left and right in anatomy), while leaving it off for photographs only
# forgoes an augmentation. Measured on digit scenes (FPN resnet18 from scratch, 800 scenes, 6 epochs):
# 30.5 mIoU without flips, 18.8 with them at 0.5. Photographs (VOC, street scenes) want flips, and the
# VOC recipes set data.hflip 0.5 as torchvision's reference does; for your own photos --set data.hflip=0.5.
HFLIP = 0.0
# predictions collapsed: one class on this share of the labelled pixels or more
COLLAPSE_SHARE = 0.99


def resize_targets(targets: torch.Tensor, size) -> torch.Tensor:
    """Dense targets (N, H, W) at a prediction's spatial size (nearest neighbour when it differs)."""
    if tuple(targets.shape[-2:]) == tuple(size):
        return targets
    return F.interpolate(targets[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


def _to_size(logits: torch.Tensor, size) -> torch.Tensor:
    """Logits resized (bilinear) to a target's [H, W] when a model's output is smaller than its input."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


class ConfusionMatrix(Metric):
    """num_classes x num_classes int64 counts (rows: label, columns: prediction), pixels labelled 255
    left out, as torchvision's references/segmentation/utils.py keeps them.

    miou: the mean over classes of IoU = diag / (row + column - diag), in percent, over the classes
    present in the labels or the predictions (a class absent from both has no IoU); pixel_acc: the
    share of labelled pixels predicted right."""

    best = "miou"
    columns = (("mIoU %", "miou"), ("pixel acc %", "pixel_acc"))

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self.images = torch.zeros(1, dtype=torch.int64, device=device)

    def update(self, prediction: torch.Tensor, targets: torch.Tensor) -> None:
        if self.matrix.device != prediction.device:
            self.matrix, self.images = self.matrix.to(prediction.device), self.images.to(prediction.device)
        predicted = _to_size(prediction.float(), targets.shape[-2:]).argmax(1).flatten()
        labels = targets.flatten().long()
        keep = (labels >= 0) & (labels < self.num_classes)  # 255 (ignore) and anything else outside the classes
        n = self.num_classes
        self.matrix += torch.bincount(n * labels[keep] + predicted[keep], minlength=n * n).reshape(n, n)
        self.images += targets.shape[0]

    def sync(self, comm) -> None:
        comm.all_reduce(self.matrix)
        comm.all_reduce(self.images)

    def iou(self) -> torch.Tensor:
        """Per-class IoU in percent (NaN for a class absent from labels and predictions)."""
        h = self.matrix.double().cpu()
        diag = h.diag()
        union = h.sum(1) + h.sum(0) - diag
        return torch.where(union > 0, 100.0 * diag / union.clamp(min=1), torch.full_like(diag, float("nan")))

    def compute(self) -> dict[str, float]:
        h = self.matrix.double().cpu()
        iou = self.iou()
        present = ~iou.isnan()
        return {"miou": float(iou[present].mean()) if present.any() else 0.0,
                "pixel_acc": float(100.0 * h.diag().sum() / h.sum().clamp(min=1))}

    def per_class(self, classes: list[str] | None = None) -> dict[str, float | None]:
        """IoU per class name (None for a class absent from labels and predictions)."""
        names = classes or [str(k) for k in range(self.num_classes)]
        return {name: (None if v != v else float(v)) for name, v in zip(names, self.iou().tolist())}

    def details(self, classes: list[str]) -> dict:
        """What eval's JSON adds beside the columns."""
        return {"iou": self.per_class(classes)}

    def collapsed(self) -> str | None:
        """'class K predicted on 99.6% of labelled pixels' when one class takes COLLAPSE_SHARE or more of
        the labelled pixels' predictions while the labels give it less (else it is no sign of collapse)."""
        h = self.matrix.double().cpu()
        total = float(h.sum())
        if total == 0:
            return None
        predicted, labelled = h.sum(0) / total, h.sum(1) / total
        k = int(predicted.argmax())
        if predicted[k] < COLLAPSE_SHARE or labelled[k] >= COLLAPSE_SHARE:
            return None
        return f"class {k} predicted on {100 * predicted[k]:.1f}% of labelled pixels (its labels: {100 * labelled[k]:.1f}%)"

    @property
    def count(self) -> int:
        return int(self.images.item())


class DensePrediction(nn.Module):
    """The exported module: the full-resolution logits [N, classes, H, W] of a segmentation model.

    torchvision's models return {"out", "aux"}: only "out" is computed here (the auxiliary head trains,
    it is not shipped); an output smaller than the input is upsampled to it."""

    def __init__(self, model: nn.Module, upsample: bool):
        super().__init__()
        self.model, self.upsample = model, upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self.model
        if hasattr(model, "backbone") and hasattr(model, "classifier") and hasattr(model, "aux_classifier"):
            # torchvision's _SimpleSegmentationModel.forward without its auxiliary head
            out = model.classifier(model.backbone(x)["out"])
            return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        out = model(x)
        out = out["out"] if isinstance(out, dict) else out
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False) if self.upsample else out


class Segmentation(Task):
    name = "segmentation"
    export = ExportSpec(input_names=["input"], output_names=["logits"], dynamic_axes={0: "batch", 2: "height", 3: "width"}, unit="pixels")
    class_dim = 1
    offers = frozenset({"scores", "softmax", "dense", "probe"})
    hub_pipeline = "image-segmentation"
    model_hint = SEGMENTATION.hint
    recipe_defaults = {
        # The schedule `make demo-seg` found to train encoder-decoders from scratch (FPN resnet18 on digit
        # scenes: 56 mIoU in 5 epochs); the core's SGD at lr 0.05, batch 64 collapsed the README's example
        # to background (8 mIoU). The VOC recipes (recipes/seg_*.yaml) set torchvision's schedule themselves.
        "schedule": {"optimizer": "adamw", "lr": 0.008, "batch_size": 8, "weight_decay": 1e-4, "warmup_epochs": 1},
        "data": {"scale": SCALE, "hflip": HFLIP},
        # benchmarks/RESULTS.md, digit scenes, 8 seeds (2026-12-04): cwd 43.26 +- 1.04 mIoU, the strongest
        # (kd 32.34); cwd+london vs cwd -0.79 (se 0.72, 4 seeds up, 4 down): a cost just beyond its standard error
        "method": "cwd",
    }
    default_method_reason = "cwd measured strongest, +london cost 0.79 mIoU, just beyond its standard error (0.72), benchmarks/RESULTS.md"

    # ---- data ---------------------------------------------------------------------------
    def detect(self, root: Path) -> bool:
        return detect_layout(root) is not None

    def layout_hint(self) -> str:
        return ("VOC 2012 (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/{train,val}.txt) "
                "or train/images + train/masks (and val/ alike)")

    def scan(self, root, check: bool = True, skip_bad: bool = False) -> Splits:
        train, val = scan_segmentation(root, check=check, skip_bad=skip_bad)
        return Splits(train.classes, train, val, train.skipped + val.skipped)

    def datasets(self, splits: Splits, input_size: int, data_config: dict, recipe: dict, device: torch.device):
        return joint_datasets(SegmentationDataset, splits, input_size, recipe)

    def eval_dataset(self, split, meta: dict):
        return SegmentationDataset(split, int(meta["input_size"][-1]), False)

    # ---- training -----------------------------------------------------------------------
    def prediction(self, raw) -> torch.Tensor:
        return raw["out"] if isinstance(raw, dict) else raw

    def logit_view(self, prediction, targets) -> LogitView:
        labels = resize_targets(targets, prediction.shape[-2:])
        return LogitView(prediction, self.class_dim, labels, labels != IGNORE)

    def shipped_params(self, model: nn.Module) -> int:
        """A torchvision segmentation model's auxiliary head trains but is not exported."""
        aux = getattr(model, "aux_classifier", None)
        return params(model) - (params(aux) if isinstance(aux, nn.Module) else 0)

    def exportable(self, model: nn.Module) -> nn.Module:
        shape = _output_shape(model, self)
        return DensePrediction(model, upsample=shape is None or tuple(shape[-2:]) != (64, 64)).eval()

    def loss(self, raw, targets: torch.Tensor, settings: dict) -> torch.Tensor:
        smoothing = float(settings["label_smoothing"])

        def ce(logits):
            logits = _to_size(logits.float(), targets.shape[-2:])
            if not (targets != IGNORE).any():  # every pixel ignored: nothing to learn, not NaN
                return logits.sum() * 0.0
            return F.cross_entropy(logits, targets, ignore_index=IGNORE, label_smoothing=smoothing)

        loss = ce(self.prediction(raw))
        if isinstance(raw, dict) and raw.get("aux") is not None:
            loss = loss + AUX_WEIGHT * ce(raw["aux"])
        return loss

    def metric(self, num_classes: int) -> Metric:
        return ConfusionMatrix(num_classes)

    def checks(self, p) -> list[str]:
        """A student that scores the classes on a grid too coarse for the masks (score_grid)."""
        n, size = len(p.splits.classes), p.input_size
        grid = score_grid(self.exportable(p.student.model), size, n)
        if grid is None or size < 8 * min(grid):  # 1/4 of the input or finer: not the limit (74 mIoU on digit scenes at 64 px)
            return []
        val = SegmentationDataset(p.splits.val, size, False)
        picked = range(0, len(val), max(1, len(val) // MASKS))[:MASKS]
        masks = torch.stack([val[i][1] for i in picked]) if len(val) else None
        line = coarse_grid(p.student.origin, grid, size, masks, n) if masks is not None else None
        return [line] if line else []


@torch.no_grad()
def _output_shape(model: nn.Module, task: Segmentation, size: int = 64):
    """The prediction's shape for one random [1, 3, size, size] input (None when the forward fails)."""
    was = [(m, m.training) for m in model.modules()]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        model.eval()
        out = task.prediction(model(torch.zeros(1, 3, size, size, device=device)))
        return tuple(out.shape) if isinstance(out, torch.Tensor) else None
    except Exception:
        return None
    finally:
        for m, mode in was:
            m.training = mode
