"""Honest numbers: the task's metric, params, FLOPs and latency, for PyTorch modules and exported files alike."""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch
from torch import nn

from torch.utils.flop_counter import FlopCounterMode

from lcdistill.models import params
from lcdistill.tasks import Metric, Task


@torch.no_grad()
def score(predict: Callable, loader, device: torch.device, mean, std, metric: Metric, task: Task, comm=None) -> dict:
    """The metric's values over the loader, plus "images": the count. predict maps what the task feeds a
    model (normalised with mean/std) to its prediction; the loader yields the task's [0, 1] batches;
    comm (a train.Runtime) syncs the metric over DDP ranks."""
    for item in loader:
        batch = task.batch(item).to(device)
        metric.update(predict(task.inputs(batch, mean, std)), batch.targets)
    if comm is not None:
        metric.sync(comm)
    return {**metric.compute(), "images": metric.count}


@torch.no_grad()
def flops(model: nn.Module, example) -> int:
    """FLOPs of the model's forward pass on one example input (the task's export example at batch 1),
    as torch.utils.flop_counter counts them (a multiply-add is 2)."""
    was_training = model.training
    model.eval()
    x = example.to(next(model.parameters()).device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops())


def time_call(fn: Callable[[], object], sync: Callable[[], None] = lambda: None, warmup: int = 3, repeats: int = 10) -> float:
    """Median wall time of fn() in milliseconds, after warm-up."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def file_size(path) -> int | None:
    return os.path.getsize(path) if path and os.path.isfile(path) else None


def placed(target, device: torch.device) -> torch.device:
    """The device target runs on, its module moved there: ONNX Runtime sessions here run on the CPU,
    everything else on the chosen device."""
    if target.module is not None:
        target.module.to(device)
    return device if target.runtime != "onnx" else torch.device("cpu")


def measure(target, loader, device: torch.device, batch_size: int, mean, std) -> dict:
    """The task's metric on the loader plus size, FLOPs and latency (batch 1 and batch_size) for one
    model: an artifacts.Artifact or artifacts.InMemory."""
    meta, predict, module, task = target.meta, target.predict, target.module, target.task
    lat_device = placed(target, device)
    metric = task.metric(len(meta["classes"]))
    result = score(predict, loader, lat_device, mean, std, metric, task)
    result.update(metric.details(meta["classes"]))  # e.g. per-class IoU
    sync = torch.cuda.synchronize if lat_device.type == "cuda" else (lambda: None)
    timings = {}
    for batch in (1, batch_size):
        x = task.export.example(meta, batch, lat_device)
        with torch.no_grad():
            timings[batch] = time_call(lambda: predict(x), sync)
    result.update(
        kind=target.runtime,
        threads=torch.get_num_threads() if lat_device.type == "cpu" else None,
        file=str(target.file) if target.file else None,
        file_bytes=file_size(target.file),
        latency_ms_b1=timings[1],
        latency_ms_batch=timings[batch_size],
        batch_size=batch_size,
        throughput_img_s=batch_size / (timings[batch_size] / 1000),
        device=str(lat_device),
    )
    if isinstance(module, nn.Module) and target.runtime == "pytorch":  # what an export holds (no training-only heads)
        result.update(params=task.shipped_params(module), flops=flops(task.exportable(module), task.export.example(meta, 1)))
    return result


__all__ = ["file_size", "flops", "measure", "params", "placed", "score", "time_call"]
