"""Object detection: VOC, COCO or YOLO data, torchvision detectors (their own loss dict), COCO mAP by
torchmetrics, exports that run NMS inside.

Data and its checks: lcdistill.data.detection. Models and their names: lcdistill.models.detection.
A detector normalises and resizes inside (its transform, set to the recipe's input size), so what goes
into it is the batch's list of [0, 1] images; in training it returns its losses, in eval its detections.
Teacher and student get the same list, and both transforms resize it the same way: they see the same
tensor. The logit view of a dense head (FCOS, RetinaNet) is its classification logits per location and
anchor, [N, locations x anchors, classes], scored by a sigmoid per class.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.ops import box_iou

from lcdistill.data.detection import DetectionDataset, detect_layout, longer_side, scan_detection
from lcdistill.errors import UserError
from lcdistill.models.detection import DETECTORS, background_offset, dense_head, set_input_size
from lcdistill.tasks.base import Batch, ExportSpec, LogitView, Metric, Outputs, Splits, Task, joint_datasets

# data.scale: the longer side x this range (torchvision references/detection's scale jitter is 0.5-2.0; the mild
# 0.75-1.25 of `make demo-det` lets a short run from scratch learn). No flips by default, as segmentation, for the
# same reason: a mirrored digit (or text) is another shape; for photographs --set data.hflip=0.5.
SCALE = [0.75, 1.25]
HFLIP = 0.0


def _ignored(target: dict) -> torch.Tensor:
    """Which boxes of a target are marked ignore (crowd, difficult); none when a caller's target has no "ignore"
    (torchvision's detection targets: boxes and labels only)."""
    ignore = target.get("ignore")
    return _plain(ignore).bool() if ignore is not None else torch.zeros(len(target["labels"]), dtype=torch.bool, device=target["labels"].device)


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(torch.Tensor)  # tv_tensors.BoundingBoxes / Image as plain tensors


class MeanAP(Metric):
    """COCO mAP@[.5:.95], AP50 and AP75 in percent by torchmetrics' MeanAveragePrecision (faster-coco-eval
    backend), ignored boxes (VOC difficult, COCO crowd) passed as crowd regions. Detections are kept per
    image and gathered from every DDP rank before computing: an average of per-rank mAPs is not the mAP."""

    best = "map"
    # AP50 with every label set to one class (boxes alone), and the share of the val boxes found at IoU > 0.5
    # whose best-scored detection names the right class: a detector that finds boxes but guesses their
    # classes shows a high "AP50 any" beside a low AP50, and "labels right" near chance
    columns = (("mAP %", "map"), ("AP50 %", "map_50"), ("AP75 %", "map_75"), ("AP50 any %", "map_50_any"), ("labels right %", "labels_right"))

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.preds: list[dict] = []
        self.targets: list[dict] = []
        self._result = None

    def update(self, prediction, targets) -> None:
        for p, t in zip(prediction, targets):
            self.preds.append({k: _plain(p[k]).detach().float().cpu() if k != "labels" else _plain(p[k]).cpu().long() for k in ("boxes", "scores", "labels")})
            self.targets.append({"boxes": _plain(t["boxes"]).float().cpu(), "labels": _plain(t["labels"]).cpu().long(),
                                 "iscrowd": _ignored(t).cpu().long()})
        self._result = None

    def sync(self, comm) -> None:
        gathered = comm.all_gather((self.preds, self.targets))
        self.preds = [p for preds, _ in gathered for p in preds]
        self.targets = [t for _, targets in gathered for t in targets]
        self._result = None

    def result(self) -> dict:
        if self._result is None:
            from torchmetrics.detection import MeanAveragePrecision

            metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True, backend="faster_coco_eval")
            metric.update(self.preds, self.targets)
            self._result = metric.compute()
            anyclass = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", iou_thresholds=[0.5], backend="faster_coco_eval")
            anyclass.update([{**p, "labels": torch.zeros_like(p["labels"])} for p in self.preds],
                            [{**t, "labels": torch.zeros_like(t["labels"])} for t in self.targets])
            self._result["map_50_any"] = anyclass.compute()["map"]
            self._result["labels"] = labels_right(self.preds, self.targets)
        return self._result

    def compute(self) -> dict[str, float]:
        if not self.targets:
            return {"map": 0.0, "map_50": 0.0, "map_75": 0.0, "map_50_any": 0.0, "labels_right": 0.0}
        r = self.result()
        right, found = r["labels"]
        values = {k: max(0.0, 100.0 * float(r[k])) for k in ("map", "map_50", "map_75", "map_50_any")}  # -1: nothing to score
        return {**values, "labels_right": 100.0 * right / max(found, 1)}

    def guessing(self) -> str | None:
        """The labels on found boxes are near chance (under twice chance, and under halfway from chance to
        all right): the detector localises but does not tell its classes apart."""
        if not self.targets or self.num_classes < 2:
            return None
        found = self.result()["labels"][1]
        chance = 100.0 / self.num_classes
        share = self.compute()["labels_right"]
        if found < 20 or share >= min(2 * chance, (100 + chance) / 2):
            return None
        return f"the label is right on {share:.0f}% of the {found} val boxes it finds (chance: {chance:.0f}%)"

    def details(self, classes: list[str]) -> dict:
        if not self.targets:
            return {}
        r = self.result()
        per = dict(zip(r["classes"].reshape(-1).tolist(), r["map_per_class"].reshape(-1).tolist()))
        return {"ap": {name: (100.0 * per[k] if per.get(k, -1) >= 0 else None) for k, name in enumerate(classes)}}

    def collapsed(self) -> str | None:
        """No image got a detection above the detector's score threshold: the head scores every location as background."""
        if self.targets and not any(len(p["scores"]) for p in self.preds):
            return f"no detection above the score threshold on {len(self.preds)} val images"
        return None

    @property
    def count(self) -> int:
        return len(self.targets)


def labels_right(preds: list[dict], targets: list[dict], iou: float = 0.5) -> tuple[int, int]:
    """(val boxes whose best-scored detection at IoU > iou, of any label, has the right label; val boxes
    found at all), ignored boxes left out."""
    right = found = 0
    for p, t in zip(preds, targets):
        keep = ~t["iscrowd"].bool() if "iscrowd" in t else torch.ones(len(t["labels"]), dtype=torch.bool)
        boxes, labels = t["boxes"][keep], t["labels"][keep]
        if not len(boxes) or not len(p["boxes"]):
            continue
        overlap = box_iou(boxes, p["boxes"]) > iou  # [gt, pred]
        scored = torch.where(overlap, p["scores"][None, :], torch.full_like(overlap, -1.0, dtype=p["scores"].dtype))
        best = scored.argmax(1)
        hit = overlap.any(1)
        found += int(hit.sum())
        right += int((p["labels"][best] == labels)[hit].sum())
    return right, found


class DetectorExport(nn.Module):
    """The exported module: one image [1, 3, H, W] in [0, 1] -> (boxes [K, 4] XYXY pixels, scores [K],
    labels [K] indexing the classes), after the detector's own NMS.

    The detector runs with its score threshold at 0 and the threshold is applied after NMS: a tracer
    follows one input's path, and where no candidate passes the threshold torchvision returns early and
    the traced graph would hold no NMS at all. The result is the same set: a box under the threshold
    only suppresses boxes scored lower still, and the per-image cap keeps the best-scored."""

    def __init__(self, model: nn.Module, offset: int):
        super().__init__()
        self.model, self.offset = model, offset
        self.holder = model.roi_heads if hasattr(model, "roi_heads") else model  # where score_thresh lives

    def forward(self, x: torch.Tensor):
        thresh = self.holder.score_thresh
        self.holder.score_thresh = 0.0
        try:
            out = self.model(list(x))[0]
        finally:
            self.holder.score_thresh = thresh
        keep = out["scores"] > thresh
        return out["boxes"][keep], out["scores"][keep], out["labels"][keep] - self.offset


OUTPUTS = ("boxes", "scores", "labels")


class DetectionExport(ExportSpec):
    """Batch 1 (detectors' exports with NMS take one image), dynamic height and width; outputs compared
    as matched sets: each reference box needs an exported box of its label with IoU >= 0.99."""

    def example(self, meta: dict, batch: int = 1, device="cpu", generator=None):
        return torch.rand(batch, *meta["input_size"], device=device, generator=generator)

    def check(self, x, meta: dict):
        if isinstance(x, torch.Tensor) and x.dim() == 3:
            x = x[None]
        if not isinstance(x, (list, tuple, torch.Tensor)) or any(not isinstance(i, torch.Tensor) or i.dim() != 3 for i in x):
            raise UserError(f"the detector takes [3, H, W] images in [0, 1], got {type(x).__name__}", "pass a list of [3, H, W] float images")
        return [i.float() for i in x]

    def call(self, run, x, meta: dict):
        return [dict(zip(("boxes", "scores", "labels"), (o.reshape(-1, 4) if k == 0 else o.reshape(-1) for k, o in enumerate(run(img[None])))))
                for img in self.check(x, meta)]

    def parity_inputs(self, batch):
        return [img[None] for img in batch[:4]]

    def calls(self, batch):
        return [img[None] for img in batch]

    def compare(self, got, reference) -> float:
        """0 when every reference detection has an exported one of its label with box IoU >= 0.99 and a score
        within 1e-3 (and the counts match); else the worst of 1 - IoU and the score difference; inf on a mismatch."""
        (gb, gs, gl), (rb, rs, rl) = [tuple(torch.as_tensor(o).float() for o in out) for out in (got, reference)]
        if len(gb) != len(rb) or not torch.isfinite(gb).all():
            return float("inf")
        if len(rb) == 0:
            return 0.0
        iou = box_iou(rb, gb) * (rl[:, None] == gl[None, :])
        best, match = iou.max(1)
        worst = max(float((1 - best).max()), float((rs - gs[match]).abs().max()))
        return worst if worst > 1e-3 else 0.0

    def agreement(self, got, reference) -> tuple[int, int]:
        """(reference detections with an int8 one of its label at IoU >= 0.5, reference detections), of one image's
        (boxes, scores, labels) or summed over a batch's predictions (a dict an image)."""
        if isinstance(reference, list):
            counts = [self.agreement(tuple(g[k] for k in OUTPUTS), tuple(r[k] for k in OUTPUTS)) for g, r in zip(got, reference)]
            return sum(a for a, _ in counts), sum(n for _, n in counts)
        (gb, _, gl), (rb, _, rl) = [tuple(torch.as_tensor(o).float() for o in out) for out in (got, reference)]
        if len(rb) == 0 or len(gb) == 0:
            return 0, len(rb)
        iou = box_iou(rb, gb) * (rl[:, None] == gl[None, :])
        return int((iou.max(1).values >= 0.5).sum()), len(rb)


class Detection(Task):
    name = "detection"
    export = DetectionExport(input_names=["images"], output_names=["boxes", "scores", "labels"], dynamic_axes={2: "height", 3: "width"},
                             unit="detections", legacy_onnx=True, diff_text="1 - IoU or score difference of matched detections",
                             pt2="torch.export cannot trace a detector's NMS (its box count depends on the data)",
                             agreement_text="PyTorch's detections found by int8 (same label, IoU >= 0.5):")
    class_dim = -1
    offers = frozenset({"scores", "pyramid"})  # dense heads' sigmoid scores (kd), FPN levels (pkd), backbone stages (london)
    hub_pipeline = "object-detection"
    model_hint = DETECTORS.hint
    recipe_defaults = {
        # `make demo-det`'s schedule, the one FCOS learns with from scratch on digit scenes (benchmarks/RESULTS.md):
        # SGD at the core's lr 0.05 diverges there, and AdamW at 5e-4 or SGD at 0.01 learned no faster
        "schedule": {"optimizer": "adamw", "lr": 0.002, "batch_size": 16, "weight_decay": 1e-4, "warmup_epochs": 1},
        "data": {"scale": SCALE, "hflip": HFLIP},
        # benchmarks/results/det_methods.md, digit scenes, `make demo-det`'s teacher (79.2 AP50), 5 seeds paired
        # (2026-12-06): cwd the strongest (27.28 mAP, +5.69 se 0.23 over the detector's loss alone; pkd +2.90, kd
        # -0.54); cwd+london vs cwd -0.17 (se 0.05, 4 of 5 seeds down): a cost beyond its standard error
        "method": "cwd",
    }
    default_method_reason = "cwd measured strongest, +london cost 0.17 mAP, beyond its standard error (0.05), benchmarks/RESULTS.md"

    # ---- data ---------------------------------------------------------------------------
    def detect(self, root: Path) -> bool:
        return detect_layout(root) is not None

    def layout_hint(self) -> str:
        return ("VOC (JPEGImages/, Annotations/, ImageSets/Main/{train,val}.txt), COCO (annotations/instances_{train,val}*.json) "
                "or YOLO (images/{train,val} + labels/{train,val} + data.yaml)")

    def scan(self, root, check: bool = True, skip_bad: bool = False) -> Splits:
        train, val, report = scan_detection(root, check=check, skip_bad=skip_bad)
        return Splits(train.classes, train, val, train.skipped + val.skipped, report.line())

    def datasets(self, splits: Splits, input_size: int, data_config: dict, recipe: dict, device: torch.device):
        return joint_datasets(DetectionDataset, splits, input_size, recipe)

    def eval_dataset(self, split, meta: dict):
        return DetectionDataset(split, int(meta["input_size"][-1]), False)

    def image_transform(self, meta: dict):
        size = int(meta["input_size"][-1])
        return lambda image: longer_side(image, size)

    # ---- models -------------------------------------------------------------------------
    def configure(self, loaded, input_size: int) -> None:
        set_input_size(loaded.model, loaded.arch, input_size)
        loaded.data_config["input_size"] = [3, input_size, input_size]

    def logit_kind(self, model: nn.Module) -> str | None:
        return "sigmoid" if dense_head(model) else None

    def quantization_aware(self, model: nn.Module) -> str | None:
        """FCOS and RetinaNet (measured, benchmarks/qat.py --setting boxes); two-stage and SSD detectors are not planned."""
        return None if dense_head(model) else "quantization-aware training covers FCOS and RetinaNet detectors, not this one"

    def feature_levels(self, model: nn.Module) -> list[tuple[str, int]]:
        """The FPN's P3-P5 outputs (its layer blocks); P6 and P7 are 2x2 and 1x1 at 128 px, too small to carry statistics."""
        fpn = getattr(getattr(model, "backbone", None), "fpn", None)
        if fpn is None:
            return []
        return [(f"backbone.fpn.layer_blocks.{i}", block.out_channels if hasattr(block, "out_channels") else block[0].out_channels)
                for i, block in enumerate(fpn.layer_blocks)][:3]

    # ---- one forward pass ---------------------------------------------------------------
    def inputs(self, batch: Batch, mean, std):
        """The images in [0, 1]: a detector normalises them itself (with the same ImageNet mean/std)."""
        return [_plain(i) for i in batch.images]

    def forward(self, model: nn.Module, batch: Batch, stats, settings: dict | None = None, predict: bool = True) -> Outputs:
        offset = background_offset(model)
        captured = {}
        hook = model.head.register_forward_hook(lambda m, i, o: captured.update(o)) if dense_head(model) else None
        losses, prediction = {}, None
        try:
            if settings is not None and model.training:
                targets = [{"boxes": _plain(t["boxes"])[~_ignored(t)], "labels": _plain(t["labels"])[~_ignored(t)] + offset} for t in batch.targets]
                losses = model(self.inputs(batch, *stats), targets)
            elif predict:
                prediction = self.prediction(model(self.inputs(batch, *stats)), offset)
            else:  # a teacher's pass: its transform, backbone and dense head, none of the post-processing (NMS)
                images, _ = model.transform(self.inputs(batch, *stats))
                features = model.backbone(images.tensors)
                if dense_head(model):
                    model.head(list(features.values()))
        finally:
            if hook is not None:
                hook.remove()
        logits = LogitView(captured["cls_logits"], self.class_dim, kind="sigmoid") if "cls_logits" in captured else None
        return Outputs(prediction, dict(losses), logits)

    def prediction(self, raw, offset: int = 0):
        return [{"boxes": d["boxes"], "scores": d["scores"], "labels": d["labels"] - offset} for d in raw]

    def predictor(self, model: nn.Module):
        offset = background_offset(model)
        return lambda images: self.prediction(model(images), offset)

    attackable = False  # FGSM needs the loss of a prediction; a detector computes its loss in training mode only

    def exportable(self, model: nn.Module) -> nn.Module:
        return DetectorExport(model, background_offset(model)).eval()

    def metric(self, num_classes: int) -> Metric:
        return MeanAP(num_classes)

