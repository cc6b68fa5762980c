"""Where a run is (epoch, step, best value, rows, the epoch in progress) and the checkpoint state of a
trainer: everything a resume needs to go on as if it had never stopped."""

from __future__ import annotations

from dataclasses import dataclass, field

from lcdistill.errors import UserError
from lcdistill.training.runtime import rng_state, set_rng_state


def fresh_partial() -> dict:
    return {"sums": {}, "skipped": 0}


@dataclass
class Position:
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    rows: list[dict] = field(default_factory=list)
    partial: dict = field(default_factory=fresh_partial)  # loss sums of the epoch in progress, kept across a resume


def state_of(t) -> dict:
    """A Trainer's checkpoint state."""
    p = t.position
    return {
        "student": t.student.state_dict(),
        "method": t.distiller.method_state(),
        "ema": t.ema.state_dict() if t.ema else None,
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.scheduler.state_dict(),
        "scaler": t.scaler.state_dict() if t.scaler else None,
        "epoch": p.epoch,
        "step_in_epoch": p.step_in_epoch,
        "global_step": p.global_step,
        "best": t.validator.best,
        "rows": p.rows,
        "partial": {"sums": {k: float(v) for k, v in p.partial["sums"].items()}, "skipped": p.partial["skipped"]},
        "rng": rng_state(),
    }


def load_into(t, state: dict) -> None:
    """Put a checkpoint state back into a Trainer."""
    if "student" not in state:  # "trainable": written before the task layer
        raise UserError(f"the checkpoint in {t.folder.checkpoints} was written by an older lcdistill",
                        "start the run again, or finish it with the lcdistill version that began it")
    t.student.load_state_dict(state["student"])
    t.distiller.load_method_state(state["method"])
    if t.ema and state["ema"] is not None:
        t.ema.load_state_dict(state["ema"])
    t.optimizer.load_state_dict(state["optimizer"])
    t.scheduler.load_state_dict(state["scheduler"])
    if t.scaler and state["scaler"] is not None:
        t.scaler.load_state_dict(state["scaler"])
    t.position = Position(state["epoch"], state["step_in_epoch"], state["global_step"], state["rows"], state.get("partial") or fresh_partial())
    t.validator.best = state["best"]
    set_rng_state(state["rng"])
