"""The training loop: devices, precision, DDP, EMA, schedule, checkpoints, progress, metrics.

It drives any Distiller (forward -> logits, {loss name: tensor}) and knows nothing
of a particular method.
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import math
import os
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from lcdistill.checkpoint import atomic_write_text, load_state, save_state, save_weights
from lcdistill.data import ImageDataset, eval_loader, train_loader
from lcdistill.errors import UserError
from lcdistill.evaluate import accuracy
from lcdistill.gpu_data import on_device

LAST = "last.safetensors"
BEST = "best.safetensors"


class TrainingStopped(UserError):
    """The run stopped early on purpose (signal) or by necessity (non-finite loss)."""

    def __init__(self, message: str, fix: str = "", exit_code: int = 1):
        super().__init__(message, fix)
        self.exit_code = exit_code


@dataclass
class Runtime:
    """Where and how this process trains: device, precision, rank."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    world: int = 1
    rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        if self.world > 1:
            dist.all_reduce(tensor)


def setup_runtime(train: dict) -> Runtime:
    """Pick the device, join the torchrun process group if there is one, resolve precision."""
    want = train["device"]
    if want == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible", "use --device cpu or auto")
    cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    amp = train["amp_dtype"]
    if amp == "auto":
        amp = "bfloat16" if cuda else "float32"
    amp_dtype = None if amp == "float32" else getattr(torch, amp)
    channels_last = cuda if train["channels_last"] == "auto" else bool(train["channels_last"])
    if train["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif cuda:
        torch.backends.cudnn.benchmark = True
    return Runtime(device, amp_dtype, channels_last, world, rank)


def rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    def __init__(self, distiller, recipe: dict, train_set: ImageDataset, val_set, run_dir: Path, runtime: Runtime, console: Console):
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2
        from timm.utils import ModelEmaV3

        self.recipe, self.runtime, self.console, self.run_dir = recipe, runtime, console, Path(run_dir)
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

        self.distiller = distiller.to(runtime.device)
        if runtime.channels_last:
            self.distiller.to(memory_format=torch.channels_last)
        self.student = distiller.student
        extras = distiller.extras()
        self.trainable = nn.ModuleDict({"student": self.student, **({"extras": extras} if extras is not None else {})})
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
        # on_device: JPEG batches of a gpu_data.JpegDataset are decoded and augmented on the device
        self.loader = on_device(train_loader(train_set, self.local_batch, workers, train["seed"], runtime.world, runtime.rank, pin), runtime.device)
        self.val_loader = on_device(eval_loader(val_set, max(self.local_batch, 64), workers, runtime.world, runtime.rank, pin), runtime.device)
        self.steps_per_epoch = len(self.loader)

        self.optimizer = create_optimizer_v2(self.trainable, opt=sched["optimizer"], lr=sched["lr"], weight_decay=sched["weight_decay"], momentum=sched["momentum"])
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=sched["scheduler"], num_epochs=self.epochs, warmup_epochs=sched["warmup_epochs"],
            min_lr=sched["min_lr"], step_on_epochs=False, updates_per_epoch=self.steps_per_epoch,
        )
        self.scaler = torch.amp.GradScaler(runtime.device.type) if runtime.amp_dtype == torch.float16 else None
        self.ema = ModelEmaV3(self.student, decay=train["ema_decay"]) if train["ema"] else None

        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.partial = self._fresh_partial()  # loss sums of the epoch in progress, kept across a resume
        self.best_top1 = -1.0
        self.rows: list[dict] = []
        self.stop_signal: int | None = None

    # ---- state -------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "trainable": self.trainable.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_top1": self.best_top1,
            "rows": self.rows,
            "partial": {"sums": {k: float(v) for k, v in self.partial["sums"].items()}, "skipped": self.partial["skipped"]},
            "rng": rng_state(),
        }

    @staticmethod
    def _fresh_partial() -> dict:
        return {"sums": {}, "skipped": 0}

    def load(self, state: dict) -> None:
        self.trainable.load_state_dict(state["trainable"])
        if self.ema and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        self.best_top1 = state["best_top1"]
        self.rows = state["rows"]
        self.partial = state.get("partial") or self._fresh_partial()
        set_rng_state(state["rng"])

    def resume_from(self, path: Path) -> None:
        self.load(load_state(path))
        if self.runtime.main:
            self._trim_metrics()
            for stale in self.checkpoint_dir.glob(".*.tmp"):  # a write cut short by SIGKILL
                stale.unlink(missing_ok=True)

    def _trim_metrics(self) -> None:
        """Drop metrics logged after the checkpoint: the resumed run logs those steps again."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if record.get("step", 0) <= self.global_step and record.get("epoch_end", 0) <= self.epoch:
                kept.append(line + "\n")
        atomic_write_text(path, "".join(kept))

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def save_checkpoint(self) -> None:
        # A finite loss can still leave inf/nan weights: never let them replace a good checkpoint.
        if not all(torch.isfinite(t).all() for t in self.trainable.state_dict().values() if t.is_floating_point()):
            self._nonfinite("the weights became non-finite", self.global_step)
        if not self.runtime.main:
            return
        path = self.checkpoint_dir / LAST
        try:
            save_state(path, self.state())
        except OSError as e:  # disk full, folder gone: the rename never happened, so the old file stands
            if path.exists():
                fix = f"the previous checkpoint is intact: free disk space and continue with `lcdistill compress --resume {self.run_dir}`"
            else:
                fix = "free disk space and start again"
            raise TrainingStopped(f"could not write checkpoint {path} ({e.strerror or e})", fix) from None

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
            f"stopped by {name} {where}; checkpoint saved in {self.checkpoint_dir}",
            f"continue with `lcdistill compress --resume {self.run_dir}`",
            exit_code=code,
        )

    def _nonfinite(self, what: str, step: int) -> None:
        """Stop naming the step (1-based, as in metrics.jsonl) and where the last good state is."""
        last = self.checkpoint_dir / LAST
        kept = f"the last good checkpoint stays in {last}" if last.exists() else "no checkpoint was written (--checkpoint-every N keeps some)"
        raise TrainingStopped(
            f"training diverged: {what} at step {step} (epoch {self.epoch + 1}); {kept}",
            "lower --lr, set --max-grad-norm 1.0, or train in float32 (--amp-dtype float32)",
        )

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
            task = progress.add_task("train", total=self.steps_per_epoch, completed=self.step_in_epoch, info="")
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
                    self._nonfinite(f"the loss became {loss.item()}", self.global_step + 1)
                self.optimizer.zero_grad(set_to_none=True)
                if self.scaler:
                    self.scaler.scale(loss).backward()
                    self.scaler.unscale_(self.optimizer)
                else:
                    loss.backward()
                if self.max_grad_norm:
                    nn.utils.clip_grad_norm_(self.trainable.parameters(), self.max_grad_norm)
                if self.scaler:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
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
                        self._nonfinite(f"the loss became {current['loss']}", self.global_step)
                    rate = seen * rt.world / max(time.perf_counter() - start, 1e-9)
                    info = f"loss {current['loss']:.4f}  {rate:,.0f} img/s"
                    progress.update(task, advance=0, info=info)
                    self._log({"epoch": self.epoch + 1, "step": self.global_step, "lr": self.lr, **current, "img_per_s": rate})
                progress.update(task, advance=1)
                if self.checkpoint_every and self.global_step % self.checkpoint_every == 0:
                    self.save_checkpoint()
                # Several processes must agree to stop, which costs an all_reduce and a GPU sync:
                # only every log_every steps there (the epoch end checks again).
                if (rt.world == 1 or self.step_in_epoch % self.log_every == 0) and self._should_stop():
                    self._stop()
        n = max(self.step_in_epoch, 1)
        self.epoch_losses = {k: (v / n).item() for k, v in sums.items()}
        self.epoch_rate = seen * rt.world / max(time.perf_counter() - start, 1e-9)
        self.epoch_skipped = self.partial["skipped"]

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def evaluate(self, model: nn.Module, stats: tuple | None = None) -> dict:
        """Val accuracy of model, fed with its own mean/std (the student's by default)."""
        model.eval()
        mean, std = stats or self.distiller.student_stats
        with self.runtime.autocast():
            return accuracy(model, self.val_loader, self.runtime.device, mean, std, reduce=self.runtime.all_reduce)

    def end_epoch(self) -> None:
        self.scheduler.step(self.epoch + 1)
        row = {"epoch": self.epoch + 1, "lr": self.lr, **self.epoch_losses}
        if self.runtime.world > 1:
            # DDP leaves BN running stats per rank (no buffer sync per forward): average them, as timm's train.py does.
            from timm.utils import distribute_bn

            distribute_bn(self.trainable, self.runtime.world, reduce=True)
            if self.ema:
                distribute_bn(self.ema, self.runtime.world, reduce=True)
        val = self.evaluate(self.student)
        row.update(val_top1=val["top1"], val_top5=val["top5"], val_images=val["images"])
        if self.ema:
            ema_val = self.evaluate(self.ema.module)
            row.update(ema_top1=ema_val["top1"], ema_top5=ema_val["top5"])
        stats = getattr(self.distiller, "stats", {})
        if "lip_gap" in stats:
            row["lip_gap"] = float(stats["lip_gap"].mean())
        row.update(img_per_s=self.epoch_rate, skipped_images=self.epoch_skipped)
        self.rows.append(row)
        self.epoch += 1
        self.step_in_epoch = 0
        self.partial = self._fresh_partial()
        top1 = row.get("ema_top1", row["val_top1"])
        if self.runtime.main:
            if top1 > self.best_top1:
                self.best_top1 = top1
                save_weights(self.checkpoint_dir / BEST, self.final_student().state_dict(), {"epoch": row["epoch"], "top1": top1})
            self.save_checkpoint()
            self._write_summary()
            self._log({"epoch_end": row["epoch"], **row})
            parts = "  ".join(f"{k} {v:.4f}" for k, v in self.epoch_losses.items())
            extra = f"  ema top-1 {row['ema_top1']:.2f}" if self.ema else ""
            skipped = f"  skipped {self.epoch_skipped} bad images" if self.epoch_skipped else ""
            self.console.print(f"epoch {row['epoch']}/{self.epochs}  {parts}  val top-1 {row['val_top1']:.2f}  top-5 {row['val_top5']:.2f}{extra}{skipped}")

    def _log(self, record: dict) -> None:
        if self.runtime.main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _write_summary(self) -> None:
        header: list[str] = []
        for row in self.rows:
            header += [k for k in row if k not in header]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=header)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.run_dir / "summary.csv", out.getvalue())
