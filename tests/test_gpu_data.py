"""The GPU data path (decode + crop/flip on the device), checked on CPU against timm's CPU path."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAST, cli_ok
from lcdistill import data, recipe as recipes
from lcdistill.data import gpu as gpu_data
from lcdistill.errors import UserError

CPU = torch.device("cpu")
SIZE = 24
# non-square sizes too, so a swapped width/height would show
SHAPES = [(32, 32), (48, 32), (32, 44), (40, 36)]


@pytest.fixture(scope="module")
def jpeg_data(digits, tmp_path_factory) -> Path:
    """The first digits of each class written as JPEG at a few sizes: 8 train, 3 val per class."""
    out = tmp_path_factory.mktemp("jpeg") / "data"
    for split, n in (("train", 8), ("val", 3)):
        for folder in sorted((digits / split).iterdir()):
            (out / split / folder.name).mkdir(parents=True)
            for k, f in enumerate(sorted(folder.iterdir())[:n]):
                im = Image.open(f).convert("RGB").resize(SHAPES[k % len(SHAPES)], Image.BILINEAR)
                im.save(out / split / folder.name / f"{f.stem}.jpg", quality=92)
    return out


def recipe(**data_keys) -> dict:
    return recipes.build([{"student": {"name": "resnet18"}, "data": {"gpu_decode": True, **data_keys}}])


def both_paths(root: Path, training: bool, interpolation: str = "bilinear", crop_pct: float = 0.875, workers: int = 0, **data_keys):
    """(CPU timm loader, GPU-style loader) over the same split, seed and order."""
    rec = recipe(**data_keys)
    train, val = data.scan(root)
    split = train if training else val
    config = {"interpolation": interpolation, "crop_pct": crop_pct}
    if training:
        cpu = data.ImageDataset(split, data.transforms(SIZE, config, rec["data"], True), rec["train"]["seed"])
    else:
        cpu = data.ImageDataset(split, data.eval_transform({**config, "input_size": [3, SIZE, SIZE]}))
    gpu = gpu_data.pick(cpu, split, SIZE, config, rec, CPU, training)
    assert isinstance(gpu, gpu_data.JpegDataset)

    def loader(dataset):
        made = data.train_loader(dataset, 8, workers, 0, 1, 0, False) if training else data.eval_loader(dataset, 8, workers)
        return gpu_data.on_device(made, CPU)

    return loader(cpu), loader(gpu), gpu


def collect(loader):
    images, labels, bad = zip(*loader)
    return torch.cat(images), torch.cat(labels), torch.cat(bad)


# ---- the same images as timm's CPU path ---------------------------------------------------------
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_gpu_path_matches_the_timm_cpu_path(jpeg_data, training, interpolation):
    cpu_loader, gpu_loader, _ = both_paths(jpeg_data, training, interpolation)
    a, la, _ = collect(cpu_loader)
    b, lb, bad = collect(gpu_loader)
    assert b.shape == a.shape == (len(a), 3, SIZE, SIZE) and b.dtype == torch.float32
    assert torch.equal(la, lb) and not bad.any()
    assert 0.0 <= b.min() and b.max() <= 1.0
    # same crop boxes and flips: per image only decoder/resampling rounding differs
    per_image = (a - b).abs().flatten(1).mean(1)
    assert per_image.max() < 0.01, per_image.max()
    for reduce in (lambda x: x.mean((0, 2, 3)), lambda x: x.std((0, 2, 3))):
        assert torch.allclose(reduce(a), reduce(b), atol=0.005)


def test_other_crops_would_show(jpeg_data):
    # the comparison above is sharp: the next epoch's crops differ clearly
    cpu_loader, gpu_loader, gpu = both_paths(jpeg_data, True)
    a, _, _ = collect(cpu_loader)
    gpu.set_epoch(1)
    b, _, _ = collect(gpu_loader)
    assert (a - b).abs().flatten(1).mean(1).mean() > 0.05


def test_crop_area_and_ratio_follow_random_resized_crop():
    from torchvision.transforms import RandomResizedCrop

    split = data.Split(["a"], [("x.jpg", 0)] * 2000)
    dataset = gpu_data.JpegDataset(split, gpu_data.Augment(224, True))
    ours = torch.stack([dataset.draw(500, 375, i) for i in range(len(split.samples))]).double()
    torch.manual_seed(0)
    theirs = torch.tensor([RandomResizedCrop.get_params(torch.empty(3, 375, 500), (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(2000)]).double()
    for boxes in (ours, theirs):
        top, left, h, w = boxes[:, :4].T
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= 375).all() and (left + w <= 500).all()
    area = lambda b: b[:, 2] * b[:, 3] / (500 * 375)  # noqa: E731
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    assert torch.allclose(area(ours).quantile(q), area(theirs).quantile(q), atol=0.05)
    log_ratio = lambda b: (b[:, 3] / b[:, 2]).log()  # noqa: E731
    assert torch.allclose(log_ratio(ours).quantile(q), log_ratio(theirs).quantile(q), atol=0.06)
    assert 0.45 < ours[:, 4].mean() < 0.55  # hflip 0.5


# ---- determinism -----------------------------------------------------------------------------------
def test_same_seed_same_batches_with_any_worker_count(jpeg_data):
    _, first, _ = both_paths(jpeg_data, True)
    _, again, _ = both_paths(jpeg_data, True, workers=2)
    a, la, _ = collect(first)
    b, lb, _ = collect(again)
    assert torch.equal(a, b) and torch.equal(la, lb)


def test_flip_probability_one_flips_every_image(jpeg_data):
    _, plain, _ = both_paths(jpeg_data, True, hflip=0.0)
    _, flipped, _ = both_paths(jpeg_data, True, hflip=1.0)
    a, _, _ = collect(plain)
    b, _, _ = collect(flipped)
    assert torch.equal(a.flip(-1), b)


# ---- unreadable files ------------------------------------------------------------------------------
def broken_copy(jpeg_data: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A copy with one truncated JPEG and one PNG named .jpg: (root, truncated file, png file)."""
    root = tmp_path / "data"
    for f in jpeg_data.rglob("*.jpg"):
        dest = root / f.relative_to(jpeg_data)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(f.read_bytes())
    files = sorted((root / "train" / "3").iterdir())
    truncated, png = files[0], files[1]
    truncated.write_bytes(truncated.read_bytes()[:-200])  # header intact, image data cut
    buffer = io.BytesIO()
    Image.open(png).save(buffer, format="PNG")
    png.write_bytes(buffer.getvalue())
    return root, truncated, png


def test_unreadable_jpeg_stops_with_its_name(jpeg_data, tmp_path):
    root, truncated, _ = broken_copy(jpeg_data, tmp_path)
    _, loader, _ = both_paths(root, True)
    with pytest.raises(UserError, match=truncated.name):
        collect(loader)


def test_unreadable_jpeg_is_replaced_with_skip_bad(jpeg_data, tmp_path):
    root, _, _ = broken_copy(jpeg_data, tmp_path)
    cpu_loader, loader, _ = both_paths(root, True, skip_bad_images=True)
    images, labels, bad = collect(loader)
    assert len(images) == len(cpu_loader) * 8 and int(bad.sum()) == 1
    assert torch.isfinite(images).all()


def test_a_png_named_jpg_is_read_through_pil(jpeg_data, tmp_path):
    root, truncated, png = broken_copy(jpeg_data, tmp_path)
    truncated.unlink()
    cpu_loader, gpu_loader, _ = both_paths(root, False)
    (a, _, _), (b, _, bad) = collect(cpu_loader), collect(gpu_loader)
    assert not bad.any() and (a - b).abs().max() < 0.02


# ---- which path a run takes -------------------------------------------------------------------------
def test_auto_takes_the_gpu_path_only_for_cuda_and_jpeg(jpeg_data, digits):
    jpeg, _ = data.scan(jpeg_data)
    png = data.Split(["0"], [(str(f), 0) for f in sorted((digits / "train" / "0").iterdir())])
    plain, cfg = recipe()["data"], {"interpolation": "bicubic"}
    cuda = torch.device("cuda")
    assert gpu_data.use_gpu_decode("auto", jpeg, cuda, plain, cfg, True)
    assert not gpu_data.use_gpu_decode("auto", jpeg, CPU, plain, cfg, True)
    assert not gpu_data.use_gpu_decode("auto", png, cuda, plain, cfg, True)
    assert not gpu_data.use_gpu_decode("auto", jpeg, cuda, {**plain, "color_jitter": 0.4}, cfg, True)
    assert gpu_data.use_gpu_decode("auto", jpeg, cuda, {**plain, "color_jitter": 0.4}, cfg, False)  # eval has no jitter
    assert not gpu_data.use_gpu_decode(False, jpeg, cuda, plain, cfg, True)
    assert gpu_data.use_gpu_decode(True, jpeg, CPU, plain, cfg, True)
    with pytest.raises(UserError, match="needs JPEG"):
        gpu_data.use_gpu_decode(True, png, CPU, plain, cfg, True)
    with pytest.raises(UserError, match="auto_augment"):
        gpu_data.use_gpu_decode(True, jpeg, CPU, {**plain, "auto_augment": "rand-m9-mstd0.5"}, cfg, True)
    with pytest.raises(UserError, match="gpu_decode"):
        recipe(gpu_decode="sometimes")


def test_a_run_with_gpu_decode_on_cpu(jpeg_data, tmp_path):
    out = tmp_path / "run"
    result = cli_ok("train", "--model", "mobilenetv2_050", "--data", jpeg_data, *FAST, "--batch-size", "16", "--device", "cpu",
                    "--set", "data.gpu_decode=true", "--out", out)
    assert "JPEGs decoded and augmented on cpu" in result.stdout
    row = next(csv.DictReader(open(out / "summary.csv")))
    assert int(row["val_images"]) == 30 and np.isfinite(float(row["loss"]))


# ---- on a real GPU ----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cuda_decode_matches_the_cpu_path(jpeg_data, training):
    cpu_loader, gpu_loader, _ = both_paths(jpeg_data, training)
    gpu_loader.device = torch.device("cuda")
    a, la, _ = collect(cpu_loader)
    batches = list(gpu_loader)
    assert all(images.is_cuda and labels.is_cuda for images, labels, _ in batches)
    b = torch.cat([images.cpu() for images, _, _ in batches])
    assert torch.equal(la, torch.cat([labels.cpu() for _, labels, _ in batches]))
    # nvJPEG's IDCT and upsampling differ a little from libjpeg-turbo's
    assert b.shape == a.shape and (a - b).abs().flatten(1).mean(1).max() < 0.03
