"""GPU data path for JPEG ImageFolders: workers read file bytes, the GPU decodes and augments.

CPU workers only read bytes and draw each sample's crop and flip, seeded by
(seed, epoch, index) exactly as `ImageDataset` seeds timm's transforms (data.samples) and with
timm's own RandomResizedCrop parameter logic, so both paths crop the same boxes.
The main process decodes a whole batch at once with torchvision's `decode_jpeg`
(nvJPEG on CUDA), then crops, resizes and flips on the device. Output: float images
in [0, 1], like the CPU path; each model normalises later with its own mean/std.
Everything also runs with device 'cpu', which is how the tests check it.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from lcdistill.data.folder import Split
from lcdistill.data.images import DECODE_ERRORS, load_rgb, unreadable
from lcdistill.data.samples import first_readable, sample_seed, seeded
from lcdistill.errors import UserError

JPEG_EXTENSIONS = (".jpg", ".jpeg")


@dataclass(frozen=True)
class Augment:
    """What timm's create_transform would do for one split, restricted to what the GPU path does."""

    size: int
    training: bool
    interpolation: str = "bilinear"
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    hflip: float = 0.5
    crop_pct: float = 0.875

    @classmethod
    def from_recipe(cls, size: int, config: dict, data: dict, training: bool) -> Augment:
        from timm.data import DEFAULT_CROP_PCT

        return cls(int(size), training, config.get("interpolation") or "bilinear",
                   tuple(data["scale"] or (0.08, 1.0)), tuple(data["ratio"] or (3 / 4, 4 / 3)),
                   float(data["hflip"]), float(config.get("crop_pct") or DEFAULT_CROP_PCT))


def unsupported(data: dict, config: dict, training: bool) -> str | None:
    """Why the GPU path cannot reproduce the CPU transform for this recipe, or None."""
    if training and data["color_jitter"]:
        return "data.color_jitter"
    if training and data["auto_augment"]:
        return "data.auto_augment"
    if config.get("interpolation") not in (None, "bilinear", "bicubic", "nearest"):
        return f"interpolation '{config.get('interpolation')}'"
    return None


def use_gpu_decode(setting, split: Split, device: torch.device, data: dict, config: dict, training: bool) -> bool:
    """data.gpu_decode: auto (CUDA, all files JPEG, plain crop/flip augmentation), true (any device) or false."""
    if not setting:
        return False
    others = [path for path, _ in split.samples if not path.lower().endswith(JPEG_EXTENSIONS)]
    reason = unsupported(data, config, training)
    if setting != "auto":
        if others:
            raise UserError(f"data.gpu_decode=true needs JPEG files, but {len(others)} are not (e.g. {others[0]})", "convert them to JPEG or set data.gpu_decode=auto")
        if reason:
            raise UserError(f"data.gpu_decode=true does random-resized-crop and flip only, not {reason}", "set data.gpu_decode=false to use it on the CPU path")
        return True
    return device.type == "cuda" and not others and reason is None


def pick(cpu_set: Dataset, split: Split, size: int, config: dict, recipe: dict, device: torch.device, training: bool) -> Dataset:
    """A JpegDataset when data.gpu_decode picks the GPU path for this split, else cpu_set (an ImageDataset)."""
    data = recipe["data"]
    if not use_gpu_decode(data["gpu_decode"], split, device, data, config, training):
        return cpu_set
    seed = recipe["train"]["seed"] if training else 0
    return JpegDataset(split, Augment.from_recipe(size, config, data, training), seed, data["skip_bad_images"])


def _size_only(width: int, height: int) -> torch.Tensor:
    # timm's get_params only reads the image size: a zero-stride view stands in for the image
    return torch.empty(()).expand(1, height, width)


class JpegDataset(Dataset):
    """(file bytes as uint8, label, crop box [top, left, h, w, flip], skipped files, path)."""

    def __init__(self, split: Split, augment: Augment, seed: int = 0, skip_bad: bool = False):
        self.samples, self.classes = split.samples, split.classes
        self.augment, self.seed, self.skip_bad = augment, seed, skip_bad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def draw(self, width: int, height: int, index: int) -> torch.Tensor:
        """The crop and flip timm's train transform would draw for this sample (same seeds, same calls)."""
        from timm.data.transforms import RandomResizedCropAndInterpolation

        a = self.augment
        with seeded(sample_seed(self.seed, self.epoch, index)):
            top, left, h, w = RandomResizedCropAndInterpolation.get_params(_size_only(width, height), a.scale, a.ratio)
            flip = a.hflip > 0 and bool(torch.rand(1) < a.hflip)  # torchvision's RandomHorizontalFlip
        return torch.tensor([top, left, h, w, int(flip)])

    def read(self, path: str, index: int) -> tuple[bytes, torch.Tensor]:
        """The file's bytes and, when training, the crop box drawn for sample `index` at its size."""
        raw = Path(path).read_bytes()
        box = torch.zeros(5, dtype=torch.int64)
        if self.augment.training:
            with Image.open(io.BytesIO(raw)) as im:  # the header only: decoding is the device's job
                box = self.draw(*im.size, index)
        return raw, box

    def __getitem__(self, index: int):
        (path, label), ((raw, box),), attempt = first_readable(self.samples, index, self.skip_bad, lambda p: self.read(p, index))
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8), label, box, attempt, path

    @staticmethod
    def collate(batch):
        # one flat byte tensor per batch: a worker shares one memory segment, not one per file
        data, labels, boxes, bad, paths = zip(*batch)
        lengths = torch.tensor([len(d) for d in data])
        return torch.cat(data), lengths, torch.tensor(labels), torch.stack(boxes), torch.tensor(bad), list(paths)


# ---- device side ---------------------------------------------------------------------------
def decode(data: list[torch.Tensor], paths: list[str], device: torch.device, skip_bad: bool) -> list[torch.Tensor | None]:
    """RGB uint8 CHW images on device; None for an unreadable file when skip_bad."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except (RuntimeError, ValueError):  # one bad file fails the batch: find it one by one
        return [_decode_one(raw, path, device, skip_bad) for raw, path in zip(data, paths)]


def _decode_one(raw: torch.Tensor, path: str, device: torch.device, skip_bad: bool) -> torch.Tensor | None:
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2.functional import pil_to_tensor

    try:
        return decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
    except (RuntimeError, ValueError):
        pass
    try:  # what the decoder refuses (CMYK on some GPUs, a PNG named .jpg) PIL may still read
        return pil_to_tensor(load_rgb(io.BytesIO(raw.numpy().tobytes()))).to(device)
    except DECODE_ERRORS as e:
        if not skip_bad:
            raise unreadable(path, e) from None
        return None


def train_crops(images: list[torch.Tensor], boxes: torch.Tensor, a: Augment) -> torch.Tensor:
    """Random-resized-crop at the drawn boxes, then the drawn flips; float in [0, 1]."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    mode = InterpolationMode(a.interpolation)
    out = torch.stack([F.resized_crop(image, top, left, h, w, [a.size, a.size], mode, antialias=True)
                       for image, (top, left, h, w, _) in zip(images, boxes.tolist())])
    flip = boxes[:, 4].bool().to(out.device)[:, None, None, None]
    return torch.where(flip, out.flip(-1), out).float().div_(255)


def eval_crops(images: list[torch.Tensor], a: Augment) -> torch.Tensor:
    """timm's eval transform: shorter side to size / crop_pct, then the centre size x size."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    scale = math.floor(a.size / a.crop_pct)
    mode = InterpolationMode(a.interpolation)
    out = torch.stack([F.center_crop(F.resize(image, [scale], mode, antialias=True), [a.size, a.size]) for image in images])
    return out.float().div_(255)


def _replace_unreadable(images: list, labels: torch.Tensor, boxes: torch.Tensor, bad: torch.Tensor):
    """Put a readable sample of the batch in place of each unreadable one, as the CPU path takes the next file."""
    good = [i for i, image in enumerate(images) if image is not None]
    if not good:
        raise UserError("a whole batch of images could not be decoded", "check the files, or pass --no-skip-bad-images to see the first one")
    labels, boxes, bad = labels.clone(), boxes.clone(), bad.clone()
    for i, image in enumerate(images):
        if image is None:
            j = good[i % len(good)]
            images[i], labels[i], boxes[i] = images[j], labels[j], boxes[j]
            bad[i] += 1
    return images, labels, boxes, bad


class DeviceLoader:
    """A DataLoader of JpegDataset batches that yields (images in [0, 1] on device, labels, skipped files)."""

    def __init__(self, loader: DataLoader, dataset: JpegDataset, device: torch.device):
        self.loader, self.dataset, self.device = loader, dataset, device

    @property
    def sampler(self):
        return self.loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        a = self.dataset.augment
        for flat, lengths, labels, boxes, bad, paths in self.loader:
            images = decode(list(flat.split(lengths.tolist())), paths, self.device, self.dataset.skip_bad)
            if any(image is None for image in images):
                images, labels, boxes, bad = _replace_unreadable(images, labels, boxes, bad)
            batch = train_crops(images, boxes, a) if a.training else eval_crops(images, a)
            yield batch, labels.to(self.device, non_blocking=True), bad


def on_device(loader: DataLoader, device: torch.device):
    """The loader itself for the CPU path; wrapped to decode and augment on device for a JpegDataset."""
    dataset = loader.dataset.dataset if isinstance(loader.dataset, Subset) else loader.dataset
    return DeviceLoader(loader, dataset, device) if isinstance(dataset, JpegDataset) else loader
