"""What a run sets up before its first step: the models placed and wrapped, the loaders, the
optimizer, the scheduler, the float16 scaler and the EMA copy (timm's, all of them)."""

from __future__ import annotations

import inspect

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler
from torch import nn

from lcdistill.data import eval_loader, train_loader
from lcdistill.data.gpu import on_device
from lcdistill.errors import UserError
from lcdistill.training.runtime import Runtime


def local_batch(batch_size: int, images: int, world: int) -> int:
    """The batch one process takes, or the UserError saying why there is none."""
    if batch_size % world:
        raise UserError(f"schedule.batch_size {batch_size} does not divide over {world} processes", "make the global batch size a multiple of the process count")
    local = batch_size // world
    if local > images:
        raise UserError(f"batch size {local} is larger than the {images} training images", "pass a smaller --batch-size")
    return local


def place(distiller: nn.Module, runtime: Runtime, compile_models: bool) -> nn.Module:
    """The distiller on the device (the held teacher moves with it); returns what a step calls: the
    distiller, or its DDP wrap under torchrun. The distiller's own parameters are what trains."""
    distiller.to(runtime.device)
    if runtime.channels_last:
        distiller.to(memory_format=torch.channels_last)
    if compile_models:
        distiller.student.compile()
        if distiller.teacher is not None:
            distiller.teacher.compile()
    if runtime.world == 1:
        return distiller
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    # No buffer sync per forward (BN stats are averaged at epoch end); torch >= 2.14 renamed the flag.
    ddp = nn.parallel.DistributedDataParallel
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters else {"broadcast_buffers": False}
    return ddp(distiller, device_ids=device_ids, **no_sync)


def loaders(train_set, val_set, batch: int, workers: int, seed: int, runtime: Runtime):
    """(train loader, val loader); JPEG batches of a data.gpu.JpegDataset are decoded and augmented on the device."""
    pin = runtime.device.type == "cuda"
    train = on_device(train_loader(train_set, batch, workers, seed, runtime.world, runtime.rank, pin), runtime.device)
    val = on_device(eval_loader(val_set, max(batch, 64), workers, runtime.world, runtime.rank, pin), runtime.device)
    return train, val


def optimization(trains: nn.Module, student: nn.Module, recipe: dict, steps_per_epoch: int, runtime: Runtime):
    """(optimizer over what trains, per-step scheduler, float16 scaler or None, EMA of the student or None)."""
    sched, train = recipe["schedule"], recipe["train"]
    optimizer = create_optimizer_v2(trains, opt=sched["optimizer"], lr=sched["lr"], weight_decay=sched["weight_decay"], momentum=sched["momentum"])
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=sched["scheduler"], num_epochs=sched["epochs"], warmup_epochs=sched["warmup_epochs"],
        min_lr=sched["min_lr"], step_on_epochs=False, updates_per_epoch=steps_per_epoch,
    )
    scaler = NativeScaler(runtime.device.type) if runtime.amp_dtype == torch.float16 else None
    ema = ModelEmaV3(student, decay=train["ema_decay"]) if train["ema"] else None
    return optimizer, scheduler, scaler, ema
