"""`write_digit_scenes`: a small semantic-segmentation set in the PASCAL VOC 2012 layout.

Each image is a canvas with 1 to 4 of scikit-learn's bundled handwritten digits (8x8, values
0-16), upscaled and pasted at seeded random positions over a noisy, non-uniform background,
each stroke in a colour that stands out from the background under it. The mask gives a digit's
stroke pixels the class digit+1 (1-10), the background 0, and a thin ring around each stroke 255
(ignore, as VOC marks object borders). A later digit paints over an earlier one.

Train and val scenes draw their digits from disjoint halves of the 1,797 source images, so val
measures generalisation to unseen handwriting. Written as VOC 2012 is laid out:

    OUT/JPEGImages/<id>.jpg                 RGB, JPEG quality 95
    OUT/SegmentationClass/<id>.png          palette PNG of class indices, VOC colours
    OUT/ImageSets/Segmentation/train.txt    ids, one per line (and val.txt)
    OUT/ImageSets/Main/train.txt            the same ids, so the set also reads as VOC detection (and val.txt)
    OUT/Annotations/<id>.xml                VOC XML: each visible digit's class and box (1-based pixels)
    OUT/classes.txt                         background, 0, 1, ..., 9
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image

from lcdistill.data.digits import staged
from lcdistill.errors import UserError

IGNORE = 255
CLASSES = ["background"] + [str(d) for d in range(10)]
DIGIT_SIZES = (14, 30)  # side of an upscaled digit, px
STROKE = 0.4  # upscaled intensity (0-1) above which a pixel is stroke
MIN_CONTRAST = 80.0  # luminance between a stroke's colour and the background under it
PLACE_TRIES, MAX_COVER = 8, 0.1  # spots tried per digit; the share of its stroke it may lay over earlier digits


def voc_palette() -> list[int]:
    """PASCAL VOC's colour map: 256 RGB triples (bit-interleaved; 0 black, 1 (128,0,0), ..., 255 (224,224,192))."""
    palette: list[int] = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= (c & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def split_sources(n: int, seed: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (train, val) source digit indices out of n: a seeded draw of round(n * val_fraction) for val."""
    order = np.random.default_rng([seed, 1]).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _resize(array: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
    """A float 2-D array resized by PIL to (width, height)."""
    return np.asarray(Image.fromarray(array.astype(np.float32), "F").resize(size, resample), dtype=np.float64)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """float RGB [size, size, 3]: a linear gradient between two random colours plus smooth blotches."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    angle = rng.uniform(0, 2 * math.pi)
    t = xx * math.cos(angle) + yy * math.sin(angle)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    canvas = c0 * (1 - t)[..., None] + c1 * t[..., None]
    coarse = rng.normal(0, 25, (4, 4, 3))
    canvas += np.stack([_resize(coarse[..., c], (size, size), Image.BICUBIC) for c in range(3)], -1)
    return canvas.clip(0, 255)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _contrasting(rng: np.random.Generator, under: float) -> np.ndarray:
    """A random colour whose luminance is at least MIN_CONTRAST from `under` (black or white failing that)."""
    for _ in range(32):
        colour = rng.uniform(0, 255, 3)
        if abs(float(_luminance(colour)) - under) >= MIN_CONTRAST:
            return colour
    return np.zeros(3) if under > 127.5 else np.full(3, 255.0)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Boolean 3x3 dilation (one pixel, 8-connected)."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy:dy + h, dx:dx + w]
    return out


def _place(rng: np.random.Generator, stroke: np.ndarray, mask: np.ndarray, size: int) -> tuple[int, int]:
    """(top, left) for a digit: the first of a few random spots where it covers at most MAX_COVER of its
    stroke's worth of earlier digits, else the spot covering least (digits may overlap, but most stay legible)."""
    side = stroke.shape[0]
    best, best_cover = (0, 0), None
    for _ in range(PLACE_TRIES):
        top, left = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
        cover = int((stroke & (mask[top:top + side, left:left + side] != 0)).sum())
        if best_cover is None or cover < best_cover:
            best, best_cover = (top, left), cover
        if cover <= MAX_COVER * stroke.sum():
            break
    return best


def _scene(rng: np.random.Generator, images: np.ndarray, targets: np.ndarray, pool: np.ndarray, size: int):
    """(RGB uint8 [size, size, 3], mask uint8 [size, size], objects [(digit, source index, box, occluded)])."""
    canvas = _background(rng, size)
    mask = np.zeros((size, size), np.uint8)
    owner = np.full((size, size), -1)  # which digit's stroke a pixel shows (-1: none)
    drawn: list[tuple[int, int, int]] = []  # (digit, source index, stroke pixels drawn)
    lo, hi = min(DIGIT_SIZES[0], size), min(DIGIT_SIZES[1], size)
    for k in range(int(rng.integers(1, 5))):
        source = int(rng.choice(pool))
        side = int(rng.integers(lo, hi + 1))
        ink = _resize(images[source] / 16.0, (side, side), Image.BILINEAR)
        if not (ink > STROKE).any():
            continue
        top, left = _place(rng, ink > STROKE, mask, size)
        alpha = np.zeros((size, size))
        alpha[top:top + side, left:left + side] = ((ink - (STROKE - 0.2)) / 0.4).clip(0, 1)  # sharpened edges
        stroke = np.zeros((size, size), bool)
        stroke[top:top + side, left:left + side] = ink > STROKE
        under = float(_luminance(canvas[stroke]).mean())
        canvas = canvas * (1 - alpha[..., None]) + _contrasting(rng, under) * alpha[..., None]
        ring = (_dilate(stroke) | (alpha > 0)) & ~stroke
        mask[ring], owner[ring] = IGNORE, -1
        mask[stroke], owner[stroke] = int(targets[source]) + 1, k
        drawn.append((int(targets[source]), source, int(stroke.sum())))
    canvas += rng.normal(0, rng.uniform(3, 10), canvas.shape)
    objects = []
    for k, (digit, source, pixels) in enumerate(drawn):
        ys, xs = np.nonzero(owner == k)
        if len(ys):  # boxes of the visible stroke, 1-based and inclusive as VOC writes them
            box = (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1)
            objects.append((digit, source, box, len(ys) < pixels))
    return canvas.round().clip(0, 255).astype(np.uint8), mask, objects


def _annotation(name: str, size: int, objects) -> ET.ElementTree:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2012"
    ET.SubElement(root, "filename").text = f"{name}.jpg"
    source = ET.SubElement(root, "source")
    ET.SubElement(source, "database").text = "lcdistill digit scenes (scikit-learn digits)"
    dims = ET.SubElement(root, "size")
    for tag, value in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(dims, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "1"
    for digit, index, (x0, y0, x1, y1), occluded in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = str(digit)
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "occluded").text = str(int(occluded))
        ET.SubElement(obj, "difficult").text = "0"
        box = ET.SubElement(obj, "bndbox")
        for tag, value in (("xmin", x0), ("ymin", y0), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(box, tag).text = str(value)
        ET.SubElement(obj, "source_index").text = str(index)  # not VOC: the scikit-learn digit drawn
    tree = ET.ElementTree(root)
    ET.indent(tree)
    return tree


def write_digit_scenes(out: str | Path, size: int = 64, images: int = 1500, seed: int = 0, val_fraction: float = 0.2) -> tuple[int, int]:
    """Write `images` size x size scenes of handwritten digits as a VOC 2012 segmentation set; (n_train, n_val).

    Written into a hidden sibling folder and renamed into place at the end, so OUT is
    either complete or absent; an existing non-empty OUT is refused."""
    from sklearn.datasets import load_digits

    if size < 16:
        raise UserError(f"scene size {size} is too small", "use a size of at least 16 px")
    n_val = int(round(images * val_fraction))
    if not 0 < val_fraction < 1 or not 0 < n_val < images:
        raise UserError(f"{images} images with val fraction {val_fraction} leave a split empty",
                        "write at least 2 images with a val fraction between 0 and 1")
    with staged(out) as staging:
        digits = load_digits()
        sources = dict(zip(("train", "val"), split_sources(len(digits.images), seed, val_fraction)))
        rng = np.random.default_rng([seed, 0])
        is_val = np.zeros(images, bool)
        is_val[rng.choice(images, n_val, replace=False)] = True
        folders = {name: staging / name for name in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation")}
        for folder in folders.values():
            folder.mkdir(parents=True)
        palette = voc_palette()
        ids: dict[str, list[str]] = {"train": [], "val": []}
        width = max(5, len(str(images - 1)))
        for i in range(images):
            split = "val" if is_val[i] else "train"
            name = f"{i:0{width}d}"
            image, mask, objects = _scene(rng, digits.images, digits.target, sources[split], size)
            Image.fromarray(image, "RGB").save(folders["JPEGImages"] / f"{name}.jpg", quality=95)
            indexed = Image.fromarray(mask, "P")
            indexed.putpalette(palette)
            indexed.save(folders["SegmentationClass"] / f"{name}.png")
            _annotation(name, size, objects).write(folders["Annotations"] / f"{name}.xml", encoding="utf-8")
            ids[split].append(name)
        main = staging / "ImageSets" / "Main"  # detection's list; written after the scenes, so it draws nothing from rng
        main.mkdir()
        for split, names in ids.items():
            listing = "".join(f"{n}\n" for n in names)
            (folders["ImageSets/Segmentation"] / f"{split}.txt").write_text(listing)
            (main / f"{split}.txt").write_text(listing)
        (staging / "classes.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    return len(ids["train"]), len(ids["val"])
