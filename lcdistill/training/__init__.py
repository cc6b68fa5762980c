"""Training: the loop, where it runs (runtime), its checkpoints and its log."""

from lcdistill.training.loop import Trainer
from lcdistill.training.runtime import Runtime, eval_runtime, rng_state, set_rng_state, setup_runtime

__all__ = ["Runtime", "Trainer", "eval_runtime", "rng_state", "set_rng_state", "setup_runtime"]
