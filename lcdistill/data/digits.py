"""`lcdistill data digits OUT`: scikit-learn's bundled handwritten digits as an ImageFolder."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from lcdistill.errors import UserError


@contextmanager
def staged(out: str | Path) -> Iterator[Path]:
    """A hidden staging folder beside OUT, renamed to OUT when the block ends without error.

    OUT is either complete or absent; an existing non-empty OUT is refused."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty", "choose an empty folder or delete it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield staging
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_digits(out: str | Path, seed: int = 0, val_fraction: float = 0.2) -> tuple[int, int]:
    """scikit-learn's bundled handwritten digits as an ImageFolder of 32x32 RGB PNGs, split per class.

    Written into a hidden sibling folder and renamed into place at the end, so OUT is
    either complete or absent."""
    from sklearn.datasets import load_digits

    counts = [0, 0]
    with staged(out) as staging:
        digits = load_digits()
        rng = np.random.RandomState(seed)
        for label in range(10):
            idx = np.flatnonzero(digits.target == label)
            rng.shuffle(idx)
            n_val = int(round(len(idx) * val_fraction))
            for k, i in enumerate(idx):
                split = "val" if k < n_val else "train"
                counts[split == "val"] += 1
                pixels = (digits.images[i] / 16.0 * 255).astype(np.uint8)
                image = Image.fromarray(pixels, "L").resize((32, 32), Image.BILINEAR).convert("RGB")
                folder = staging / split / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                image.save(folder / f"{i:04d}.png", format="PNG")
    return counts[0], counts[1]
