"""Resolve a model name, run folder or weights file to a module and its data config.

Sources: timm (`timm:NAME`), torchvision (`tv:NAME`), a bare NAME (timm first, then
torchvision), a run folder written by lcdistill, or a weights file.
"""

from __future__ import annotations

import difflib
import json
import os
import socket
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from torch import nn

from lcdistill.checkpoint import load_weights
from lcdistill.errors import UserError
from lcdistill.recipe import split_source

MODEL_FILE = "student.safetensors"
META_FILE = "student.json"


@dataclass
class Loaded:
    """A built model and what is needed to feed it and to rebuild it."""

    model: nn.Module
    arch: dict  # {"source": "timm"|"tv", "name": str, "kwargs": dict}
    num_classes: int
    data_config: dict  # mean, std, input_size, interpolation, crop_pct
    origin: str  # what the user named, for tables and logs
    spec: dict  # how to build it again (stored in a student run for eval's teacher column)
    classes: list[str] | None = None
    meta: dict = field(default_factory=dict)  # student.json of a run, if any

    @property
    def params(self) -> int:
        from lcdistill.evaluate import params

        return params(self.model)


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


def _timm_pretrained_kwargs(name: str, flag: str) -> dict:
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


def _tv_pretrained_weights(name: str, flag: str):
    weights = torchvision.models.get_model_weights(name).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / weights.url.split("/")[-1]
    if not cached.is_file() and not _reachable(weights.url.split("/")[2]):
        raise _offline_error(f"tv:{name}", flag)
    return weights


def _replace_tv_head(model: nn.Module, num_classes: int) -> None:
    """Point a torchvision model's last Linear at num_classes (its weights stay random)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError("this torchvision model has no Linear classifier to resize", "choose another model or train it with its own classes")
    path, old = linears[-1]
    parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    setattr(parent, path.rsplit(".", 1)[-1], nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def _init_head(model: nn.Module) -> None:
    """Small init for a new classifier. timm's EfficientNet-family init draws the head from
    U(+-1/sqrt(num_classes)): with 10 classes the first logits have a std near 10 and
    the first epoch is spent recovering from it."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    if isinstance(head, nn.Linear):
        nn.init.normal_(head.weight, std=0.01)
        if head.bias is not None:
            nn.init.zeros_(head.bias)


def build(arch: dict, num_classes: int, pretrained: bool = False, flag: str = "--weights") -> nn.Module:
    """Construct the architecture with a head of num_classes; optional hub weights (head re-initialised)."""
    source, name, kwargs = arch["source"], arch["name"], dict(arch.get("kwargs") or {})
    try:
        if source == "timm":
            extra = _timm_pretrained_kwargs(name, flag) if pretrained else {}
            model = timm.create_model(name, num_classes=num_classes, **extra, **kwargs)
        elif pretrained:
            model = torchvision.models.get_model(name, weights=_tv_pretrained_weights(name, flag), **kwargs)
            if num_classes != 1000:
                _replace_tv_head(model, num_classes)
        else:
            model = torchvision.models.get_model(name, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise UserError(f"cannot build {source}:{name} with {kwargs} ({e})", "check student.kwargs in the recipe") from None
    if not (pretrained and num_classes == 1000):  # keep a pretrained ImageNet head
        _init_head(model)
    return model


def load_into(model: nn.Module, state: dict[str, torch.Tensor], what: str, num_classes: int, keep_head: bool = True) -> None:
    """Load a state dict, turning a classifier-size mismatch into the 'train it first' advice.

    keep_head=False (a student being fine-tuned) keeps the new head instead of the file's."""
    own = model.state_dict()
    mismatched = [k for k in state if k in own and own[k].shape != state[k].shape]
    head_only = bool(mismatched) and all(state[k].shape[0] != own[k].shape[0] and own[k].shape[0] == num_classes for k in mismatched)
    if head_only and not keep_head:
        state = {**{k: v for k, v in state.items() if k not in mismatched}, **{k: own[k] for k in mismatched}}
        mismatched = []
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if mismatched and head_only:
        got = state[mismatched[0]].shape[0]
        raise UserError(
            f"{what} has {got} classes but the data has {num_classes}",
            "fine-tune it on this data first with `lcdistill train --model NAME --data DIR` and pass that run folder",
        )
    if mismatched or missing or unexpected:
        first = (mismatched or missing or unexpected)[0]
        raise UserError(
            f"{what} does not fit the architecture (key '{first}': {len(mismatched)} mismatched, {len(missing)} missing, {len(unexpected)} unexpected)",
            "pass weights saved from the same architecture",
        )
    model.load_state_dict(state)


def data_config(model: nn.Module) -> dict:
    """mean/std/input size/interpolation/crop_pct from timm's pretrained_cfg (torchvision gets timm's ImageNet defaults)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return {
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "input_size": list(cfg["input_size"]),
        "interpolation": cfg.get("interpolation", "bilinear"),
        "crop_pct": float(cfg.get("crop_pct", 0.875)),
    }


def is_run(path: Path) -> bool:
    path = Path(path)
    return (path / META_FILE).is_file() and (path / MODEL_FILE).is_file()


def read_meta(path: Path) -> dict:
    """student.json of a run folder, or the metadata embedded in a student .safetensors file."""
    path = Path(path)
    if path.is_dir():
        return json.loads((path / META_FILE).read_text())
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "lcdistill" not in meta:
        raise UserError(f"{path} carries no lcdistill metadata", "pass the run folder, or a student.safetensors written by lcdistill")
    return json.loads(meta["lcdistill"])


def load_run(path: Path) -> Loaded:
    """Rebuild the final student of a run folder (or a student .safetensors written by lcdistill)."""
    path = Path(path)
    if path.is_dir() and not is_run(path):
        raise UserError(f"{path} is not a finished lcdistill run (no {MODEL_FILE} + {META_FILE})", "pass a run folder written by `lcdistill train` or `lcdistill compress`")
    weights = path / MODEL_FILE if path.is_dir() else path
    meta = read_meta(path)
    model = build(meta["arch"], meta["num_classes"])
    load_into(model, load_weights(weights), str(weights), meta["num_classes"])
    cfg = {k: meta[k] for k in ("mean", "std", "input_size", "interpolation", "crop_pct")}
    return Loaded(model, meta["arch"], meta["num_classes"], cfg, str(path), {"run": str(path.resolve())}, meta.get("classes"), meta)


def resolve(spec: str, num_classes: int, weights: str | None = None, pretrained: bool = True, flag: str = "--teacher-weights",
            kwargs: dict | None = None, keep_head: bool = True) -> Loaded:
    """A model from a run folder, a student weights file, or NAME [+ weights file | hub weights].

    keep_head: the weights' classifier must fit the data (a teacher); False gives a student
    a fresh head for the data's classes on top of weights trained for other classes."""
    path = Path(spec)
    if path.is_dir():
        return load_run(path)
    if path.suffix == ".safetensors" and path.is_file() and weights is None:
        return load_run(path)
    source, name = split_source(spec)
    arch = {"source": resolve_source(source, name), "name": name, "kwargs": dict(kwargs or {})}
    if weights:
        model = build(arch, num_classes)
        load_into(model, load_weights(Path(weights)), f"weights file {weights}", num_classes, keep_head)
        origin = f"{arch['source']}:{name} + {weights}"
        rebuild = {**arch, "weights": str(Path(weights).resolve())}
    else:
        if pretrained and keep_head and num_classes != 1000:
            raise UserError(
                f"{arch['source']}:{name} comes with 1000 ImageNet classes but the data has {num_classes}",
                f"pass {flag} FILE with weights for these {num_classes} classes, or fine-tune it on this data first"
                f" with `lcdistill train --model {spec} --pretrained --data DIR` and pass that run folder",
            )
        model = build(arch, num_classes, pretrained=pretrained, flag=flag)
        origin = f"{arch['source']}:{name}" + (" (pretrained)" if pretrained else "")
        rebuild = {**arch, "pretrained": pretrained}
    return Loaded(model, arch, num_classes, data_config(model), origin, rebuild)


def rebuild(spec: dict, num_classes: int) -> Loaded:
    """Build again from a Loaded.spec (as stored in student.json's teacher entry)."""
    if "run" in spec:
        return load_run(Path(spec["run"]))
    arch = {k: spec[k] for k in ("source", "name", "kwargs")}
    name = f"{arch['source']}:{arch['name']}"
    return resolve(name, num_classes, weights=spec.get("weights"), pretrained=spec.get("pretrained", False), kwargs=arch["kwargs"])


def model_meta(loaded: Loaded, classes: list[str], input_size: list[int], extra: dict[str, Any] | None = None) -> dict:
    """What student.json records: enough to rebuild the model and feed it."""
    from lcdistill import __version__

    cfg = loaded.data_config
    return {
        "format": "lcdistill-model/1",
        "lcdistill_version": __version__,
        "arch": loaded.arch,
        "num_classes": len(classes),
        "classes": classes,
        "mean": cfg["mean"],
        "std": cfg["std"],
        "input_size": input_size,
        "interpolation": cfg["interpolation"],
        "crop_pct": cfg["crop_pct"],
        "params": loaded.params,
        **(extra or {}),
    }
