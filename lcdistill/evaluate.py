"""Honest numbers: the task's metric, params, FLOPs and latency, for PyTorch modules and exported files alike."""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch
from torch import nn

from lcdistill.data import normalize
from lcdistill.models import params
from lcdistill.tasks import Metric


@torch.no_grad()
def score(predict: Callable[[torch.Tensor], torch.Tensor], loader, device: torch.device, mean, std, metric: Metric, reduce=None) -> dict:
    """The metric's values over the loader, plus "images": the count. predict maps a normalised batch
    to the prediction tensor; the loader yields [0, 1] images; reduce all-reduces across DDP ranks."""
    for batch in loader:
        images, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        metric.update(predict(normalize(images, mean, std)), targets)
    if reduce is not None:
        metric.reduce(reduce)
    return {**metric.compute(), "images": metric.count}


@torch.no_grad()
def flops(model: nn.Module, input_size: list[int]) -> int:
    """FLOPs of one image's forward pass as torch.utils.flop_counter counts them (a multiply-add is 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    x = torch.zeros(1, *input_size, device=next(model.parameters()).device)
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
    meta, predict, module = target.meta, target.predict, target.module
    lat_device = placed(target, device)
    metric = target.task.metric(len(meta["classes"]))
    result = score(predict, loader, lat_device, mean, std, metric)
    if hasattr(metric, "details"):  # e.g. segmentation's per-class IoU
        result.update(metric.details(meta["classes"]))
    size = meta["input_size"]
    sync = torch.cuda.synchronize if lat_device.type == "cuda" else (lambda: None)
    timings = {}
    for batch in (1, batch_size):
        x = torch.randn(batch, *size, device=lat_device)
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
    if isinstance(module, nn.Module) and target.runtime == "pytorch":
        # what an export holds: a torchvision segmentation model's auxiliary head trains but is not shipped
        aux = getattr(module, "aux_classifier", None)
        shipped = params(module) - (params(aux) if isinstance(aux, nn.Module) else 0)
        result.update(params=shipped, flops=flops(target.task.exportable(module), size))
    return result


__all__ = ["file_size", "flops", "measure", "params", "placed", "score", "time_call"]
