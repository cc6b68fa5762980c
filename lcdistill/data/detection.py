"""Object-detection data: three layouts read into one form, every check before training, joint augmentation.

    detect_layout(root)   'voc' | 'coco' | 'yolo' | None (layouts in det_layouts and det_coco)
    scan_detection(root)  (train DetSplit, val DetSplit, DetReport), all checks done
    DetectionDataset      (image, {"boxes", "labels", "ignore"}, skipped attempts) per sample
    collate               lists of images and targets, as torchvision's detectors take them

Classes have no background entry (see det_layouts). `ignore` marks VOC difficult and COCO crowd
boxes: kept in the target so the metric can leave them out; whether training sees them is the
task's choice (detectron2 trains on difficult boxes, torchvision's references drop crowd ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lcdistill.data.det_coco import coco_sources, read_coco
from lcdistill.data.det_layouts import (
    SPLITS, VOC_CLASSES, DetSample, DetSplit, Sizer, no_train_boxes, read_voc, read_yolo, voc_bases,
)
from lcdistill.data.images import load_rgb
from lcdistill.data.samples import SeededDataset, first_readable, sample_seed, seeded
from lcdistill.errors import UserError

__all__ = ["VOC_CLASSES", "DetReport", "DetSample", "DetSplit", "DetectionDataset", "collate", "det_transform",
           "detect_layout", "scan_detection"]

LAYOUT_HINT = ("lay it out as VOC (JPEGImages/, Annotations/, ImageSets/Main/{train,val}.txt), COCO "
               "(annotations/instances_{train,val}2017.json + train2017/, val2017/) or YOLO (images/{train,val}/ + labels/{train,val}/ + data.yaml)")
# The ImageNet mean in 0-255: padding reads as zero once the detector normalises its input.
PAD_FILL = (124, 116, 104)


@dataclass
class DetReport:
    """What the scan found, per split: image and box counts and what was done to them."""

    layout: str
    images: dict[str, int]
    boxes: dict[str, int]
    ignored: dict[str, int]  # difficult / crowd boxes among them
    background: dict[str, int]  # images without objects, kept as negatives
    clipped: dict[str, int]  # boxes overhanging their image, clipped to it

    def line(self) -> str:
        def part(s: str) -> str:
            return (f"{s} {self.images[s]} images ({self.background[s]} background), {self.boxes[s]} boxes "
                    f"({self.ignored[s]} ignored, {self.clipped[s]} clipped to the image)")
        return f"{self.layout}: " + "; ".join(part(s) for s in SPLITS)


def detect_layout(root: str | Path) -> str | None:
    """'voc' (JPEGImages/ + Annotations/), 'coco' (instances JSON or Roboflow's), 'yolo' (images/train + labels/train), or None."""
    root = Path(root)
    if voc_bases(root):
        return "voc"
    if coco_sources(root):
        return "coco"
    if (root / "images" / "train").is_dir() and (root / "labels" / "train").is_dir():
        return "yolo"
    return None


def scan_detection(root: str | Path, check: bool = True, skip_bad: bool = False) -> tuple[DetSplit, DetSplit, DetReport]:
    """(train, val, report) of a detection set in any of the three layouts, checked before training.

    Every annotation is parsed and every box checked (positive size, touching its image, a known
    class); an overhanging box is clipped and counted. Image headers are read where the annotation
    gives no size (YOLO always), and with check to verify the sizes given (the first PRECHECK_LIMIT)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder {root} not found", "pass --data DIR holding a detection data set")
    layout = detect_layout(root)
    if layout is None:
        raise UserError(f"{root} is not a detection data set (no VOC, COCO or YOLO layout)", LAYOUT_HINT)
    sizer = Sizer(check, skip_bad)
    read = {"voc": read_voc, "coco": read_coco, "yolo": read_yolo}[layout](root, sizer)
    splits = {s: DetSplit(list(read.classes), read.samples[s], sizer.skipped[s]) for s in SPLITS}
    for s, split in splits.items():
        if not split.samples:
            raise UserError(f"the {s} split of {root} has no readable image", "replace the unreadable files")
    if not any((~sample.ignore).any() for sample in splits["train"].samples):
        raise no_train_boxes(root, sum(int(sample.ignore.sum()) for sample in splits["train"].samples))

    def count(fn) -> dict[str, int]:
        return {s: int(sum(fn(sample) for sample in splits[s].samples)) for s in SPLITS}

    report = DetReport(layout, count(lambda x: 1), count(lambda x: len(x.labels)), count(lambda x: x.ignore.sum()),
                       count(lambda x: len(x.labels) == 0), dict(read.clipped))
    return splits["train"], splits["val"], report


# ---- the dataset -----------------------------------------------------------------------------------
def box_fields(inputs):
    """What SanitizeBoundingBoxes drops along with a box: its label and ignore flag (a module function, so workers can pickle it)."""
    _, target = inputs
    return target["labels"], target["ignore"]


class LongerSide:
    """Eval: the longer side resized to size, the aspect kept, no padding. A torchvision detector told
    min_size = max_size = size then leaves the image as it is."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image, target):
        from torchvision.transforms.v2 import functional as F

        image = longer_side(image, self.size)
        return image, {**target, "boxes": F.resize(target["boxes"], list(image.shape[-2:]))}


def longer_side(image, size: int) -> torch.Tensor:
    """An image (tensor or PIL) as a float [3, H, W] tensor in [0, 1], its longer side resized to size, the aspect kept."""
    from torchvision.transforms.v2 import functional as F

    image = F.to_image(image) if not isinstance(image, torch.Tensor) else image
    h, w = image.shape[-2:]
    longer = max(h, w)
    out = [max(1, round(h * size / longer)), max(1, round(w * size / longer))]
    return F.to_dtype(F.resize(image, out, antialias=True), torch.float32, scale=True)


def det_transform(size: int, training: bool, scale: tuple[float, float] = (0.5, 2.0), hflip: float = 0.5):
    """Joint image/box transform (torchvision.transforms.v2), called as transform(image, target).

    Training follows torchvision references/detection's large-scale-jitter preset: ScaleJitter (the
    longer side to a random [scale[0], scale[1]] x size), a size x size crop padded where smaller,
    a horizontal flip with probability hflip, then SanitizeBoundingBoxes drops boxes under 1 px
    (and those cropped away) with their labels and ignore flags. The fixed size x size canvas is
    what a detector told min_size = max_size = size leaves unscaled; without it the detector's own
    resize would undo the jitter. Eval: `LongerSide`."""
    from torchvision.transforms import v2

    if not training:
        return LongerSide(size)
    return v2.Compose([
        v2.ScaleJitter((size, size), scale_range=scale, antialias=True),
        v2.RandomCrop(size, pad_if_needed=True, fill=PAD_FILL),
        v2.RandomHorizontalFlip(hflip),
        v2.SanitizeBoundingBoxes(labels_getter=box_fields),
        v2.ToDtype(torch.float32, scale=True),  # images only: boxes stay float, labels int64
    ])


class DetectionDataset(SeededDataset):
    """(image tv_tensors.Image float [3, H, W] in [0, 1], target, skipped files) per sample.

    target: {"boxes": tv_tensors.BoundingBoxes XYXY (canvas_size = the image's), "labels": int64 [N],
    "ignore": bool [N]}. Training images are size x size, eval images have their longer side = size.
    Augmentation is seeded by (seed, epoch, index) as the other datasets are, and an unreadable image
    follows the same policy (stop naming it, or take the next sample)."""

    def __init__(self, split: DetSplit, size: int, training: bool, seed: int = 0, scale: tuple[float, float] = (0.5, 2.0),
                 hflip: float = 0.5, skip_bad: bool = False):
        super().__init__(split, seed, skip_bad)
        self.items = [(s.image, s) for s in split.samples]  # first_readable loads each item's leading path
        self.size, self.training = size, training
        self.transform = det_transform(size, training, scale, hflip)

    def __getitem__(self, index: int):
        from torchvision import tv_tensors
        from torchvision.transforms.v2.functional import pil_to_tensor

        (path, sample), (image,), attempt = first_readable(self.items, index, self.skip_bad, load_rgb)
        if image.size != sample.size:  # changed since the scan, or an unchecked annotation's size: the boxes do not fit
            source = f" ({sample.annotation})" if sample.annotation != path else ""
            raise UserError(f"image {path} is {image.size[0]}x{image.size[1]}, but its boxes{source} are for {sample.size[0]}x{sample.size[1]}",
                            "fix the annotation's size, or scan the data again")
        width, height = sample.size
        target = {
            "boxes": tv_tensors.BoundingBoxes(torch.tensor(sample.boxes).reshape(-1, 4), format="XYXY", canvas_size=(height, width)),
            "labels": torch.tensor(sample.labels, dtype=torch.int64),
            "ignore": torch.tensor(sample.ignore, dtype=torch.bool),
        }
        with seeded(sample_seed(self.seed, self.epoch, index)):
            image_t, target = self.transform(tv_tensors.Image(pil_to_tensor(image)), target)
        return image_t, target, attempt

    @staticmethod
    def collate(batch):
        return collate(batch)


def collate(batch):
    """(list of images, list of targets, skipped attempts int64 [B]): torchvision's detectors take lists,
    so images of different sizes need no padding here (their transform batches them)."""
    images, targets, attempts = zip(*batch)
    return list(images), list(targets), torch.tensor(attempts, dtype=torch.int64)
