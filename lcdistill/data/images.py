"""Reading image files: which files are images, decoding any of them as RGB, naming a bad one."""

from __future__ import annotations

import numpy as np
from PIL import Image

from lcdistill.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# What PIL raises for files it cannot decode (UnidentifiedImageError is an OSError; a
# header claiming billions of pixels is a DecompressionBombError, a plain Exception).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
SKIP_FIX = "delete or replace it, or pass --skip-bad-images"


def unreadable(path, error: BaseException, detail: bool = True) -> UserError:
    """The one-line error for a file PIL (or the JPEG decoder) cannot read."""
    what = f"{type(error).__name__}: {error}" if detail else type(error).__name__
    return UserError(f"unreadable image file {path} ({what})", SKIP_FIX)


def check_image(path: str) -> None:
    """Open the header only: catches empty, truncated-header and non-image files cheaply."""
    try:
        with Image.open(path) as im:
            im.size  # noqa: B018 - forces the header parse
    except DECODE_ERRORS as e:
        raise unreadable(path, e, detail=False) from None


def load_rgb(path) -> Image.Image:
    """Any PIL-readable image as 8-bit RGB (grayscale, RGBA, CMYK, 16-bit, palette)."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16/32-bit grayscale: scale to 8 bits instead of clipping at 255
            arr = np.asarray(im, dtype=np.float64)
            # I;16 is 16-bit by definition (a dark frame must stay dark); plain I may hold either range
            top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
            im = Image.fromarray((arr / top * 255).clip(0, 255).astype(np.uint8), "L")
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            back = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(back, im)
        return im.convert("RGB")
