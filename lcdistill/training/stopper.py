"""Stopping on SIGINT / SIGTERM: the handlers, the processes agreeing to stop, the one-line stop."""

from __future__ import annotations

import signal
from contextlib import contextmanager

import torch
import torch.distributed as dist

from lcdistill.errors import TrainingStopped
from lcdistill.training.runtime import Runtime


class Stopper:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.signal: int | None = None

    @contextmanager
    def handling(self):
        """SIGINT and SIGTERM set a flag while the block runs (the step in progress finishes)."""
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)

    def _on_signal(self, signum, _frame) -> None:
        self.signal = signum

    def requested(self) -> bool:
        """Whether any process was signalled (an all_reduce under DDP: every process must call it)."""
        flag = torch.tensor([1.0 if self.signal else 0.0])
        if self.runtime.world > 1:
            flag = flag.to(self.runtime.device)
            dist.all_reduce(flag)
        return bool(flag.item())

    def stopped(self, folder, epoch: int, step_in_epoch: int) -> TrainingStopped:
        """The stop to raise once the checkpoint is saved: exit 130 (SIGINT) or 143 (SIGTERM)."""
        code = 130 if self.signal in (None, signal.SIGINT) else 143
        name = "SIGINT" if code == 130 else "SIGTERM"
        where = f"after epoch {epoch}" if step_in_epoch == 0 and epoch else f"at epoch {epoch + 1}, step {step_in_epoch}"
        return TrainingStopped(f"stopped by {name} {where}; checkpoint saved in {folder.checkpoints}",
                               f"continue with `lcdistill compress --resume {folder}`", exit_code=code)
