"""ImageFolder data: the digits writer, layout checks, image decoding, seeded loading."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import subset
from lcdistill.data import ImageDataset, load_rgb, scan, transforms, write_digits
from lcdistill.errors import UserError

EVAL = {"scale": [0.08, 1.0], "ratio": [0.75, 1.33], "hflip": 0.0, "color_jitter": 0.0, "auto_augment": None}
CFG = {"interpolation": "bilinear", "crop_pct": 1.0}


# ---- write_digits ------------------------------------------------------------------------------
def test_digits_split_is_per_class_80_20(digits):
    from sklearn.datasets import load_digits

    per_class = Counter(load_digits().target.tolist())
    train, val = scan(digits)
    assert train.classes == val.classes == [str(i) for i in range(10)]
    assert len(train.samples) == 1438 and len(val.samples) == 359
    n_train = Counter(label for _, label in train.samples)
    n_val = Counter(label for _, label in val.samples)
    for label, total in per_class.items():
        assert n_val[label] == round(total * 0.2), label
        assert n_train[label] + n_val[label] == total
    # every digit exactly once, and no image in both splits
    index = lambda split: {int(Path(p).stem) for p, _ in split.samples}  # noqa: E731
    assert index(train).isdisjoint(index(val))
    assert index(train) | index(val) == set(range(1797))


def test_digits_images_are_the_bundled_digits(digits):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    for path in sorted((digits / "val" / "3").iterdir())[:3]:
        i = int(path.stem)
        assert bunch.target[i] == 3
        im = load_rgb(str(path))
        assert im.size == (32, 32)
        small = np.asarray(im.convert("L").resize((8, 8), Image.BILINEAR), dtype=np.float64)
        reference = bunch.images[i] / 16.0 * 255
        assert np.corrcoef(small.ravel(), reference.ravel())[0, 1] > 0.9


def test_digits_split_is_deterministic(digits, digits_cli):
    # write_digits (the session's copy) and `lcdistill data digits` (a second write, same
    # default seed): the same files in the same splits, byte for byte.
    again, _ = digits_cli
    for split in ("train", "val"):
        ours = sorted(p.relative_to(digits) for p in (digits / split).rglob("*.png"))
        theirs = sorted(p.relative_to(again) for p in (again / split).rglob("*.png"))
        assert ours == theirs
        assert all((digits / p).read_bytes() == (again / p).read_bytes() for p in ours[::7])


def test_write_digits_refuses_a_used_folder(tmp_path):
    (tmp_path / "val").mkdir()
    with pytest.raises(UserError, match="already exists"):
        write_digits(tmp_path)


# ---- scan ----------------------------------------------------------------------------------------
@pytest.fixture
def tiny(small_data, tmp_path) -> Path:
    return subset(small_data, tmp_path / "d", 3, 2, ["0", "1", "2"])


def test_scan_reads_the_layout(tiny):
    (tiny / "train" / "0" / ".hidden.png").write_text("ignored")
    (tiny / "train" / ".cache").mkdir()
    (tiny / "train" / "1" / "README.txt").write_text("not an image")
    nested = tiny / "train" / "2" / "more"
    nested.mkdir()
    (nested / "x.PNG").write_bytes(next((tiny / "train" / "2").glob("*.png")).read_bytes())
    train, val = scan(tiny)
    assert train.classes == ["0", "1", "2"] == val.classes
    assert Counter(label for _, label in train.samples) == {0: 3, 1: 3, 2: 4}
    assert len(val.samples) == 6
    assert all(os.path.isfile(p) for p, _ in train.samples)


@pytest.mark.parametrize("breakage, words", [
    (lambda d: d.rename(d.parent / "elsewhere"), ["not found"]),
    (lambda d: __import__("shutil").rmtree(d / "train"), ["no train/"]),
    (lambda d: __import__("shutil").rmtree(d / "val"), ["no val/"]),
    (lambda d: (d / "val" / "2").rename(d / "val" / "9"), ["classes differ", "'2'", "'9'"]),
    (lambda d: __import__("shutil").rmtree(d / "val" / "2"), ["classes differ", "'2'"]),
    (lambda d: [f.unlink() for f in (d / "train" / "1").iterdir()], ["no images", os.path.join("train", "1")]),
    (lambda d: [__import__("shutil").rmtree(c) for c in list((d / "val").iterdir())], ["no class folders"]),
    (lambda d: (d / "val" / "0" / "x.png").write_text("text"), ["unreadable image", os.path.join("val", "0", "x.png")]),
    (lambda d: (d / "train" / "0" / "empty.jpg").write_bytes(b""), ["unreadable image", "empty.jpg"]),
])
def test_scan_names_layout_errors(tiny, breakage, words):
    breakage(tiny)
    with pytest.raises(UserError) as info:
        scan(tiny)
    line = info.value.line()
    for word in words:
        assert word in line, line
    assert "\n" not in line


def test_scan_without_check_defers_bad_files_to_loading(tiny):
    bad = tiny / "train" / "0" / "x.png"
    bad.write_text("text")
    train, _ = scan(tiny, check=False)
    dataset = ImageDataset(train, transforms(32, CFG, EVAL, False))
    index = [p for p, _ in train.samples].index(str(bad))
    with pytest.raises(UserError, match=re.escape(str(bad))):
        dataset[index]
    skipping = ImageDataset(train, transforms(32, CFG, EVAL, False), skip_bad=True)
    image, label, skipped = skipping[index]
    assert image.shape == (3, 32, 32) and skipped == 1


# ---- load_rgb ---------------------------------------------------------------------------------------
def rgb(path) -> np.ndarray:
    im = load_rgb(str(path))
    assert im.mode == "RGB"
    return np.asarray(im)


def test_load_rgb_grayscale(tmp_path):
    Image.new("L", (4, 3), 77).save(tmp_path / "g.png")
    a = rgb(tmp_path / "g.png")
    assert a.shape == (3, 4, 3) and (a == 77).all()


def test_load_rgb_rgba_over_white(tmp_path):
    im = Image.new("RGBA", (2, 1))
    im.putpixel((0, 0), (255, 0, 0, 255))  # opaque red
    im.putpixel((1, 0), (0, 0, 0, 0))  # fully transparent
    im.save(tmp_path / "a.png")
    a = rgb(tmp_path / "a.png")
    assert tuple(a[0, 0]) == (255, 0, 0) and tuple(a[0, 1]) == (255, 255, 255)


def test_load_rgb_palette_with_transparency(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([0, 0, 255] + [0, 255, 0] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    im.info["transparency"] = 1
    im.save(tmp_path / "p.png", transparency=1)
    a = rgb(tmp_path / "p.png")
    assert tuple(a[0, 0]) == (0, 0, 255) and tuple(a[0, 1]) == (255, 255, 255)


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
def test_load_rgb_cmyk(tmp_path, suffix):
    path = tmp_path / f"c{suffix}"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path)  # pure red in CMYK
    with Image.open(path) as im:
        assert im.mode == "CMYK"
    a = rgb(path).astype(int)
    assert a.shape == (8, 8, 3)
    assert (a[..., 0] > 240).all() and (a[..., 1] < 15).all() and (a[..., 2] < 15).all()


@pytest.mark.parametrize("value16, expected", [(65535, 255), (32768, 128), (0, 0), (100, 0), (255, 1)])
def test_load_rgb_16_bit_scales_to_8_bit(tmp_path, value16, expected):
    path = tmp_path / "i16.png"
    Image.fromarray(np.full((3, 3), value16, dtype=np.uint16)).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    a = rgb(path)
    assert abs(int(a[0, 0, 0]) - expected) <= 1 and (a == a[0, 0, 0]).all()


def test_load_rgb_16_bit_gradient_keeps_its_order(tmp_path):
    values = np.linspace(0, 65535, 16).astype(np.uint16).reshape(4, 4)
    Image.fromarray(values).save(tmp_path / "grad.png")
    a = rgb(tmp_path / "grad.png")[..., 0].ravel().astype(int)
    assert a[0] == 0 and a[-1] == 255 and (np.diff(a) > 0).all()


# ---- the dataset -------------------------------------------------------------------------------------
def test_dataset_augmentation_is_seeded_per_sample(tiny):
    train, _ = scan(tiny)
    settings = {**EVAL, "hflip": 0.5, "scale": [0.3, 1.0]}
    a = ImageDataset(train, transforms(32, CFG, settings, True), seed=5)
    b = ImageDataset(train, transforms(32, CFG, settings, True), seed=5)
    torch.manual_seed(123)
    first = a[4][0]
    torch.rand(10)  # the global stream must not matter
    assert torch.equal(first, b[4][0])
    a.set_epoch(1)
    assert not torch.equal(a[4][0], first), "a new epoch should augment differently"
    assert first.min() >= 0 and first.max() <= 1 and first.shape == (3, 32, 32)
