"""The two per-sample policies every dataset here shares (classification on the CPU or the GPU
path, segmentation): the augmentation seed of a sample, and what an unreadable file does.

Seeding per sample makes augmentation independent of worker count and of where an epoch was
resumed, so a resumed run sees exactly the samples an unbroken one would.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from torch.utils.data import Dataset

from lcdistill.data.images import DECODE_ERRORS, unreadable
from lcdistill.errors import UserError


class SeededDataset(Dataset):
    """What the datasets here share: their split's samples and classes, the run's seed, the epoch (set by
    the trainer, for the per-sample seed) and the bad-file policy."""

    def __init__(self, split, seed: int = 0, skip_bad: bool = False):
        self.samples, self.classes = split.samples, split.classes
        self.seed, self.skip_bad = seed, skip_bad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of sample `index` in `epoch` of a run seeded `seed`."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + index


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Python's `random` and torch's CPU generator seeded for one sample; the caller's streams are left as they were."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


def first_readable(samples: Sequence[tuple], index: int, skip_bad: bool, *loaders: Callable):
    """samples[index] read by `loaders` (one per leading path of the sample): (sample, [loaded...], attempts).

    A file that fails to decode raises the one-line `unreadable image file PATH` error, or with
    skip_bad the next readable sample takes its place; attempts counts the samples passed over.
    """
    for attempt in range(len(samples)):
        sample = samples[(index + attempt) % len(samples)]
        loaded = []
        try:
            for path, load in zip(sample, loaders):
                loaded.append(load(path))
        except DECODE_ERRORS as e:
            if not skip_bad:
                raise unreadable(path, e) from None
            continue  # take the next readable sample in its place
        return sample, loaded, attempt
    raise UserError("no readable image in the data set", "check the files")
