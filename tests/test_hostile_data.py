"""Data as it arrives in the wild: odd-but-good images train, bad files are named or skipped.

Odd but good: grayscale, RGBA, palette, CMYK JPEG, 16-bit PNG, a 6000x6000 image, class folders
named 'café ☕' and '数字', a symlink loop, hidden files. Bad: a truncated JPEG (its header reads
fine; it fails only when decoded, inside a loader worker), an empty PNG, a text file named .jpg,
a symlink pointing at itself, a PNG whose header claims 1.6 billion pixels.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_user_error, cli_process
from lcdistill import artifacts
from lcdistill.data import load_rgb, scan
from lcdistill.errors import UserError

CLASSES = ["café ☕", "plain", "数字"]  # sorted as scan sorts them
TRAIN, VAL = 8, 3
TRAIN_FLAGS = ["--model", "mobilenetv2_050", "--epochs", "1", "--input-size", "32", "--workers", "0",
               "--set", "data.crop_pct=1.0", "--device", "cpu"]


# ---- building the data ------------------------------------------------------------------------
def base(small_data: Path, out: Path) -> Path:
    """3 classes of digits under odd names: TRAIN train and VAL val images each."""
    for split, n in (("train", TRAIN), ("val", VAL)):
        for digit, name in zip("012", CLASSES):
            dest = out / split / name
            dest.mkdir(parents=True)
            for f in sorted((small_data / split / digit).iterdir())[:n]:
                shutil.copy(f, dest / f.name)
    return out


def odd_but_good(folder: Path) -> dict[str, tuple[int, int]]:
    """Images PIL reads in other modes than RGB; returns name -> size."""
    images = {
        "gray.png": Image.new("L", (32, 32), 90),
        "rgba.png": Image.new("RGBA", (40, 30), (10, 200, 30, 128)),
        "palette.png": Image.new("RGB", (32, 32), (200, 10, 10)).convert("P"),
        "cmyk.jpg": Image.new("CMYK", (32, 32), (0, 128, 128, 0)),
        "deep.png": Image.fromarray(np.full((32, 32), 40000, np.uint16)),
        "huge.png": Image.new("RGB", (6000, 6000), (30, 60, 90)),  # compresses to a few hundred KB
    }
    for name, image in images.items():
        image.save(folder / name)
    return {name: image.size for name, image in images.items()}


def clutter(folder: Path) -> None:
    """What a copied folder carries besides images: none of it may count as an image."""
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + os.urandom(64))
    (folder / "._scan.jpg").write_bytes(b"\0\5\26\7" + os.urandom(64))  # macOS AppleDouble
    (folder / "loop").symlink_to(".")
    (folder / "up").symlink_to("..")  # would re-read the other classes as this one


def truncated_jpeg(path: Path) -> None:
    pixels = (np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def png_bomb(path: Path) -> None:
    """A valid PNG header for 40000x40000 pixels and no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


BAD = {
    "truncated.jpg": truncated_jpeg,
    "empty.png": lambda p: p.write_bytes(b""),
    "text.jpg": lambda p: p.write_text("this is a text file, not a JPEG"),
    "self.jpg": lambda p: p.symlink_to(p.name),
    "bomb.png": png_bomb,
}


@pytest.fixture(scope="module")
def odd_data(small_data, tmp_path_factory):
    root = base(small_data, tmp_path_factory.mktemp("odd") / "data")
    sizes = odd_but_good(root / "train" / "plain")
    clutter(root / "train" / "plain")
    clutter(root / "val" / "数字")
    return root, sizes


@pytest.fixture(scope="module")
def odd_run(odd_data, tmp_path_factory):
    root, _ = odd_data
    out = tmp_path_factory.mktemp("odd-run") / "run"
    proc = cli_process("train", "--data", root, *TRAIN_FLAGS, "--batch-size", "10", "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out, proc


# ---- odd but good ----------------------------------------------------------------------------
def test_odd_images_load_as_rgb(odd_data):
    root, sizes = odd_data
    for name, size in sizes.items():
        image = load_rgb(str(root / "train" / "plain" / name))
        assert image.mode == "RGB" and image.size == size, name
    assert load_rgb(str(root / "train" / "plain" / "deep.png")).getpixel((0, 0))[0] == int(40000 / 65535 * 255)


def test_scan_ignores_hidden_files_and_symlink_loops(odd_data):
    root, sizes = odd_data
    train, val = scan(root)
    assert train.classes == CLASSES == val.classes
    assert len(train.samples) == 3 * TRAIN + len(sizes) and len(val.samples) == 3 * VAL
    paths = [p for p, _ in train.samples + val.samples]
    assert len(set(map(os.path.realpath, paths))) == len(paths), "an image was found twice"
    assert not [p for p in paths if "/loop/" in p or "/up/" in p or os.path.basename(p).startswith(".")]


def test_training_on_odd_images(odd_run):
    out, proc = odd_run
    assert proc.stderr.strip() == "", proc.stderr
    assert json.loads((out / "student.json").read_text())["classes"] == CLASSES
    rows = list(csv.DictReader(open(out / "summary.csv", newline="", encoding="utf-8")))
    assert rows[0]["skipped_images"] == "0"
    assert json.loads((out / "run.json").read_text())["skipped_files"] == []


# ---- bad files: one line naming the file, exit 2, no run folder --------------------------------
@pytest.mark.parametrize("bad", list(BAD))
def test_bad_file_is_named(small_data, tmp_path, bad):
    root = base(small_data, tmp_path / "data")
    path = root / "train" / "数字" / bad
    BAD[bad](path)
    out = tmp_path / "run"
    # The truncated JPEG passes the header check and fails in a loader worker, which re-raises.
    workers = ["--workers", "2"] if bad == "truncated.jpg" else []
    proc = cli_process("train", "--data", root, *TRAIN_FLAGS, "--batch-size", "5", *workers, "--out", out)
    assert_user_error(proc, "unreadable image", str(path), "--skip-bad-images", run_dir=out)


def test_skip_bad_images_trains_and_counts(odd_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(odd_data[0], root, symlinks=True)
    for name, make in BAD.items():
        make(root / "train" / "café ☕" / name)
    for name in ("truncated.jpg", "text.jpg"):
        BAD[name](root / "val" / "plain" / name)
    out = tmp_path / "run"
    # 30 good + 1 truncated train images pass the header check: batch 31 drops none of them
    proc = cli_process("train", "--data", root, *TRAIN_FLAGS, "--batch-size", "31", "--skip-bad-images", "--out", out)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "skipped 5 unreadable image files" in text, text  # header check: 4 train, 1 val
    assert "skipped 1 bad images" in text, text  # the truncated train JPEG, at decode time
    rows = list(csv.DictReader(open(out / "summary.csv", newline="", encoding="utf-8")))
    assert rows[0]["skipped_images"] == "1"
    skipped = json.loads((out / "run.json").read_text())["skipped_files"]
    assert sorted(os.path.basename(p) for p in skipped) == ["bomb.png", "empty.png", "self.jpg", "text.jpg", "text.jpg"]


def test_a_class_of_only_bad_files_is_named_even_when_skipping(small_data, tmp_path):
    root = base(small_data, tmp_path / "data")
    for f in (root / "val" / "plain").iterdir():
        f.write_bytes(b"")
    out = tmp_path / "run"
    proc = cli_process("train", "--data", root, *TRAIN_FLAGS, "--batch-size", "5", "--skip-bad-images", "--out", out)
    assert_user_error(proc, str(root / "val" / "plain"), "no readable images", run_dir=out)


# ---- model input of the wrong shape or dtype -----------------------------------------------------
def test_predict_names_wrong_input(odd_run):
    out, _ = odd_run
    predict = artifacts.identify(out).predict
    assert predict(torch.rand(2, 3, 32, 32, dtype=torch.float64)).shape == (2, 3)  # any float is cast
    for bad, words in [
        (torch.rand(3, 32, 32), ["[N, 3, 32, 32]", "[3, 32, 32]"]),
        (torch.rand(2, 3, 64, 64), ["[N, 3, 32, 32]", "[2, 3, 64, 64]", "32x32"]),
        (torch.rand(2, 1, 32, 32), ["[2, 1, 32, 32]", "3 channels"]),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), ["uint8", "[0, 1]"]),
        (np.zeros((2, 3, 32, 32), np.float32), ["ndarray"]),
    ]:
        with pytest.raises(UserError) as info:
            predict(bad)
        for word in words:
            assert word in info.value.line(), info.value.line()
