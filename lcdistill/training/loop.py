"""The training loop. It drives any Distiller (forward(batch) -> outputs, {loss name: tensor}) over the
task's batches; setup, checkpoint state, stopping and validation live beside it (train/). It knows no
task, method, metric or file name of its own."""

from __future__ import annotations

import math
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from timm.utils import dispatch_clip_grad, distribute_bn
from torch import nn

from lcdistill.runfolder import RunFolder
from lcdistill.training import setup, state
from lcdistill.training.checkpointer import Checkpointer
from lcdistill.training.runlog import RunLog
from lcdistill.training.runtime import Runtime
from lcdistill.training.stopper import Stopper
from lcdistill.training.validator import Validator


class Trainer:
    """hooks: objects with optional before_optimizer(distiller) (before the student is placed, DDP-wrapped and its
    optimizer and EMA built: quantization-aware training prepares it there) and finish(student) (the shipped one)."""

    def __init__(self, distiller, recipe: dict, train_set, val_set, folder: RunFolder, runtime: Runtime, console: Console,
                 num_classes: int, hooks: tuple = ()):
        self.recipe, self.runtime, self.console, self.folder, self.hooks = recipe, runtime, console, folder, hooks
        sched, train = recipe["schedule"], recipe["train"]
        self.epochs, self.max_grad_norm = sched["epochs"], sched["max_grad_norm"]
        self.local_batch = setup.local_batch(sched["batch_size"], len(train_set), runtime.world)
        self.checkpoint_every, self.log_every = int(train["checkpoint_every"] or 0), max(1, int(train["log_every"]))
        self.task = distiller.task
        self.checkpointer, self.log, self.stopper = Checkpointer(folder, runtime.main), RunLog(folder, runtime.main), Stopper(runtime)
        self.distiller, self.student = distiller, distiller.student
        self._call("before_optimizer", distiller)  # before DDP records the parameters (a parametrization replaces them)
        self.model = setup.place(distiller, runtime, train["compile"])
        self.train_set = train_set
        self.loader, val_loader = setup.loaders(train_set, val_set, self.local_batch, int(recipe["data"]["workers"]), train["seed"], runtime)
        self.steps_per_epoch = len(self.loader)
        self.validator = Validator(self.task, num_classes, val_loader, runtime, self.checkpointer, console, sched["optimizer"])
        self.optimizer, self.scheduler, self.scaler, self.ema = setup.optimization(distiller, self.student, recipe, self.steps_per_epoch, runtime)
        self.position = state.Position()

    def _call(self, hook: str, *args) -> None:
        for h in (h for h in self.hooks if hasattr(h, hook)):
            getattr(h, hook)(*args)

    epoch = property(lambda self: self.position.epoch)
    step_in_epoch = property(lambda self: self.position.step_in_epoch)
    rows = property(lambda self: self.position.rows)

    def resume(self) -> None:
        state.load_into(self, self.checkpointer.load())
        self.log.trim(self.position.global_step, self.position.epoch)

    def save_checkpoint(self) -> None:
        self.checkpointer.save(state.state_of(self), self.distiller.state_dict(), self.position.global_step, self.position.epoch)

    def final_student(self) -> nn.Module:
        """The weights a user ships: the EMA copy when EMA is on, else the student."""
        return self.ema.module if self.ema else self.student

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def evaluate(self, model: nn.Module, stats: tuple | None = None) -> dict:
        """The task's metric on val for model, fed with its own mean/std (the student's by default)."""
        return self.validator.score(model, stats or self.distiller.student_stats)

    # ---- loop --------------------------------------------------------------------------
    def fit(self) -> dict:
        with self.stopper.handling():
            while self.position.epoch < self.epochs:
                self.train_epoch()
                self.end_epoch()
                if self.stopper.requested():  # the signal came during evaluation: honour it now, not a step later
                    self._stop()
        self._call("finish", self.final_student())
        return self.rows[-1] if self.rows else {}

    def _stop(self) -> None:
        self.save_checkpoint()
        raise self.stopper.stopped(self.folder, self.position.epoch, self.position.step_in_epoch)

    def _backward_step(self, loss) -> None:
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
        rt, p = self.runtime, self.position
        self.train_set.set_epoch(p.epoch)
        self.loader.sampler.set_epoch(p.epoch, skip=p.step_in_epoch * self.local_batch)
        self.distiller.train()
        sums = p.partial["sums"]
        seen, start = 0, time.perf_counter()
        progress = Progress(
            TextColumn(f"epoch {p.epoch + 1}/{self.epochs}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=self.console, disable=not rt.main, transient=False,
        )
        with progress:
            bar = progress.add_task("train", total=self.steps_per_epoch, completed=p.step_in_epoch, info="")
            for item in self.loader:
                batch = self.task.batch(item).to(rt.device, rt.channels_last)
                self.distiller.progress = p.global_step / self.steps_per_epoch
                with rt.autocast():
                    _, losses = self.model(batch)
                loss = sum(losses.values())
                if rt.device.type == "cpu" and not math.isfinite(loss.item()):
                    raise self.checkpointer.diverged(f"the loss became {loss.item()}", p.global_step + 1, p.epoch)
                self._backward_step(loss)
                if self.ema:
                    self.ema.update(self.student, step=p.global_step)
                p.global_step += 1
                p.step_in_epoch += 1
                self.scheduler.step_update(num_updates=p.global_step)
                for name, value in {"loss": loss, **losses}.items():
                    sums[name] = sums.get(name, 0.0) + value.detach().float()
                seen += len(batch)
                p.partial["skipped"] += int(batch.skipped.sum())
                if p.step_in_epoch % self.log_every == 0 or p.step_in_epoch == self.steps_per_epoch:
                    current = {"loss": loss.item(), **{k: v.item() for k, v in losses.items()}}
                    if not math.isfinite(current["loss"]):
                        raise self.checkpointer.diverged(f"the loss became {current['loss']}", p.global_step, p.epoch)
                    rate = seen * rt.world / max(time.perf_counter() - start, 1e-9)
                    progress.update(bar, advance=0, info=f"loss {current['loss']:.4f}  {rate:,.0f} img/s")
                    self.log.record({"epoch": p.epoch + 1, "step": p.global_step, "lr": self.lr, **current, "img_per_s": rate})
                progress.update(bar, advance=1)
                if self.checkpoint_every and p.global_step % self.checkpoint_every == 0:
                    self.save_checkpoint()
                # Several processes must agree to stop, which costs an all_reduce and a GPU sync:
                # only every log_every steps there (the epoch end checks again).
                if (rt.world == 1 or p.step_in_epoch % self.log_every == 0) and self.stopper.requested():
                    self._stop()
        self.epoch_losses = {k: float(v / max(p.step_in_epoch, 1)) for k, v in sums.items()}  # sums restored by a resume are floats
        self.epoch_rate = seen * rt.world / max(time.perf_counter() - start, 1e-9)

    def end_epoch(self) -> None:
        p = self.position
        self.scheduler.step(p.epoch + 1)
        row = {"epoch": p.epoch + 1, "lr": self.lr, **self.epoch_losses}
        if self.runtime.world > 1:
            # DDP leaves BN running stats per rank (no buffer sync per forward): average them, as timm's train.py does.
            distribute_bn(self.distiller, self.runtime.world, reduce=True)
            if self.ema:
                distribute_bn(self.ema, self.runtime.world, reduce=True)
        val = self.evaluate(self.student)
        self.validator.record(row, val, self.evaluate(self.ema.module) if self.ema else None)
        for name, value in self.distiller.stats.items():  # the terms' diagnostics (lip_gap)
            row[name] = float(value.mean())
        skipped = p.partial["skipped"]
        row.update(img_per_s=self.epoch_rate, skipped_images=skipped)
        p.rows.append(row)
        p.epoch, p.step_in_epoch, p.partial = p.epoch + 1, 0, state.fresh_partial()
        self.validator.keep_if_best(row, self.final_student().state_dict())
        self.save_checkpoint()
        self.log.summary(p.rows)
        self.log.record({"epoch_end": row["epoch"], **row})
        self.validator.line(row, self.epochs, self.epoch_losses, val, skipped)
