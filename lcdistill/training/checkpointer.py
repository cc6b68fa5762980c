"""Training checkpoints: what goes in one, the non-finite guard, atomic save, resume, best weights."""

from __future__ import annotations

import torch

from lcdistill.checkpoint import load_state, save_state, save_weights
from lcdistill.errors import TrainingStopped
from lcdistill.runfolder import RunFolder


class Checkpointer:
    def __init__(self, folder: RunFolder, main: bool):
        self.folder, self.main = folder, main  # only the main process writes

    def diverged(self, what: str, step: int, epoch: int) -> TrainingStopped:
        """The stop naming the step (1-based, as in metrics.jsonl) and where the last good state is."""
        last = self.folder.last
        kept = f"the last good checkpoint stays in {last}" if last.exists() else "no checkpoint was written (--checkpoint-every N keeps some)"
        return TrainingStopped(
            f"training diverged: {what} at step {step} (epoch {epoch + 1}); {kept}",
            "lower --lr, set --max-grad-norm 1.0, or train in float32 (--amp-dtype float32)",
        )

    def save(self, state: dict, weights: dict[str, torch.Tensor], step: int, epoch: int) -> None:
        """Write state as checkpoints/last.safetensors, unless weights hold inf/nan: a finite loss can
        still leave them so, and they must never replace a good checkpoint."""
        if not all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()):
            raise self.diverged("the weights became non-finite", step, epoch)
        if not self.main:
            return
        path = self.folder.last
        try:
            save_state(path, state)
        except OSError as e:  # disk full, folder gone: the rename never happened, so the old file stands
            if path.exists():
                fix = f"the previous checkpoint is intact: free disk space and continue with `lcdistill compress --resume {self.folder}`"
            else:
                fix = "free disk space and start again"
            raise TrainingStopped(f"could not write checkpoint {path} ({e.strerror or e})", fix) from None

    def save_best(self, weights: dict[str, torch.Tensor], info: dict) -> None:
        if self.main:
            save_weights(self.folder.best, weights, info)

    def load(self) -> dict:
        """The last checkpoint; stale temporary files of a write cut short by SIGKILL are removed."""
        state = load_state(self.folder.last)
        if self.main:
            for stale in self.folder.checkpoints.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
        return state
