"""Classification data as an ImageFolder: `ROOT/train/<class>/*.jpg` and `ROOT/val/<class>/*.jpg`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


from lcdistill.data.images import IMAGE_EXTENSIONS, check_image, load_rgb
from lcdistill.data.samples import SeededDataset, first_readable, sample_seed, seeded
from lcdistill.errors import UserError

# Up to this many images are header-checked before training starts; beyond it a bad
# file is found when it is first read.
PRECHECK_LIMIT = 50_000


@dataclass
class Split:
    classes: list[str]
    samples: list[tuple[str, int]]
    skipped: list[str] = field(default_factory=list)  # unreadable files left out (--skip-bad-images)


def images_under(folder: Path) -> list[str]:
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
        files = images_under(folder / name)
        if not files:
            raise UserError(f"class folder {folder / name} has no images", f"add images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...) or remove the folder from train/ and val/")
        samples += [(f, index) for f in files]
    return Split(names, samples)


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


class ImageDataset(SeededDataset):
    """(image in [0,1], label, skipped files) with augmentation seeded by (seed, epoch, index)."""

    def __init__(self, split: Split, transform, seed: int = 0, skip_bad: bool = False):
        super().__init__(split, seed, skip_bad)
        self.transform = transform

    def __getitem__(self, index: int):
        (_, label), (image,), attempt = first_readable(self.samples, index, self.skip_bad, load_rgb)
        with seeded(sample_seed(self.seed, self.epoch, index)):
            image = self.transform(image)
        return image, label, attempt
