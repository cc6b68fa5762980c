"""Parity of exported files at a second input size and batch size, for tasks whose export has a dynamic
height and width (segmentation): a file that only works at the size it was traced at fails here, not in
deployment. `lcdistill export` calls `check` after its own parity check at the eval size."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lcdistill.tasks import ExportSpec

SECOND_BATCH = 3


def second_shape(input_size: list[int], batch: int = SECOND_BATCH) -> tuple[int, ...]:
    """[batch, C, 1.5 H, 2 W], each side rounded up to a multiple of 32 (what strided encoders accept)."""
    c, h, w = (int(v) for v in input_size)
    up = lambda v: -(-v // 32) * 32  # noqa: E731
    return batch, c, up(h * 3 // 2), up(w * 2)


def diffs(model: nn.Module, files: dict[str, Path], shape: tuple[int, ...], seed: int = 0) -> dict[str, float]:
    """export.scaled_diff of exported vs PyTorch on one random normalised batch of `shape`, per file."""
    from lcdistill import export

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        reference = model.eval()(x)
    out = {}
    for fmt, path in files.items():
        with torch.no_grad():
            got = export.runner(fmt, path)(x)  # onnx, torchscript, pt2, hub: each run as its own format runs
        out[fmt] = export.scaled_diff(got, reference)
    return out


def check(model: nn.Module, files: dict[str, Path], spec: ExportSpec, meta: dict, tolerance: float) -> dict[str, float]:
    """For a task with dynamic height and width: print each file's parity at the second shape and
    stop (exit 1, like the first check) when one differs by more than tolerance. Other tasks: nothing."""
    import typer

    from lcdistill.cli.common import fail

    if not {2, 3} <= set(spec.dynamic_axes) or not files:
        return {}
    shape = second_shape(meta["input_size"])
    result = diffs(model, files, shape)
    for fmt, diff in result.items():
        typer.echo(f"{fmt}: max |diff| vs PyTorch {diff:.2e} (of the largest |logit|) at batch {shape[0]}, {shape[2]}x{shape[3]} (dynamic height and width)")
    worst = max(result.values())
    if worst > tolerance:
        fail(f"export differs from PyTorch by {worst:.2e} > tolerance {tolerance:g} at input {shape[2]}x{shape[3]}", 1)
    return result
