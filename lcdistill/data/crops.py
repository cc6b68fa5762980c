"""`write_digit_crops`: a harder, larger classification set of real handwritten digits.

`lcdistill data digits` gives 1,797 clean 8x8 digits, so val has 360 images and one image is
0.28 points of accuracy: too coarse to tell two distillation methods apart. Here each image is
one of scikit-learn's digits (8x8, values 0-16) upscaled by a random factor, pasted at a random
position over a noisy, non-uniform background, in a random stroke colour that stands out from
the background under it (the digit-scenes pieces from scenes.py). With 2,000 val images one
image is 0.05 points, and the clutter keeps accuracy off the ceiling.

Train and val draw from disjoint halves of the source digits, so val measures samples train
never saw, not the same 8x8 bitmaps on a new background (the data has no writer ids, so a
writer may appear in both halves). Classes are balanced (every split
holds n // 10 or n // 10 + 1 images of each digit), so every class folder exists in both.
Laid out as the classification task reads it (`data.scan`):

    OUT/train/<digit>/<id>.png    RGB PNG, size x size; digit is "0".."9"
    OUT/val/<digit>/<id>.png
    OUT/sources.json              seed, size, and per split {id: scikit-learn digit index}
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from lcdistill.data.digits import staged
from lcdistill.data.scenes import STROKE, _background, _contrasting, _luminance, _resize, split_sources
from lcdistill.errors import UserError

CLASSES = [str(d) for d in range(10)]
# The digit's side as a share of the canvas. Below ~0.45 (14 px at 32) an 8x8 stroke thins to a
# pixel or two and drowns in the noise; above 0.9 there is no room left to move, so position
# stops varying. Between, the model must find the digit at ~2x range of scales.
SCALE = (0.45, 0.9)
MIN_SIZE, MIN_IMAGES = 16, 10  # 10: one image per class, so every class folder exists
MANIFEST = "sources.json"


def _plain(digit: np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 [size, size, 3]: the digit white on black, filling the image, as `data digits` writes it."""
    grey = Image.fromarray((digit / 16.0 * 255).astype(np.uint8), "L").resize((size, size), Image.BILINEAR)
    return np.asarray(grey.convert("RGB"))


def _crop(rng: np.random.Generator, digit: np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 [size, size, 3]: one 8x8 digit pasted as `_scene` in scenes.py pastes each of its digits."""
    canvas = _background(rng, size)
    side = int(rng.integers(round(SCALE[0] * size), round(SCALE[1] * size) + 1))
    ink = _resize(digit / 16.0, (side, side), Image.BILINEAR)
    top, left = (int(v) for v in rng.integers(0, size - side + 1, 2))
    window = (slice(top, top + side), slice(left, left + side))
    alpha = ((ink - (STROKE - 0.2)) / 0.4).clip(0, 1)[..., None]  # the same sharpened edges as _scene
    stroke = ink > STROKE
    # Contrast against the background under the stroke (the whole window if the stroke is empty).
    under = float(_luminance(canvas[window][stroke if stroke.any() else slice(None)]).mean())
    canvas[window] = canvas[window] * (1 - alpha) + _contrasting(rng, under) * alpha
    canvas += rng.normal(0, rng.uniform(3, 10), canvas.shape)
    return canvas.round().clip(0, 255).astype(np.uint8)


def _check(size: int, train: int, val: int) -> None:
    if size < MIN_SIZE:
        raise UserError(f"crop size {size} is too small", f"use a size of at least {MIN_SIZE} px")
    for name, n in (("train", train), ("val", val)):
        if n < MIN_IMAGES:
            raise UserError(f"--{name} {n} is too few images", f"write at least {MIN_IMAGES} (one per class) to each of train and val")


def write_digit_crops(out: str | Path, size: int = 32, train: int = 10000, val: int = 2000, seed: int = 0,
                      plain: bool = False) -> tuple[int, int]:
    """Write `train` + `val` size x size digit crops as train/ and val/ ImageFolders; (n_train, n_val).

    plain: each digit white on black and filling the image, as `data digits` writes it, but drawn from
    the same halves of the source digits as the crops and the scenes of the same seed (whose val digits
    are in neither train half): a first pretraining stage that learns the shapes fast and never sees a
    val digit of either.

    Written into a hidden sibling folder and renamed into place at the end, so OUT is either
    complete or absent; an existing non-empty OUT is refused. The same arguments give
    byte-identical files; which source digit each image shows is in OUT/sources.json."""
    from sklearn.datasets import load_digits

    _check(size, train, val)
    with staged(out) as staging:
        digits = load_digits()
        halves = dict(zip(("train", "val"), split_sources(len(digits.images), seed, 0.5)))
        manifest: dict = {"seed": seed, "size": size, "scale": list(SCALE), "plain": plain}
        for k, (split, n) in enumerate((("train", train), ("val", val))):
            # Its own stream per split: changing --val leaves every train image as it was.
            rng = np.random.default_rng([seed, 2, k])
            pool = halves[split]
            by_class = [pool[digits.target[pool] == c] for c in range(10)]
            labels = rng.permutation(np.arange(n) % 10)
            for c in range(10):
                (staging / split / CLASSES[c]).mkdir(parents=True)
            width = max(5, len(str(n - 1)))
            used: dict[str, int] = {}
            for i, label in enumerate(labels):
                source = int(rng.choice(by_class[label]))  # with replacement, from this split's half only
                name = f"{i:0{width}d}"
                image = _plain(digits.images[source], size) if plain else _crop(rng, digits.images[source], size)
                Image.fromarray(image, "RGB").save(staging / split / CLASSES[label] / f"{name}.png", format="PNG")
                used[name] = source
            manifest[split] = used
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return train, val
