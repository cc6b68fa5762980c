"""The training loop. It drives any Distiller (forward -> prediction, {loss name: tensor}), asks the
task for its metric, and knows no method, metric or file name of its own."""

from __future__ import annotations

import inspect
import math
import signal
import time

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from lcdistill.data import eval_loader, train_loader
from lcdistill.data.gpu import on_device
from lcdistill.errors import TrainingStopped, UserError
from lcdistill.evaluate import score
from lcdistill.runfolder import RunFolder
from lcdistill.train.checkpointer import Checkpointer
from lcdistill.train.runlog import RunLog
from lcdistill.train.runtime import Runtime, rng_state, set_rng_state


class Trainer:
    def __init__(self, distiller, recipe: dict, train_set, val_set, folder: RunFolder, runtime: Runtime, console: Console, num_classes: int):
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2
        from timm.utils import ModelEmaV3, NativeScaler

        self.recipe, self.runtime, self.console, self.folder = recipe, runtime, console, folder
        sched, train = recipe["schedule"], recipe["train"]
        self.epochs = sched["epochs"]
        if sched["batch_size"] % runtime.world:
            raise UserError(f"schedule.batch_size {sched['batch_size']} does not divide over {runtime.world} processes", "make the global batch size a multiple of the process count")
        self.local_batch = sched["batch_size"] // runtime.world
        if self.local_batch > len(train_set):
            raise UserError(f"batch size {self.local_batch} is larger than the {len(train_set)} training images", "pass a smaller --batch-size")
        self.max_grad_norm = sched["max_grad_norm"]
        self.checkpoint_every = int(train["checkpoint_every"] or 0)
        self.log_every = max(1, int(train["log_every"]))
        self.task, self.num_classes = distiller.task, num_classes
        self.checkpointer, self.log = Checkpointer(folder, runtime.main), RunLog(folder, runtime.main)

        # The distiller's own parameters are what trains: the student, then the terms' extras
        # (the teacher is held outside them, so DDP never wraps it).
        self.distiller = distiller.to(runtime.device)
        if runtime.channels_last:
            self.distiller.to(memory_format=torch.channels_last)
        self.student = distiller.student
        if train["compile"]:
            self.student.compile()
            if distiller.teacher is not None:
                distiller.teacher.compile()
        self.model = distiller
        if runtime.world > 1:
            device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            # No buffer sync per forward (BN stats are averaged at epoch end); torch >= 2.14 renamed the flag.
            ddp = nn.parallel.DistributedDataParallel
            no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters else {"broadcast_buffers": False}
            self.model = ddp(distiller, device_ids=device_ids, **no_sync)

        pin = runtime.device.type == "cuda"
        workers = int(recipe["data"]["workers"])
        self.train_set = train_set
        # on_device: JPEG batches of a data.gpu.JpegDataset are decoded and augmented on the device
        self.loader = on_device(train_loader(train_set, self.local_batch, workers, train["seed"], runtime.world, runtime.rank, pin), runtime.device)
        self.val_loader = on_device(eval_loader(val_set, max(self.local_batch, 64), workers, runtime.world, runtime.rank, pin), runtime.device)
        self.steps_per_epoch = len(self.loader)

        self.optimizer = create_optimizer_v2(self.distiller, opt=sched["optimizer"], lr=sched["lr"], weight_decay=sched["weight_decay"], momentum=sched["momentum"])
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=sched["scheduler"], num_epochs=self.epochs, warmup_epochs=sched["warmup_epochs"],
            min_lr=sched["min_lr"], step_on_epochs=False, updates_per_epoch=self.steps_per_epoch,
        )
        self.scaler = NativeScaler(runtime.device.type) if runtime.amp_dtype == torch.float16 else None
        self.ema = ModelEmaV3(self.student, decay=train["ema_decay"]) if train["ema"] else None

        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.partial = self._fresh_partial()  # loss sums of the epoch in progress, kept across a resume
        self.best = -math.inf  # the best value of the task metric's `best` so far
        self.rows: list[dict] = []
        self.stop_signal: int | None = None

    # ---- state -------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "student": self.student.state_dict(),
            "method": self.distiller.method_state(),
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best": self.best,
            "rows": self.rows,
            "partial": {"sums": {k: float(v) for k, v in self.partial["sums"].items()}, "skipped": self.partial["skipped"]},
            "rng": rng_state(),
        }

    @staticmethod
    def _fresh_partial() -> dict:
        return {"sums": {}, "skipped": 0}

    def load(self, state: dict) -> None:
        if "student" not in state:  # "trainable": written before the task layer
            raise UserError(f"the checkpoint in {self.folder.checkpoints} was written by an older lcdistill",
                            "start the run again, or finish it with the lcdistill version that began it")
        self.student.load_state_dict(state["student"])
        self.distiller.load_method_state(state["method"])
        if self.ema and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        self.best = state["best"]
        self.rows = state["rows"]
        self.partial = state.get("partial") or self._fresh_partial()
        set_rng_state(state["rng"])

    def resume(self) -> None:
        self.load(self.checkpointer.load())
        self.log.trim(self.global_step, self.epoch)

    def save_checkpoint(self) -> None:
        self.checkpointer.save(self.state(), self.distiller.state_dict(), self.global_step, self.epoch)

    def final_student(self) -> nn.Module:
        """The weights a user ships: the EMA copy when EMA is on, else the student."""
        return self.ema.module if self.ema else self.student

    # ---- loop --------------------------------------------------------------------------
    def fit(self) -> dict:
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self.epoch < self.epochs:
                self.train_epoch()
                self.end_epoch()
                if self._should_stop():  # the signal came during evaluation: honour it now, not a step later
                    self._stop()
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        return self.rows[-1] if self.rows else {}

    def _on_signal(self, signum, _frame) -> None:
        self.stop_signal = signum

    def _should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_signal else 0.0])
        if self.runtime.world > 1:
            flag = flag.to(self.runtime.device)
            dist.all_reduce(flag)
        return bool(flag.item())

    def _stop(self) -> None:
        self.save_checkpoint()
        code = 130 if self.stop_signal in (None, signal.SIGINT) else 143
        name = "SIGINT" if code == 130 else "SIGTERM"
        where = f"after epoch {self.epoch}" if self.step_in_epoch == 0 and self.epoch else f"at epoch {self.epoch + 1}, step {self.step_in_epoch}"
        raise TrainingStopped(
            f"stopped by {name} {where}; checkpoint saved in {self.folder.checkpoints}",
            f"continue with `lcdistill compress --resume {self.folder}`",
            exit_code=code,
        )

    def _diverged(self, what: str, step: int) -> None:
        raise self.checkpointer.diverged(what, step, self.epoch)

    def _backward_step(self, loss: torch.Tensor) -> None:
        from timm.utils import dispatch_clip_grad

        self.optimizer.zero_grad(set_to_none=True)
        params = self.distiller.parameters() if self.max_grad_norm else None
        if self.scaler:  # float16: timm's NativeScaler scales, unscales before clipping, steps, updates
            self.scaler(loss, self.optimizer, clip_grad=self.max_grad_norm or None, parameters=params)
            return
        loss.backward()
        if self.max_grad_norm:
            dispatch_clip_grad(params, self.max_grad_norm)
        self.optimizer.step()

    def train_epoch(self) -> None:
        rt = self.runtime
        self.train_set.set_epoch(self.epoch)
        self.loader.sampler.set_epoch(self.epoch, skip=self.step_in_epoch * self.local_batch)
        self.distiller.train()
        sums = self.partial["sums"]
        seen, start = 0, time.perf_counter()
        progress = Progress(
            TextColumn(f"epoch {self.epoch + 1}/{self.epochs}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=self.console, disable=not rt.main, transient=False,
        )
        with progress:
            bar = progress.add_task("train", total=self.steps_per_epoch, completed=self.step_in_epoch, info="")
            for images, targets, bad in self.loader:
                images = images.to(rt.device, non_blocking=True)
                targets = targets.to(rt.device, non_blocking=True)
                if rt.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                self.distiller.progress = self.global_step / self.steps_per_epoch
                with rt.autocast():
                    _, losses = self.model(images, targets)
                loss = sum(losses.values())
                if rt.device.type == "cpu" and not math.isfinite(loss.item()):
                    self._diverged(f"the loss became {loss.item()}", self.global_step + 1)
                self._backward_step(loss)
                if self.ema:
                    self.ema.update(self.student, step=self.global_step)
                self.global_step += 1
                self.step_in_epoch += 1
                self.scheduler.step_update(num_updates=self.global_step)
                for name, value in {"loss": loss, **losses}.items():
                    sums[name] = sums.get(name, 0.0) + value.detach().float()
                seen += images.shape[0]
                self.partial["skipped"] += int(bad.sum())
                if self.step_in_epoch % self.log_every == 0 or self.step_in_epoch == self.steps_per_epoch:
                    current = {k: v.item() for k, v in losses.items()}
                    current["loss"] = loss.item()
                    if not math.isfinite(current["loss"]):
                        self._diverged(f"the loss became {current['loss']}", self.global_step)
                    rate = seen * rt.world / max(time.perf_counter() - start, 1e-9)
                    progress.update(bar, advance=0, info=f"loss {current['loss']:.4f}  {rate:,.0f} img/s")
                    self.log.record({"epoch": self.epoch + 1, "step": self.global_step, "lr": self.lr, **current, "img_per_s": rate})
                progress.update(bar, advance=1)
                if self.checkpoint_every and self.global_step % self.checkpoint_every == 0:
                    self.save_checkpoint()
                # Several processes must agree to stop, which costs an all_reduce and a GPU sync:
                # only every log_every steps there (the epoch end checks again).
                if (rt.world == 1 or self.step_in_epoch % self.log_every == 0) and self._should_stop():
                    self._stop()
        n = max(self.step_in_epoch, 1)
        self.epoch_losses = {k: float(v / n) for k, v in sums.items()}  # sums restored by a resume are floats
        self.epoch_rate = seen * rt.world / max(time.perf_counter() - start, 1e-9)
        self.epoch_skipped = self.partial["skipped"]

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def evaluate(self, model: nn.Module, stats: tuple | None = None) -> dict:
        """The task's metric on val for model, fed with its own mean/std (the student's by default),
        summed over every process: {value name: value, ..., "images": n}."""
        model.eval()
        mean, std = stats or self.distiller.student_stats
        predict = lambda x: self.task.prediction(model(x))  # noqa: E731
        with self.runtime.autocast():
            return score(predict, self.val_loader, self.runtime.device, mean, std, self.task.metric(self.num_classes), reduce=self.runtime.all_reduce)

    def end_epoch(self) -> None:
        self.scheduler.step(self.epoch + 1)
        row = {"epoch": self.epoch + 1, "lr": self.lr, **self.epoch_losses}
        if self.runtime.world > 1:
            # DDP leaves BN running stats per rank (no buffer sync per forward): average them, as timm's train.py does.
            from timm.utils import distribute_bn

            distribute_bn(self.distiller, self.runtime.world, reduce=True)
            if self.ema:
                distribute_bn(self.ema, self.runtime.world, reduce=True)
        metric = self.task.metric(self.num_classes)
        val = self.evaluate(self.student)
        row.update({f"val_{k}": v for k, v in val.items()})
        if self.ema:
            ema_val = self.evaluate(self.ema.module)
            row.update({f"ema_{k}": v for k, v in ema_val.items() if k != "images"})
        for name, value in self.distiller.stats.items():  # the terms' diagnostics (lip_gap)
            row[name] = float(value.mean())
        row.update(img_per_s=self.epoch_rate, skipped_images=self.epoch_skipped)
        self.rows.append(row)
        self.epoch += 1
        self.step_in_epoch = 0
        self.partial = self._fresh_partial()
        shipped = row.get(f"ema_{metric.best}", row[f"val_{metric.best}"])
        if shipped > self.best:
            self.best = shipped
            self.checkpointer.save_best(self.final_student().state_dict(), {"epoch": row["epoch"], metric.best: shipped})
        self.save_checkpoint()
        self.log.summary(self.rows)
        self.log.record({"epoch_end": row["epoch"], **row})
        if self.runtime.main:
            parts = "  ".join(f"{k} {v:.4f}" for k, v in self.epoch_losses.items())
            header = {key: h.removesuffix(" %") for h, key in metric.columns}[metric.best]
            extra = f"  ema {header} {row[f'ema_{metric.best}']:.2f}" if self.ema else ""
            skipped = f"  skipped {self.epoch_skipped} bad images" if self.epoch_skipped else ""
            self.console.print(f"epoch {row['epoch']}/{self.epochs}  {parts}  val {metric.describe(val)}{extra}{skipped}")
