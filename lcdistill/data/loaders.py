"""DataLoaders: a resumable seeded train order, plain eval shards, and per-model normalisation.

Loaders yield float images in [0, 1]; each model normalises with its own mean/std on the device
(see `normalize`), so one batch can feed a teacher and a student trained with different statistics.
"""

from __future__ import annotations

import itertools
import signal

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


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


def collate_of(dataset: Dataset):
    """The dataset's own batching (data.gpu's JPEG batches, a detector's lists), looking through Subsets."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return getattr(dataset, "collate", None)


def train_loader(dataset: Dataset, batch_size: int, workers: int, seed: int, world: int, rank: int, pin: bool) -> DataLoader:
    sampler = ResumableSampler(len(dataset), seed, world, rank)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin, drop_last=True,
                      worker_init_fn=init_worker, generator=_own_generator(seed), collate_fn=collate_of(dataset))


def eval_loader(dataset: Dataset, batch_size: int, workers: int, world: int = 1, rank: int = 0, pin: bool = False) -> DataLoader:
    # A plain shard per rank (no padding), so summed counts cover every image once.
    shard = torch.utils.data.Subset(dataset, list(range(rank, len(dataset), world)))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin, worker_init_fn=init_worker,
                      generator=_own_generator(0), collate_fn=collate_of(dataset))


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t
