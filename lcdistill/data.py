"""ImageFolder data: layout checks, per-sample seeded augmentation, loaders.

Loaders yield float images in [0, 1]; each model normalises with its own mean/std
on the device (see `normalize`), so one batch can feed a teacher and a student
that were trained with different statistics.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from lcdistill.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Up to this many images are header-checked before training starts; beyond it a bad
# file is found when it is first read.
PRECHECK_LIMIT = 50_000
# What PIL raises for files it cannot decode (UnidentifiedImageError is an OSError; a
# header claiming billions of pixels is a DecompressionBombError, a plain Exception).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclass
class Split:
    classes: list[str]
    samples: list[tuple[str, int]]
    skipped: list[str] = field(default_factory=list)  # unreadable files left out (--skip-bad-images)


def _images_under(folder: Path) -> list[str]:
    """Image files below folder, sorted, skipping hidden entries and breaking symlink loops."""
    found: list[str] = []
    seen: set[str] = set()
    top = os.path.realpath(folder)
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        # a link to a folder seen before, or up to one holding this class (e.g. `loop -> ..`, which
        # would file the other classes' images under this one)
        if real in seen or top.startswith(real + os.sep):
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def scan_split(root: Path, split: str, classes: list[str] | None = None) -> Split:
    folder = root / split
    if not folder.is_dir():
        raise UserError(f"{root} has no {split}/ folder", f"lay the data out as {root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg")
    names = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise UserError(f"{folder} has no class folders", f"put each class's images in its own folder, e.g. {folder}/cat/1.jpg")
    if classes is not None and names != classes:
        only_train = sorted(set(classes) - set(names))
        only_val = sorted(set(names) - set(classes))
        raise UserError(
            f"val classes differ from train classes (only in train: {only_train[:5]}, only in val: {only_val[:5]})",
            "give train/ and val/ the same class folders",
        )
    samples: list[tuple[str, int]] = []
    for index, name in enumerate(names):
        files = _images_under(folder / name)
        if not files:
            raise UserError(f"class folder {folder / name} has no images", f"add images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...) or remove the folder from train/ and val/")
        samples += [(f, index) for f in files]
    return Split(names, samples)


def check_image(path: str) -> None:
    """Open the header only: catches empty, truncated-header and non-image files cheaply."""
    try:
        with Image.open(path) as im:
            im.size  # noqa: B018 - forces the header parse
    except DECODE_ERRORS as e:
        raise UserError(f"unreadable image file {path} ({type(e).__name__})", "delete or replace it, or pass --skip-bad-images") from None


def readable(split: Split, root: Path, skip_bad: bool) -> Split:
    """The split without files whose header cannot be read; raises on the first one unless skip_bad."""
    kept: list[tuple[str, int]] = []
    skipped = list(split.skipped)
    for path, label in split.samples:
        try:
            check_image(path)
        except UserError:
            if not skip_bad:
                raise
            skipped.append(path)
            continue
        kept.append((path, label))
    left = {label for _, label in kept}
    for index, name in enumerate(split.classes):
        if index not in left:
            raise UserError(f"class folder {root / name} has no readable images", "add readable images or remove the folder from train/ and val/")
    return Split(split.classes, kept, skipped)


def scan(root: str | Path, check: bool = True, skip_bad: bool = False) -> tuple[Split, Split]:
    """train/ and val/ splits; with check (and at most PRECHECK_LIMIT images) every header is read first."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder {root} not found", "pass --data DIR holding train/ and val/ (e.g. `lcdistill data digits data/digits`)")
    train = scan_split(root, "train")
    val = scan_split(root, "val", train.classes)
    if check and len(train.samples) + len(val.samples) <= PRECHECK_LIMIT:
        train, val = readable(train, root / "train", skip_bad), readable(val, root / "val", skip_bad)
    return train, val


def load_rgb(path: str) -> Image.Image:
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


class ImageDataset(Dataset):
    """(image in [0,1], label) with augmentation seeded by (seed, epoch, index).

    Seeding per sample makes augmentation independent of worker count and of where
    an epoch was resumed, so a resumed run sees exactly the images an unbroken one would.
    """

    def __init__(self, split: Split, transform, seed: int = 0, skip_bad: bool = False):
        self.samples = split.samples
        self.classes = split.classes
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.skip_bad = skip_bad

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        for attempt in range(len(self.samples)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                image = load_rgb(path)
            except DECODE_ERRORS as e:
                if not self.skip_bad:
                    raise UserError(f"unreadable image file {path} ({type(e).__name__}: {e})", "delete or replace it, or pass --skip-bad-images") from None
                continue  # take the next readable sample in its place
            # Own RNG streams for this sample; the caller's streams are left as they were.
            seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index
            state = random.getstate()
            with torch.random.fork_rng(devices=[]):
                random.seed(seed)
                torch.manual_seed(seed)
                image = self.transform(image)
            random.setstate(state)
            return image, label, attempt
        raise UserError("no readable image in the data set", "check the files")


def transforms(input_size: int, config: dict, data: dict, training: bool):
    """timm's transform pipeline with mean 0 / std 1, i.e. tensors in [0, 1]."""
    from timm.data import create_transform

    return create_transform(
        input_size=(3, input_size, input_size),
        is_training=training,
        scale=tuple(data["scale"]) if data["scale"] else None,
        ratio=tuple(data["ratio"]) if data["ratio"] else None,
        hflip=data["hflip"],
        color_jitter=data["color_jitter"],
        auto_augment=data["auto_augment"],
        interpolation=config["interpolation"],
        crop_pct=config["crop_pct"],
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )


def eval_transform(config: dict):
    """The deterministic eval pipeline (resize, centre crop by crop_pct) for a model's config."""
    no_aug = {"scale": None, "ratio": None, "hflip": 0.0, "color_jitter": 0.0, "auto_augment": None}
    return transforms(config["input_size"][-1], config, no_aug, training=False)


class ResumableSampler(Sampler):
    """DistributedSampler's seeded per-epoch order, able to start part-way into an epoch."""

    def __init__(self, size: int, seed: int, world: int = 1, rank: int = 0, shuffle: bool = True):
        self.inner = DistributedSampler(range(size), num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return itertools.islice(iter(self.inner), self.skip, None)

    def __len__(self) -> int:
        return len(self.inner) - self.skip


def init_worker(_worker_id: int) -> None:
    # Ctrl-C reaches the whole process group; workers leave it to the main process,
    # which saves a checkpoint before stopping.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Decoding needs no intra-op threads; extra ones fight the training threads for cores.
    torch.set_num_threads(1)


def _own_generator(seed: int) -> torch.Generator:
    # Each DataLoader iterator draws a worker base seed; from the global stream that draw
    # would shift dropout & co. of a run resumed mid-epoch. Augmentation is seeded per sample.
    return torch.Generator().manual_seed(seed)


def train_loader(dataset: ImageDataset, batch_size: int, workers: int, seed: int, world: int, rank: int, pin: bool) -> DataLoader:
    sampler = ResumableSampler(len(dataset), seed, world, rank)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin, drop_last=True,
                      worker_init_fn=init_worker, generator=_own_generator(seed), collate_fn=getattr(dataset, "collate", None))


def eval_loader(dataset: Dataset, batch_size: int, workers: int, world: int = 1, rank: int = 0, pin: bool = False) -> DataLoader:
    # A plain shard per rank (no padding), so summed counts cover every image once.
    shard = torch.utils.data.Subset(dataset, list(range(rank, len(dataset), world)))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin, worker_init_fn=init_worker,
                      generator=_own_generator(0), collate_fn=getattr(dataset, "collate", None))  # a dataset may batch its own way (gpu_data)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def write_digits(out: str | Path, seed: int = 0, val_fraction: float = 0.2) -> tuple[int, int]:
    """scikit-learn's bundled handwritten digits as an ImageFolder of 32x32 RGB PNGs, split per class.

    Written into a hidden sibling folder and renamed into place at the end, so OUT is
    either complete or absent."""
    import shutil
    import tempfile

    from sklearn.datasets import load_digits

    out = Path(out)
    if (out / "train").exists() or (out / "val").exists() or (out.exists() and any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty", "choose an empty folder or delete it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        digits = load_digits()
        rng = np.random.RandomState(seed)
        counts = [0, 0]
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
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return counts[0], counts[1]
