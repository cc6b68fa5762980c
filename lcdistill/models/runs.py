"""What a model name, run folder or weights file loads as (Loaded), and the student files a run holds.

A run folder written by lcdistill holds student.safetensors (whose metadata repeats
student.json) and student.json: enough to rebuild the model and feed it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lcdistill.checkpoint import load_weights
from lcdistill.errors import UserError
from lcdistill.models.factory import build, data_config, from_weights_file, load_into, params
from lcdistill.models.hub import resolve_source
from lcdistill.recipe import split_source
from lcdistill.runfolder import RunFolder


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
        return params(self.model)


def is_run(path: Path) -> bool:
    return RunFolder(path).finished()


def read_meta(path: Path) -> dict:
    """student.json of a run folder, or the metadata embedded in a student .safetensors file."""
    path = Path(path)
    if path.is_dir():
        return json.loads(RunFolder(path).meta.read_text())
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "lcdistill" not in meta:
        raise UserError(f"{path} carries no lcdistill metadata", "pass the run folder, or a student.safetensors written by lcdistill")
    return json.loads(meta["lcdistill"])


def load_run(path: Path) -> Loaded:
    """Rebuild the final student of a run folder (or a student .safetensors written by lcdistill)."""
    path = Path(path)
    if path.is_dir():
        from lcdistill.artifacts import identify

        identify(path, accept=("run",))  # or the error naming what the folder lacks
    weights = RunFolder(path).student if path.is_dir() else path
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
    from lcdistill.models import segmentation

    dense = segmentation.resolve(spec, num_classes, weights, pretrained, flag, kwargs, keep_head)
    if dense is not None:  # smp:Arch:encoder or a torchvision segmentation name
        return dense
    source, name = split_source(spec)
    arch = {"source": resolve_source(source, name), "name": name, "kwargs": dict(kwargs or {})}
    if weights:
        model, origin, rebuild = from_weights_file(arch, num_classes, weights, keep_head, f"{arch['source']}:{name}")
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
