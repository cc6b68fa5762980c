"""Parity of exported files at a second input size and batch size, for tasks whose export has a dynamic
height and width (segmentation): a file that only works at the size it was traced at fails here, not in
deployment. `lcdistill export` calls `check` after its own parity check at the eval size and prints it."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lcdistill import exporters
from lcdistill.tasks import ExportSpec

SECOND_BATCH = 3


def second_shape(input_size: list[int], batch: int = SECOND_BATCH) -> tuple[int, ...]:
    """[batch, C, 1.5 H, 2 W], each side rounded up to a multiple of 32 (what strided encoders accept)."""
    c, h, w = (int(v) for v in input_size)
    up = lambda v: -(-v // 32) * 32  # noqa: E731
    return batch, c, up(h * 3 // 2), up(w * 2)


def diffs(model: nn.Module, files: dict[str, Path], shape: tuple[int, ...], spec: ExportSpec, seed: int = 0) -> dict[str, float]:
    """spec.compare of exported vs PyTorch on one random normalised batch of `shape`, per file."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        reference = model.eval()(x)
    out = {}
    for fmt, path in files.items():
        with torch.no_grad():
            got = exporters.runner(fmt, path)(x)  # onnx, torchscript, pt2, hub: each run as its own format runs
        out[fmt] = spec.compare(got, reference)
    return out


def check(model: nn.Module, files: dict[str, Path], spec: ExportSpec, meta: dict) -> tuple[tuple[int, ...], dict[str, float]]:
    """For a task with dynamic height and width: (the second shape, each file's parity there);
    other tasks: (shape, {})."""
    shape = second_shape(meta["input_size"], SECOND_BATCH if 0 in spec.dynamic_axes else 1)
    if not {2, 3} <= set(spec.dynamic_axes) or not files:
        return shape, {}
    return shape, diffs(model, files, shape, spec)
