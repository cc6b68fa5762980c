"""Atomic, pickle-free persistence: tensors in safetensors, everything else as JSON.

A training checkpoint is one .safetensors file whose header metadata carries the
non-tensor state as JSON, so a single rename makes it visible whole.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lcdistill.errors import UserError

STATE_KEY = "lcdistill_state"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), fsync it, then rename over `path`: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """Replace tensors in a nested structure by {"__tensor__": key}; collect them in `tensors`."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "t"
        if key in tensors:  # {"a.b": x, "a": {"b": y}} and {1: x, "1": y} flatten to the same path
            key = f"{key}#{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"cannot store dict keys of type {[type(k) for k in obj]}")
        # JSON keys are strings; remember int keys (optimizer state is keyed by param index).
        return {"__dict__": [[k, _flatten(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_state(path: Path, state: dict) -> None:
    """Save a nested training state (state dicts, RNG states, counters) atomically."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, tensors, "")
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={STATE_KEY: json.dumps(skeleton)}))


def load_state(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint {path} cannot be read ({e})", "it may be damaged; use an earlier checkpoint or start again") from None
    if STATE_KEY not in meta:
        raise UserError(f"{path} is not an lcdistill checkpoint", "pass a run folder written by `lcdistill compress`")
    return _unflatten(json.loads(meta[STATE_KEY]), tensors)


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a .pth/.pt read with weights_only=True (never unpickles code)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} not found", "pass an existing .safetensors or .pth file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"weights file {path} cannot be read as safetensors ({e})", "check the file is complete") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError and friends for anything but plain tensors
        # torch's text advises loading with weights_only=False or allow-listing the global, i.e.
        # running the file's code: never repeat that; name only what the file wanted to run.
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
        if found:
            reason = f"unpickling it would call {found.group(1)}"
        else:
            first = text.splitlines()[0] if text else ""
            reason = type(e).__name__ + (f": {first}" if first and "weights only" not in first.lower() else "")
        raise UserError(
            f"refused to load {path}: it is not a plain weights file ({reason})",
            "save a state_dict (torch.save(model.state_dict(), f)) or convert it to .safetensors",
        ) from None
    for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} holds no state dict of tensors", "save model.state_dict() to the file")
    from timm.models import clean_state_dict

    return clean_state_dict(obj)  # DDP and torch.compile prefixes
