"""Checks that torchrun processes stayed in step: every rank must end with the same weights."""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import nn


def state_fingerprint(modules: list[nn.Module | None]) -> tuple[str, float]:
    """sha256 of every parameter and buffer byte, and their float64 sum (readable at a glance)."""
    digest = hashlib.sha256()
    total = 0.0
    for module in modules:
        if module is None:
            continue
        for name, tensor in module.state_dict().items():
            flat = tensor.detach().reshape(-1).cpu().contiguous()
            digest.update(name.encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
            total += float(flat.double().sum())
    return digest.hexdigest(), total


def replica_check(modules: list[nn.Module | None], world: int) -> dict | None:
    """Gather each rank's fingerprint (a collective: call it on every rank). None when not distributed."""
    if world <= 1:
        return None
    mine = state_fingerprint(modules)
    every: list = [None] * world
    dist.all_gather_object(every, mine)
    hashes, sums = [h for h, _ in every], [s for _, s in every]
    record = {"world": world, "ranks_identical": len(set(hashes)) == 1, "sha256": hashes[0], "state_sum": sums[0]}
    if not record["ranks_identical"]:
        record.update(rank_sha256=hashes, rank_state_sum=sums)
    return record
