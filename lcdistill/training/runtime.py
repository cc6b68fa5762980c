"""Where and how this process trains: device, precision, the torchrun process group, RNG state."""

from __future__ import annotations

import os
import random
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from lcdistill.errors import UserError


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
        """Sum over the processes, in place (a no-op in one process)."""
        if self.world > 1:
            dist.all_reduce(tensor)

    def all_gather(self, obj) -> list:
        """Every process's obj, in rank order ([obj] in one process)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


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


def eval_runtime(device: str) -> Runtime:
    """The runtime of a command that only measures: float32, default memory format."""
    return setup_runtime({"device": device, "amp_dtype": "float32", "channels_last": False, "deterministic": False})
