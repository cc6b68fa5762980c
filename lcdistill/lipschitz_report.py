"""`lcdistill lipschitz`: per-stage transmitting-matrix spectral norms of a model (and its
teacher) on real images, plus the classic whole-network upper bound.

Stage norms are measured on each network's own features (no connectors: those exist
only during training), averaged over a few val batches.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lcdistill.data import normalize
from lcdistill.features import FeatureTap, find_stages, pair_stages
from lcdistill.lipschitz import network_upper_bound, stage_sigmas


@torch.no_grad()
def stage_norms(model: nn.Module, mean, std, stages: list[str], loader, device, batches: int, iterations: int) -> list[float]:
    """Mean TM spectral norm of each consecutive pair of the named stages over `batches` batches."""
    model.eval().to(device)
    tap = FeatureTap(model, stages)
    total, count = None, 0
    try:
        for i, batch in enumerate(loader):
            if i >= batches:
                break
            tap.clear()
            model(normalize(batch[0].to(device), mean, std))
            sigmas = stage_sigmas(tap.get(stages), iterations)  # (B, P)
            total = sigmas.sum(0) if total is None else total + sigmas.sum(0)
            count += sigmas.shape[0]
    finally:
        tap.remove()
    return (total / max(count, 1)).tolist()


def finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def report(model, model_cfg: dict, teacher, teacher_cfg: dict | None, loader, device, input_size: list[int],
           min_stride: int = 4, batches: int = 4, iterations: int = 20) -> dict:
    """{"stages": [{"name", "model", "teacher", "gap", ...}], "upper_bound", "teacher_upper_bound"}."""
    if teacher is not None:
        pairs = pair_stages(find_stages(model), find_stages(teacher), min_stride=min_stride)
        mine, theirs = [s for s, _ in pairs], [t for _, t in pairs]
    else:
        mine, theirs = [s for s in find_stages(model) if s.stride >= min_stride], []
        if len(mine) < 2:
            raise ValueError("the model has fewer than two stride-separated stages")
    ours = stage_norms(model, model_cfg["mean"], model_cfg["std"], [s.name for s in mine], loader, device, batches, iterations)
    if teacher is not None:
        ref = stage_norms(teacher, teacher_cfg["mean"], teacher_cfg["std"], [t.name for t in theirs], loader, device, batches, iterations)
    rows = []
    for i, value in enumerate(ours):
        row = {
            "name": f"stride {mine[i].stride}->{mine[i + 1].stride}",
            "model_stages": [mine[i].name, mine[i + 1].name],
            "model": value,
            "teacher": ref[i] if teacher is not None else None,
            "gap": value - ref[i] if teacher is not None else None,
        }
        if teacher is not None:
            row["teacher_stages"] = [theirs[i].name, theirs[i + 1].name]
        rows.append(row)
    model.cpu()
    result = {"stages": rows, "upper_bound": finite(network_upper_bound(model, tuple(input_size))["upper_bound"])}
    if teacher is not None:
        teacher.cpu()
        result["teacher_upper_bound"] = finite(network_upper_bound(teacher, tuple(input_size))["upper_bound"])
    return result
