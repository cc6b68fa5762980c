"""Which library builds a model name (timm or torchvision), and its pretrained hub weights.

The hub is probed before any download, so an offline machine fails in seconds with
one line saying what to pass instead.
"""

from __future__ import annotations

import difflib
import os
import socket
from functools import lru_cache
from pathlib import Path

import timm
import torch
import torchvision

from lcdistill.errors import UserError


@lru_cache(maxsize=1)
def torchvision_names() -> tuple[str, ...]:
    return tuple(torchvision.models.list_models(module=torchvision.models))


def resolve_source(source: str, name: str) -> str:
    """Which library builds `name`: 'timm' or 'tv'. Unknown names get close suggestions."""
    in_timm = timm.is_model(name)
    in_tv = name in torchvision_names()
    if source == "timm" and in_timm or source == "auto" and in_timm:
        return "timm"
    if source == "tv" and in_tv or source == "auto" and in_tv:
        return "tv"
    pool = {"timm": list(timm.list_models()), "tv": list(torchvision_names())}
    choices = list(dict.fromkeys(pool.get(source) or pool["timm"] + pool["tv"]))  # a name in both libraries once
    close = difflib.get_close_matches(name, choices, n=4, cutoff=0.6)
    where = {"timm": "timm", "tv": "torchvision"}.get(source, "timm or torchvision")
    hint = f"did you mean {', '.join(close)}?" if close else "run `python -c \"import timm; print(timm.list_models('*res*'))\"` to search names"
    raise UserError(f"unknown model '{name}' in {where}", hint)


def _reachable(host: str, timeout: float = 3.0) -> bool:
    """A quick probe so an offline machine fails in seconds, not after the hub client's retries."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("LCDISTILL_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_error(what: str, flag: str) -> UserError:
    return UserError(
        f"cannot download pretrained weights for {what}: the hub is unreachable and they are not in the local cache",
        f"pass a local weights file with {flag} FILE (.safetensors or .pth), or a run folder from `lcdistill train`",
    )


def timm_pretrained_kwargs(name: str, flag: str) -> dict:
    """timm.create_model kwargs for pretrained weights, from the local cache when they are there."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise UserError(f"timm:{name} has no pretrained weights", f"pass {flag} FILE or drop --pretrained")
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        hub_id = cfg.hf_hub_id.split("@")[0]
        for filename in ("model.safetensors", "pytorch_model.bin", cfg.hf_hub_filename):
            if filename:
                cached = try_to_load_from_cache(hub_id, filename)
                if isinstance(cached, str):
                    return {"pretrained": True, "pretrained_cfg_overlay": {"file": cached}}
        if not _reachable("huggingface.co"):
            raise _offline_error(f"timm:{name}", flag)
    elif cfg.url and not _reachable(cfg.url.split("/")[2]):
        cached = Path(torch.hub.get_dir()) / "checkpoints" / cfg.url.split("/")[-1]
        if not cached.is_file():
            raise _offline_error(f"timm:{name}", flag)
    return {"pretrained": True}


def tv_pretrained_weights(name: str, flag: str):
    """The default torchvision weights enum of `name`, once they are cached or the hub is reachable."""
    weights = torchvision.models.get_model_weights(name).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / weights.url.split("/")[-1]
    if not cached.is_file() and not _reachable(weights.url.split("/")[2]):
        raise _offline_error(f"tv:{name}", flag)
    return weights
