"""Semantic-segmentation data: two layouts, every check before training, joint image/mask augmentation.

Layouts (`detect_layout`):

    voc      PASCAL VOC 2012 as downloaded (ROOT, ROOT/VOC2012 or ROOT/VOCdevkit/VOC2012):
             JPEGImages/<id>.jpg, SegmentationClass/<id>.png, ImageSets/Segmentation/{train,val}.txt
    folders  ROOT/train/images/<name>.<ext> + ROOT/train/masks/<name>.png, and val/ alike

Masks are PNGs of class indices, palette ('P', read as indices, never as colours) or grayscale
('L'); 255 marks pixels to ignore (VOC's object borders). Class names come from ROOT/classes.txt
(one per line, index 0 first) when present, else VOC's 21 names for `voc`, else class_0 ..
class_{K-1} for `folders` with K = the largest mask value + 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lcdistill.data.folder import PRECHECK_LIMIT
from lcdistill.data.images import DECODE_ERRORS, IMAGE_EXTENSIONS, load_rgb, unreadable
from lcdistill.data.samples import SeededDataset, first_readable, sample_seed, seeded
from lcdistill.errors import UserError

IGNORE = 255
VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]
# Up to this many masks are read in full before training (values checked); beyond it only headers.
MASK_CHECK_LIMIT = 5_000
MASK_MODES = ("P", "L", "1", "I;16", "I;16L", "I;16B", "I")
LAYOUT_HINT = ("lay it out as VOC 2012 (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/train.txt and val.txt) "
               "or as train/images/*.jpg + train/masks/*.png (same names) and val/ alike")


@dataclass
class SegSplit:
    classes: list[str]
    samples: list[tuple[str, str]]  # (image path, mask path)
    skipped: list[str] = field(default_factory=list)  # unreadable files left out (--skip-bad-images)


# ---- layouts ---------------------------------------------------------------------------------------
def voc_root(root: str | Path) -> Path | None:
    """The folder holding JPEGImages/ and SegmentationClass/: ROOT, ROOT/VOC2012 or ROOT/VOCdevkit/VOC2012."""
    root = Path(root)
    for folder in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (folder / "JPEGImages").is_dir() and (folder / "SegmentationClass").is_dir():
            return folder
    return None


def detect_layout(root: str | Path) -> str | None:
    """'voc', 'folders' (train/images + train/masks), or None (e.g. a classification ImageFolder)."""
    root = Path(root)
    if voc_root(root) is not None:
        return "voc"
    if (root / "train" / "images").is_dir() and (root / "train" / "masks").is_dir():
        return "folders"
    return None


def read_classes(path: Path) -> list[str]:
    """Class names from classes.txt: one per line, index 0 (background) first; blank lines ignored."""
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"class list {path} cannot be read ({type(e).__name__})", "write it as UTF-8 text, one class name per line") from None
    names = [n for n in names if n]
    if len(names) < 2:
        raise UserError(f"class list {path} names {len(names)} class(es)", "list at least 2 classes, one per line, background first")
    if len(names) > IGNORE:
        raise UserError(f"class list {path} names {len(names)} classes", f"use at most {IGNORE}: mask value {IGNORE} means ignore")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"class list {path} names {repeated[0]!r} more than once", "give each class one line")
    return names


def _by_stem(folder: Path, kind: str) -> dict[str, Path]:
    """Image files directly in folder by name without extension; two files with one name are refused."""
    found: dict[str, Path] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.name.lower().endswith(IMAGE_EXTENSIONS) or not entry.is_file():
            continue
        path = Path(entry.path)
        if path.stem in found:
            raise UserError(f"{kind}s {found[path.stem]} and {path} have the same name", f"keep one {kind} per name in {folder}")
        found[path.stem] = path
    return found


def _folder_split(root: Path, split: str) -> list[tuple[str, str]]:
    images_dir, masks_dir = root / split / "images", root / split / "masks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise UserError(f"{root} has no {split}/{folder.name}/ folder", LAYOUT_HINT)
    images, masks = _by_stem(images_dir, "image"), _by_stem(masks_dir, "mask")
    for stem, path in images.items():
        if stem not in masks:
            raise UserError(f"image {path} has no mask {masks_dir / stem}.png", "add its mask (same name, .png) or remove the image")
    for stem, path in masks.items():
        if stem not in images:
            raise UserError(f"mask {path} has no image of the same name in {images_dir}", "add its image or remove the mask")
        if path.suffix.lower() in (".jpg", ".jpeg"):
            raise UserError(f"mask {path} is a JPEG", "save masks as PNG: JPEG compression changes class indices")
    pairs = [(str(images[stem]), str(masks[stem])) for stem in sorted(images)]
    if not pairs:
        raise UserError(f"{images_dir} has no images", f"add images and their masks to {split}/images and {split}/masks")
    return pairs


def _voc_split(base: Path, split: str) -> list[tuple[str, str]]:
    listing = base / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise UserError(f"VOC data set {base} has no {listing.relative_to(base)}", f"list the {split} ids there, one per line")
    try:
        ids = [line.strip() for line in listing.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"VOC list {listing} cannot be read ({type(e).__name__})", "write it as text, one id per line") from None
    if not ids:
        raise UserError(f"VOC list {listing} names no images", f"list the {split} ids there, one per line")
    pairs = []
    for name in ids:
        image, mask = base / "JPEGImages" / f"{name}.jpg", base / "SegmentationClass" / f"{name}.png"
        for path in (image, mask):
            if not path.is_file():
                raise UserError(f"VOC list {listing} names {name}, but {path} is missing", "restore the file or remove the id from the list")
        pairs.append((str(image), str(mask)))
    return pairs


# ---- masks -----------------------------------------------------------------------------------------
def _mask_mode_error(path, mode: str) -> UserError:
    return UserError(f"mask {path} is a {mode} image, not class indices",
                     f"save it as a grayscale (L) or palette (P) PNG whose pixel values are class indices ({IGNORE} = ignore)")


def load_mask(path) -> np.ndarray:
    """The class indices of a mask file as uint8 [H, W]; a palette image gives its indices, not its colours."""
    with Image.open(path) as im:
        if im.mode not in MASK_MODES:
            raise _mask_mode_error(path, im.mode)
        values = np.array(im)  # a writable copy (torch.from_numpy wants one)
    if values.dtype != np.uint8:
        if values.size and (values.min() < 0 or values.max() > IGNORE):
            bad = int(values.max()) if values.max() > IGNORE else int(values.min())
            raise UserError(f"mask {path} holds value {bad}, outside 0..{IGNORE}", f"use class indices below {IGNORE} ({IGNORE} = ignore)")
        values = values.astype(np.uint8)
    return values


def _header(path: str) -> tuple[tuple[int, int], str]:
    with Image.open(path) as im:
        return im.size, im.mode


def _readable(split: SegSplit, skip_bad: bool, what: str) -> SegSplit:
    """Headers only: image and mask readable (else raise, or skip the pair with skip_bad), same size, a mask mode of indices."""
    kept, skipped = [], list(split.skipped)
    for image, mask in split.samples:
        headers = []
        for path in (image, mask):
            try:
                headers.append(_header(path))
            except DECODE_ERRORS as e:
                if not skip_bad:
                    raise unreadable(path, e, detail=False) from None
                skipped.append(path)
                break
        if len(headers) < 2:
            continue
        ((w, h), _), ((mw, mh), mode) = headers
        if mode not in MASK_MODES:
            raise _mask_mode_error(mask, mode)
        if (w, h) != (mw, mh):
            raise UserError(f"mask {mask} is {mw}x{mh} but its image {image} is {w}x{h}", "give each mask its image's size")
        kept.append((image, mask))
    return _nonempty(SegSplit(split.classes, kept, skipped), what)


def _nonempty(split: SegSplit, what: str) -> SegSplit:
    if not split.samples:
        raise UserError(f"the {what} split has no readable image and mask", "replace the unreadable files")
    return split


def _mask_values(split: SegSplit, skip_bad: bool, what: str) -> tuple[SegSplit, dict[str, np.ndarray]]:
    """The split without masks that fail to decode (else raise) and the distinct values of each mask."""
    values, kept, skipped = {}, [], list(split.skipped)
    for image, mask in split.samples:
        try:
            values[mask] = np.unique(load_mask(mask))
        except DECODE_ERRORS as e:
            if not skip_bad:
                raise unreadable(mask, e) from None
            skipped.append(mask)
            continue
        kept.append((image, mask))
    return _nonempty(SegSplit(split.classes, kept, skipped), what), values


def scan_segmentation(root: str | Path, check: bool = True, skip_bad: bool = False) -> tuple[SegSplit, SegSplit]:
    """(train, val) of a segmentation set in either layout, checked before training.

    With check, every image and mask header is read (up to PRECHECK_LIMIT pairs: both readable, same
    size) and every mask's values (up to MASK_CHECK_LIMIT pairs: a class index or 255)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder {root} not found", "pass --data DIR holding a segmentation data set")
    layout = detect_layout(root)
    if layout is None:
        raise UserError(f"{root} is not a segmentation data set (no JPEGImages/ + SegmentationClass/, no train/images/ + train/masks/)", LAYOUT_HINT)
    base = voc_root(root) if layout == "voc" else root
    pairs = {split: (_voc_split(base, split) if layout == "voc" else _folder_split(base, split)) for split in ("train", "val")}
    listed = next((d / "classes.txt" for d in dict.fromkeys([root, base]) if (d / "classes.txt").is_file()), None)
    classes = read_classes(listed) if listed else (list(VOC_CLASSES) if layout == "voc" else None)
    train, val = SegSplit(classes or [], pairs["train"]), SegSplit(classes or [], pairs["val"])
    count = len(train.samples) + len(val.samples)
    if classes is None and count > MASK_CHECK_LIMIT:
        raise UserError(f"{root} has {count} masks and no classes.txt", f"list the class names in {root / 'classes.txt'}, one per line, background first")
    if check and count <= PRECHECK_LIMIT:
        train, val = _readable(train, skip_bad, "train"), _readable(val, skip_bad, "val")
    if classes is None or (check and count <= MASK_CHECK_LIMIT):
        (train, train_values), (val, val_values) = _mask_values(train, skip_bad, "train"), _mask_values(val, skip_bad, "val")
        values = {**train_values, **val_values}
        if classes is None:
            top = max((int(v[v != IGNORE].max()) for v in values.values() if (v != IGNORE).any()), default=0)
            if top < 1:
                raise UserError(f"every mask under {root} is background (0) or ignore ({IGNORE})", "give objects their class index in the masks")
            classes = [f"class_{k}" for k in range(top + 1)]
        for mask, v in values.items():
            bad = v[(v >= len(classes)) & (v != IGNORE)]
            if len(bad):
                source = f"{listed} names {len(classes)}" if listed else f"VOC has {len(classes)}"
                raise UserError(f"mask {mask} holds value {int(bad[0])}, neither a class index below {len(classes)} nor {IGNORE} (ignore)",
                                f"fix the mask, or name every class in {root / 'classes.txt'} ({source})")
    return SegSplit(classes, train.samples, train.skipped), SegSplit(classes, val.samples, val.skipped)


# ---- the dataset -----------------------------------------------------------------------------------
def seg_transform(size: int, training: bool, scale: tuple[float, float] = (0.5, 2.0), hflip: float = 0.5):
    """Joint image/mask transform (torchvision.transforms.v2 on tv_tensors.Image and Mask).

    Training as torchvision's references/segmentation: shorter side resized to a random length in
    [scale[0], scale[1]) x size, padded to size where smaller (image 0, mask 255), a random size x size
    crop, a horizontal flip with probability hflip. Eval: resized to size x size. Masks are always
    resized with nearest-neighbour interpolation (v2 does so for Mask)."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    if not training:
        return v2.Resize((size, size), antialias=True)
    low = max(1, int(scale[0] * size))
    return v2.Compose([
        v2.RandomResize(low, max(low + 1, int(scale[1] * size)), antialias=True),
        v2.RandomCrop(size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE}),
        v2.RandomHorizontalFlip(hflip),
    ])


class SegmentationDataset(SeededDataset):
    """(image float [3, size, size] in [0, 1], mask int64 [size, size], skipped files) per sample.

    Augmentation is seeded by (seed, epoch, index) with the classification path's per-sample seed, and
    an unreadable image or mask follows the same policy (stop naming it, or take the next sample)."""

    def __init__(self, split: SegSplit, size: int, training: bool, seed: int = 0, scale: tuple[float, float] = (0.5, 2.0),
                 hflip: float = 0.5, skip_bad: bool = False):
        super().__init__(split, seed, skip_bad)
        self.size, self.training = size, training
        self.transform = seg_transform(size, training, scale, hflip)

    def __getitem__(self, index: int):
        from torchvision import tv_tensors
        from torchvision.transforms.v2.functional import pil_to_tensor

        (image_path, mask_path), (image, mask), attempt = first_readable(self.samples, index, self.skip_bad, load_rgb, load_mask)
        if image.size != (mask.shape[1], mask.shape[0]):
            raise UserError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} is {image.size[0]}x{image.size[1]}",
                            "give each mask its image's size")
        pair = tv_tensors.Image(pil_to_tensor(image)), tv_tensors.Mask(torch.from_numpy(mask))
        with seeded(sample_seed(self.seed, self.epoch, index)):
            image_t, mask_t = self.transform(*pair)
        return image_t.as_subclass(torch.Tensor).float().div_(255), mask_t.as_subclass(torch.Tensor).long(), attempt
