"""Honest numbers: top-1/top-5, params, FLOPs and latency, for PyTorch modules and exported files alike."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import nn

from lcdistill.data import normalize


@torch.no_grad()
def accuracy(predict: Callable[[torch.Tensor], torch.Tensor], loader, device: torch.device, mean, std, reduce=None) -> dict:
    """top-1/top-5 in percent. predict maps a normalised batch to logits; loader yields [0,1] images."""
    correct1 = torch.zeros((), dtype=torch.float64, device=device)
    correct5 = torch.zeros((), dtype=torch.float64, device=device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for batch in loader:
        images, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        logits = predict(normalize(images, mean, std)).float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top.eq(targets[:, None])
        correct1 += hit[:, 0].sum()
        correct5 += hit.any(dim=1).sum()
        total += targets.numel()
    counts = torch.stack([correct1, correct5, total])
    if reduce is not None:
        reduce(counts)  # all_reduce across DDP ranks
    c1, c5, n = counts.tolist()
    return {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1), "images": int(n)}


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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


@torch.no_grad()
def torch_latency(model: nn.Module, input_size: list[int], device: torch.device, batch: int) -> float:
    model.eval()
    x = torch.randn(batch, *input_size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return time_call(lambda: model(x), sync)


def file_size(path: str | None) -> int | None:
    import os

    return os.path.getsize(path) if path and os.path.isfile(path) else None


def check_batch(x, meta: dict) -> torch.Tensor:
    """x as the float32 [N, C, H, W] batch the model was exported for, or a UserError saying what is off."""
    from lcdistill.errors import UserError

    want = [int(v) for v in meta["input_size"]]
    shape = list(x.shape) if isinstance(x, torch.Tensor) else None
    if shape is None or len(shape) != 4 or shape[1:] != want:
        got = f"shape {shape}" if shape is not None else f"a {type(x).__name__}"
        raise UserError(f"the model takes a [N, {', '.join(map(str, want))}] tensor, got {got}",
                        f"resize images to {want[1]}x{want[2]} with {want[0]} channels and stack them into one batch")
    if not x.is_floating_point():  # uint8 pixels would run (ONNX casts) and give silent garbage
        raise UserError(f"the model takes float input, got {x.dtype}", "scale to [0, 1] and normalise with the model's mean/std")
    return x.float()


def _checked(predict: Callable, meta: dict) -> Callable:
    return lambda x: predict(check_batch(x, meta))


def load_target(path: str) -> dict:
    """A run folder, student .safetensors, .onnx or TorchScript .pt as {predict, meta, module, file}."""
    from pathlib import Path

    from lcdistill import export, models
    from lcdistill.errors import UserError

    p = Path(path)
    if p.suffix == ".onnx" and p.is_file():
        meta = export.read_onnx_metadata(p)
        session = export.onnx_session(p)
        return {"kind": "onnx", "predict": _checked(lambda x: export.run_onnx(session, x), meta), "meta": meta, "module": None, "file": str(p)}
    if p.suffix in (".pt", ".ts") and p.is_file():
        meta = export.read_torchscript_metadata(p)
        with export.quiet_jit():
            scripted = torch.jit.load(str(p)).eval()
        return {"kind": "torchscript", "predict": _checked(scripted, meta), "meta": meta, "module": scripted, "file": str(p)}
    if models.is_run(p) or (p.suffix == ".safetensors" and p.is_file()):
        loaded = models.load_run(p)
        weights = p / models.MODEL_FILE if p.is_dir() else p
        return {"kind": "pytorch", "predict": _checked(loaded.model.eval(), loaded.meta), "meta": loaded.meta, "module": loaded.model.eval(), "file": str(weights)}
    raise UserError(f"{path} is not a run folder, student .safetensors, .onnx or TorchScript file", "pass the --out folder of `lcdistill compress`/`train`, or a file written by `lcdistill export`")


EXPORT_FILES = ("student.onnx", "student.int8.onnx", "student.pt")  # what `lcdistill export` writes


def exported_files(folder) -> list[str]:
    """The export files present in folder, in a fixed order."""
    from pathlib import Path

    return [str(Path(folder) / name) for name in EXPORT_FILES if (Path(folder) / name).is_file()]


def role(target: dict) -> str:
    """A row name for a measured file: its runtime, and int8 when it was quantized."""
    if target["kind"] == "onnx" and target["meta"].get("quantization"):
        return "onnx-int8"
    return target["kind"]


def measure(target: dict, loader, device: torch.device, batch_size: int, mean, std) -> dict:
    """Accuracy on the loader plus size, FLOPs and latency (batch 1 and batch_size) for one model."""
    meta = target["meta"]
    predict = target["predict"]
    module = target["module"]
    # ONNX Runtime sessions here run on the CPU; everything else on the chosen device
    lat_device = device if target["kind"] != "onnx" else torch.device("cpu")
    if module is not None:
        module.to(device)
    result = accuracy(predict, loader, lat_device, mean, std)
    size = meta["input_size"]
    sync = torch.cuda.synchronize if lat_device.type == "cuda" else (lambda: None)
    timings = {}
    for batch in (1, batch_size):
        x = torch.randn(batch, *size, device=lat_device)
        with torch.no_grad():
            timings[batch] = time_call(lambda: predict(x), sync)
    result.update(
        kind=target["kind"],
        threads=torch.get_num_threads() if lat_device.type == "cpu" else None,
        file=target["file"],
        file_bytes=file_size(target["file"]),
        latency_ms_b1=timings[1],
        latency_ms_batch=timings[batch_size],
        batch_size=batch_size,
        throughput_img_s=batch_size / (timings[batch_size] / 1000),
        device=str(lat_device),
    )
    if isinstance(module, nn.Module) and target["kind"] == "pytorch":
        result.update(params=params(module), flops=flops(module, size))
    return result
