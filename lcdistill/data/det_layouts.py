"""Detection data in one form (`DetSample`), every box checked as it is read; the VOC and YOLO readers.

    voc   ROOT, ROOT/VOC20xx or ROOT/VOCdevkit/VOC20xx: JPEGImages/<id>.jpg, Annotations/<id>.xml,
          ImageSets/Main/{train,val}.txt
    yolo  ROOT/images/{train,val}/ + ROOT/labels/{train,val}/<same name>.txt, one `class cx cy w h`
          per line, normalised to [0, 1]; names from ROOT/data.yaml (names: list or dict) or classes.txt
    coco  in det_coco

Boxes are float32 XYXY pixels of the image as stored (no EXIF rotation: load_rgb reads it so).
VOC's 1-based inclusive pixels become (xmin - 1, ymin - 1, xmax, ymax), as detectron2's VOC
loader does, so a box over pixels 1..W spans [0, W] (mmdet 3 subtracts 1 from all four, which
shifts boxes a pixel left and up). Labels index the class list, which has no background entry:
Faster R-CNN and SSD reserve label 0 for background (labels + 1, K + 1 classes), RetinaNet and
FCOS take them as they are.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from lcdistill.data.folder import PRECHECK_LIMIT, images_under
from lcdistill.data.images import DECODE_ERRORS, IMAGE_EXTENSIONS, unreadable
from lcdistill.errors import UserError

SPLITS = ("train", "val")
VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]
XML_FIX = "fix the file: VOC XML with <object><name> and <bndbox> xmin, ymin, xmax, ymax per object"
YOLO_FIX = "write one box per line as `class cx cy w h`: a class id, then centre and size divided by the image's width and height"


@dataclass(eq=False)
class DetSample:
    image: str  # image file
    boxes: np.ndarray  # float32 [N, 4] XYXY pixels, inside the image
    labels: np.ndarray  # int64 [N], indices into the split's classes
    ignore: np.ndarray  # bool [N]: VOC difficult / COCO iscrowd, kept out of the metric
    size: tuple[int, int]  # (width, height) of the image file
    annotation: str  # the file the boxes came from (named in errors)


@dataclass
class DetSplit:
    classes: list[str]  # object classes only, no background entry
    samples: list[DetSample]
    skipped: list[str] = field(default_factory=list)  # unreadable images left out (--skip-bad-images)


@dataclass
class Read:
    """What a layout reader returns: the classes, and per split the samples and boxes clipped."""

    classes: list[str]
    samples: dict[str, list[DetSample]]
    clipped: dict[str, int]


def no_train_boxes(where, ignored: int = 0) -> UserError:
    marked = f" but {ignored} marked difficult or crowd" if ignored else ""
    return UserError(f"the train split of {where} has no boxes{marked}",
                     "annotate objects in the train images (images without objects are kept as background)")


# ---- what every layout shares ----------------------------------------------------------------------
class Sizer:
    """Image sizes from headers (PIL open, no decode): where the annotation gives none, and with check
    to verify the ones it gives (the first PRECHECK_LIMIT). An unreadable image stops the scan, or
    with skip_bad is left out and listed in skipped[split]."""

    def __init__(self, check: bool, skip_bad: bool):
        self.check, self.skip_bad, self.verified = check, skip_bad, 0
        self.skipped: dict[str, list[str]] = {split: [] for split in SPLITS}

    def size(self, split: str, image: str, given: tuple[int, int] | None, annotation) -> tuple[int, int] | None:
        if given is not None and not (self.check and self.verified < PRECHECK_LIMIT):
            return given
        try:
            with Image.open(image) as im:
                size = im.size
        except DECODE_ERRORS as e:
            if not self.skip_bad:
                raise unreadable(image, e, detail=False) from None
            self.skipped[split].append(image)
            return None
        if given is not None:
            self.verified += 1
            if tuple(given) != size:
                raise UserError(f"{annotation} gives image {image} as {given[0]}x{given[1]}, but the file is {size[0]}x{size[1]}",
                                "correct the size there, or re-export the annotation from the image as stored")
        return size


class Boxes:
    """One image's boxes as a reader finds them: each checked, an overhang clipped to the image and counted."""

    def __init__(self, image: str, size: tuple[int, int]):
        self.image, self.size, self.clipped = image, size, 0
        self.rows: list[tuple[float, float, float, float]] = []
        self.labels: list[int] = []
        self.ignore: list[bool] = []

    def add(self, where: str, shown: str, box: tuple[float, float, float, float], label: int, ignore: bool = False) -> None:
        x0, y0, x1, y1 = box
        w, h = self.size
        if not all(math.isfinite(v) for v in box):
            raise UserError(f"{where} has a box that is not finite ({shown})", "write finite numbers")
        if x1 <= x0 or y1 <= y0:
            raise UserError(f"{where} has a box of no width or height ({shown})", "fix the box or delete it")
        if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
            raise UserError(f"{where} has a box ({shown}) wholly outside its {w}x{h} image {self.image}", "fix the coordinates or delete the box")
        inside = (max(x0, 0.0), max(y0, 0.0), min(x1, float(w)), min(y1, float(h)))
        self.clipped += inside != (x0, y0, x1, y1)
        self.rows.append(inside)
        self.labels.append(label)
        self.ignore.append(bool(ignore))

    def sample(self, annotation) -> DetSample:
        return DetSample(self.image, np.array(self.rows, np.float32).reshape(-1, 4), np.array(self.labels, np.int64),
                         np.array(self.ignore, bool), tuple(self.size), str(annotation))


def read_names(path: Path, drop_background: bool) -> list[str]:
    """Class names from a text file, one per line; a leading `background` dropped when asked (a detector adds its own)."""
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"class list {path} cannot be read ({type(e).__name__})", "write it as UTF-8 text, one class name per line") from None
    names = [n for n in names if n]
    if drop_background and names and names[0].lower() in ("background", "__background__"):
        names = names[1:]
    if not names:
        raise UserError(f"class list {path} names no object class", "list the class names, one per line")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"class list {path} names {repeated[0]!r} more than once", "give each class one line")
    return names


def clip_text(text: str, limit: int = 60) -> str:
    text = " ".join(str(text).split())  # one line, whatever the file held
    return text if len(text) <= limit else text[:limit] + "..."


# ---- VOC -------------------------------------------------------------------------------------------
def voc_bases(root: Path) -> list[Path]:
    """Folders holding JPEGImages/ and Annotations/: ROOT itself, else each ROOT/VOC* and ROOT/VOCdevkit/VOC*."""
    def is_voc(folder: Path) -> bool:
        return (folder / "JPEGImages").is_dir() and (folder / "Annotations").is_dir()

    if is_voc(root):
        return [root]
    return [d for parent in (root, root / "VOCdevkit") if parent.is_dir()
            for d in sorted(parent.iterdir()) if d.name.startswith("VOC") and d.name != "VOCdevkit" and is_voc(d)]


def _voc_image(base: Path, name: str) -> Path | None:
    for ext in dict.fromkeys((".jpg", *IMAGE_EXTENSIONS)):
        path = base / "JPEGImages" / f"{name}{ext}"
        if path.is_file():
            return path
    return None


def _voc_objects(xml: Path):
    """(size (w, h) or None, [(where, shown, box in pixels, name, difficult)]) of one VOC annotation."""
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError as e:
        raise UserError(f"annotation {xml} is not well-formed XML ({e})", XML_FIX) from None
    except OSError as e:
        raise UserError(f"annotation {xml} cannot be read ({type(e).__name__})", "restore the file") from None
    given = None
    if root.find("size") is not None:
        texts = [root.findtext(f"size/{tag}") for tag in ("width", "height")]
        try:
            dims = [int(float(t)) if t and t.strip() else 0 for t in texts]
        except ValueError:
            raise UserError(f"annotation {xml} gives size {texts[0]!r}x{texts[1]!r}, not numbers", XML_FIX) from None
        given = (dims[0], dims[1]) if min(dims) > 0 else None  # some tools write 0: read the image instead
    objects = []
    for k, obj in enumerate(root.findall("object"), 1):
        name = (obj.findtext("name") or "").strip()
        where = f"object {k} ({name}) of {xml}" if name else f"object {k} of {xml}"
        if not name:
            raise UserError(f"{where} has no <name>", XML_FIX)
        if obj.find("bndbox") is None:
            raise UserError(f"{where} has no <bndbox>", XML_FIX)
        texts = [obj.findtext(f"bndbox/{tag}") for tag in ("xmin", "ymin", "xmax", "ymax")]
        try:
            xmin, ymin, xmax, ymax = (float(t) for t in texts)
            difficult = int(float(obj.findtext("difficult") or 0)) != 0
        except (TypeError, ValueError):
            raise UserError(f"{where} has a non-numeric bndbox or difficult ({', '.join(map(repr, texts))})", XML_FIX) from None
        shown = f"xmin {texts[0]} ymin {texts[1]} xmax {texts[2]} ymax {texts[3]}"
        objects.append((where, shown, (xmin - 1, ymin - 1, xmax, ymax), name, difficult))
    return given, objects


def _voc_ids(base: Path, split: str) -> tuple[Path, list[str]]:
    listing = base / "ImageSets" / "Main" / f"{split}.txt"
    if not listing.is_file():
        raise UserError(f"VOC data set {base} has no ImageSets/Main/{split}.txt", f"list the {split} image ids there, one per line")
    try:
        ids = [line.split()[0] for line in listing.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"VOC list {listing} cannot be read ({type(e).__name__})", "write it as text, one id per line") from None
    if not ids:
        raise UserError(f"VOC list {listing} names no images", f"list the {split} image ids there, one per line")
    return listing, ids


def read_voc(root: Path, sizer: Sizer) -> Read:
    bases = voc_bases(root)
    if len(bases) > 1:
        raise UserError(f"{root} holds {len(bases)} VOC sets ({', '.join(b.name for b in bases)})", f"pass --data {bases[0]} (one set)")
    base = bases[0]
    parsed = {}
    for split in SPLITS:
        listing, ids = _voc_ids(base, split)
        parsed[split] = []
        for name in ids:
            image, xml = _voc_image(base, name), base / "Annotations" / f"{name}.xml"
            if image is None:
                raise UserError(f"VOC list {listing} names {name}, but its image {base / 'JPEGImages' / name}.jpg is missing",
                                "restore the image or remove the id from the list")
            if not xml.is_file():
                raise UserError(f"VOC list {listing} names {name}, but its annotation {xml} is missing",
                                "restore the annotation or remove the id from the list")
            parsed[split].append((str(image), xml, *_voc_objects(xml)))
    listed = next((d / "classes.txt" for d in dict.fromkeys([root, base]) if (d / "classes.txt").is_file()), None)
    used = {o[3] for images in parsed.values() for *_, objects in images for o in objects}
    if listed:
        classes, fix = read_names(listed, drop_background=True), f"fix the name or add it to {listed}"
    elif used <= set(VOC_CLASSES):
        classes, fix = list(VOC_CLASSES), ""
    else:  # not VOC's classes: the train annotations name them
        classes = sorted({o[3] for *_, objects in parsed["train"] for o in objects})
        fix = f"fix the name, or list every class in {base / 'classes.txt'}, one per line"
        if not classes:
            raise no_train_boxes(base)
    index = {name: i for i, name in enumerate(classes)}
    samples, clipped = {}, {}
    for split, images in parsed.items():
        samples[split], clipped[split] = [], 0
        for image, xml, given, objects in images:
            size = sizer.size(split, image, given, f"annotation {xml}")
            if size is None:
                continue
            boxes = Boxes(image, size)
            for where, shown, box, name, difficult in objects:
                if name not in index:
                    source = listed or "the train annotations"
                    raise UserError(f"{where} is class {name!r}, not one of the {len(classes)} classes of {source}", fix)
                boxes.add(where, shown, box, index[name], difficult)
            samples[split].append(boxes.sample(xml))
            clipped[split] += boxes.clipped
    return Read(classes, samples, clipped)


# ---- YOLO ------------------------------------------------------------------------------------------
def _yaml_names(path: Path) -> list[str]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{path} is not readable YAML ({type(e).__name__})", "fix it, e.g. `names: [cat, dog]`") from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict):  # Ultralytics' {0: cat, 1: dog}
        ids = sorted(names, key=str)
        if sorted(map(str, ids)) != sorted(map(str, range(len(ids)))):
            raise UserError(f"{path} numbers its names {clip_text(ids)}, not 0..{len(ids) - 1}", "number the classes 0, 1, 2, ... without gaps")
        names = [names[i] if i in names else names[str(i)] for i in range(len(ids))]
    if not isinstance(names, list) or not names:
        raise UserError(f"{path} has no `names:` list", "add `names: [class0, class1, ...]` in class-id order")
    if data.get("nc") is not None and data["nc"] != len(names):
        raise UserError(f"{path} gives nc {data['nc']} but names {len(names)} classes", "make nc match the names")
    return [str(n) for n in names]


def yolo_names(root: Path) -> tuple[list[str], Path]:
    """Class names by id and the file they came from: data.yaml, else classes.txt (ROOT, labels/ or labels/train/)."""
    for path in (root / "data.yaml", root / "data.yml", root / "dataset.yaml"):
        if path.is_file():
            return _yaml_names(path), path
    for path in (root / "classes.txt", root / "labels" / "classes.txt", root / "labels" / "train" / "classes.txt"):
        if path.is_file():
            return read_names(path, drop_background=False), path  # class 0 is an object class in YOLO
    raise UserError(f"YOLO data set {root} has no class names",
                    f"list them in {root / 'data.yaml'} (`names: [a, b]`) or {root / 'classes.txt'}, in class-id order")


def _yolo_line(where: str, line: str, classes: list[str], source: Path, size: tuple[int, int]):
    """(box in pixels, class id) of one `class cx cy w h` line."""
    fields = line.split()
    if len(fields) != 5:
        raise UserError(f"{where} has {len(fields)} fields ({clip_text(line)}), not 5", YOLO_FIX + " (polygons are not boxes)")
    try:
        values = [float(f) for f in fields]
    except ValueError:
        raise UserError(f"{where} holds a non-number ({clip_text(line)})", YOLO_FIX) from None
    k, cx, cy, w, h = values
    if not math.isfinite(k) or k != int(k) or not 0 <= k < len(classes):
        raise UserError(f"{where} has class {fields[0]}, not a class id 0..{len(classes) - 1} of {source}", f"fix the id or name the class in {source}")
    if not all(0 <= v <= 1 for v in (cx, cy, w, h)):
        raise UserError(f"{where} has a value outside [0, 1] ({clip_text(line)})", YOLO_FIX)
    width, height = size
    return ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height), int(k)


def _yolo_split(root: Path, split: str, classes: list[str], source: Path, sizer: Sizer) -> tuple[list[DetSample], int]:
    images_dir, labels_dir = root / "images" / split, root / "labels" / split
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise UserError(f"YOLO data set {root} has no {folder.relative_to(root)}/ folder",
                            "lay it out as images/{train,val}/ + labels/{train,val}/ (same names, .txt)")
    labels: dict[Path, str] = {}
    for image in images_under(images_dir):
        label = labels_dir / Path(image).relative_to(images_dir).with_suffix(".txt")
        if label in labels:
            raise UserError(f"images {labels[label]} and {image} share the label file {label}", "give each image its own name")
        labels[label] = image
    for txt in sorted(labels_dir.rglob("*.txt")):
        if txt not in labels and txt != labels_dir / "classes.txt" and not txt.name.startswith("."):
            raise UserError(f"label file {txt} has no image of the same name in {images_dir}", "add its image or delete the label file")
    samples, clipped = [], 0
    for label, image in labels.items():
        size = sizer.size(split, image, None, label)
        if size is None:
            continue
        boxes = Boxes(image, size)
        if label.is_file():  # else a background image
            try:
                lines = label.read_text(encoding="utf-8-sig").splitlines()  # a BOM is no number
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"label file {label} cannot be read ({type(e).__name__})", YOLO_FIX) from None
            for n, line in enumerate(lines, 1):
                if line.strip():
                    where = f"line {n} of {label}"
                    box, k = _yolo_line(where, line, classes, source, size)
                    boxes.add(where, clip_text(line), box, k)
        samples.append(boxes.sample(label if label.is_file() else image))
        clipped += boxes.clipped
    return samples, clipped


def read_yolo(root: Path, sizer: Sizer) -> Read:
    classes, source = yolo_names(root)
    split_reads = {split: _yolo_split(root, split, classes, source, sizer) for split in SPLITS}
    return Read(classes, {s: r[0] for s, r in split_reads.items()}, {s: r[1] for s, r in split_reads.items()})
