"""`lcdistill data digit-crops`: the digit-crops ImageFolder writer, its manifest, determinism, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from conftest import assert_user_error, cli, cli_ok
from lcdistill import data
from lcdistill.data import crops
from lcdistill.data.crops import CLASSES, MANIFEST, write_digit_crops
from lcdistill.data.scenes import split_sources
from lcdistill.errors import UserError

N_TRAIN, N_VAL = 200, 60


@pytest.fixture(scope="module")
def crop_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("crops") / "crops"
    assert write_digit_crops(out, train=N_TRAIN, val=N_VAL, seed=0) == (N_TRAIN, N_VAL)
    return out


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def pngs(root: Path, split: str) -> dict[str, int]:
    """{id: class digit} of a split's files on disk."""
    return {p.stem: int(p.parent.name) for p in (root / split).glob("*/*.png")}


def test_scan_reads_ten_classes_with_the_right_counts(crop_set):
    train, val = data.scan(crop_set)
    assert train.classes == val.classes == CLASSES
    assert len(train.samples) == N_TRAIN and len(val.samples) == N_VAL
    counts = np.bincount([label for _, label in train.samples], minlength=10)
    assert counts.min() >= 1  # every class appears in train
    assert counts.tolist() == [N_TRAIN // 10] * 10  # and balanced
    assert np.bincount([label for _, label in val.samples], minlength=10).tolist() == [N_VAL // 10] * 10


def test_images_are_rgb_at_the_size_and_vary(crop_set):
    paths = sorted((crop_set / "train").glob("*/*.png"))[:40]
    images = [Image.open(p) for p in paths]
    assert {(im.mode, im.size) for im in images} == {("RGB", (32, 32))}
    arrays = np.stack([np.asarray(im, dtype=np.float64) for im in images])
    assert len({a.tobytes() for a in arrays}) == len(arrays)
    assert arrays.std(axis=(1, 2)).min() > 5  # a digit on a background, not a flat fill


def test_train_and_val_come_from_disjoint_halves(crop_set):
    digits = load_digits()
    manifest = json.loads((crop_set / MANIFEST).read_text())
    train_half, val_half = split_sources(len(digits.images), 0, 0.5)
    used = {split: set(manifest[split].values()) for split in ("train", "val")}
    assert not used["train"] & used["val"]
    assert used["train"] <= set(train_half.tolist()) and used["val"] <= set(val_half.tolist())
    assert len(used["train"]) > N_TRAIN // 2  # many different sources, not one repeated
    for split in ("train", "val"):
        on_disk = pngs(crop_set, split)
        assert on_disk.keys() == manifest[split].keys()  # the manifest names every file
        assert all(digits.target[source] == on_disk[name] for name, source in manifest[split].items())


def test_plain_crops_are_the_digits_white_on_black_and_share_no_source_with_scene_val(tmp_path):
    """--plain: the digit as `data digits` draws it, from the crops' train half, which holds no val digit of the
    scenes of the same seed (the detection demo pretrains on it and is scored on those scenes)."""
    out = tmp_path / "plain"
    write_digit_crops(out, train=100, val=20, seed=0, plain=True)
    digits = load_digits()
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["plain"] is True
    name, source = next(iter(manifest["train"].items()))
    path = next((out / "train").glob(f"*/{name}.png"))
    want = Image.fromarray((digits.images[source] / 16.0 * 255).astype(np.uint8), "L").resize((32, 32), Image.BILINEAR).convert("RGB")
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(want))
    _, scene_val = split_sources(len(digits.images), 0, 0.2)
    assert not set(manifest["train"].values()) & set(scene_val.tolist())


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a, b, c = (tmp_path / n for n in "abc")
    for out, seed in ((a, 5), (b, 5), (c, 6)):
        write_digit_crops(out, size=16, train=20, val=10, seed=seed)
    fa, fb, fc = files(a), files(b), files(c)
    assert fa == fb and len(fa) == 20 + 10 + 1
    images_a = {v for k, v in fa.items() if k.endswith(".png")}
    images_c = {v for k, v in fc.items() if k.endswith(".png")}
    assert not images_a & images_c


def test_val_count_does_not_change_train(tmp_path):
    write_digit_crops(tmp_path / "a", size=16, train=20, val=10, seed=1)
    write_digit_crops(tmp_path / "b", size=16, train=20, val=30, seed=1)
    fa, fb = files(tmp_path / "a" / "train"), files(tmp_path / "b" / "train")
    assert fa == fb


def test_bad_arguments_raise_and_write_nothing(tmp_path):
    with pytest.raises(UserError, match="too small"):
        write_digit_crops(tmp_path / "small", size=15, train=20, val=20)
    with pytest.raises(UserError, match="--train 9"):
        write_digit_crops(tmp_path / "train", size=16, train=9, val=20)
    with pytest.raises(UserError, match="--val 0"):
        write_digit_crops(tmp_path / "val", size=16, train=20, val=0)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    with pytest.raises(UserError, match="already exists"):
        write_digit_crops(tmp_path / "used", size=16, train=20, val=20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["used"]


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    real, calls = crops._crop, []

    def failing(*args):
        calls.append(1)
        if len(calls) > 15:
            raise OSError("disk full")
        return real(*args)

    monkeypatch.setattr(crops, "_crop", failing)
    with pytest.raises(OSError):
        write_digit_crops(tmp_path / "out", size=16, train=20, val=10)
    assert len(calls) == 16 and list(tmp_path.iterdir()) == []  # no OUT, no hidden staging folder


def test_cli_writes_the_set_and_reports(tmp_path):
    out = tmp_path / "crops"
    result = cli_ok("data", "digit-crops", out, "--size", "24", "--train", "30", "--val", "20", "--seed", "2")
    assert result.stdout.strip() == f"wrote 30 train and 20 val images of 10 classes to {out}"
    train, val = data.scan(out)
    assert (len(train.samples), len(val.samples)) == (30, 20)
    assert Image.open(train.samples[0][0]).size == (24, 24)


@pytest.mark.parametrize("flags, words", [
    (["--size", "8"], ["too small"]),
    (["--train", "5"], ["--train 5"]),
    (["--val", "3"], ["--val 3"]),
])
def test_cli_bad_arguments_exit_2_with_one_line(tmp_path, flags, words):
    out = tmp_path / "crops"
    assert_user_error(cli("data", "digit-crops", out, *flags), *words, run_dir=out)
