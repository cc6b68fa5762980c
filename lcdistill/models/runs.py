"""Models by what the user names: a run folder, a student weights file, or a family's model name
(+ a weights file, or hub weights); rebuilding a run's teacher; what student.json records.

A run folder written by lcdistill holds student.safetensors (whose metadata repeats
student.json) and student.json: enough to rebuild the model and feed it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lcdistill.checkpoint import load_weights
from lcdistill import __version__
from lcdistill.errors import UserError
from lcdistill.models import registry
from lcdistill.models.loaded import Loaded, load_into
from lcdistill.runfolder import RunFolder


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
        RunFolder(path).check_finished()
    weights = RunFolder(path).student if path.is_dir() else path
    meta = read_meta(path)
    model = registry.build(meta["arch"], meta["num_classes"])
    load_into(model, load_weights(weights), str(weights), meta["num_classes"])
    cfg = {k: meta[k] for k in ("mean", "std", "input_size", "interpolation", "crop_pct")}
    return Loaded(model, meta["arch"], meta["num_classes"], cfg, str(path), {"run": str(path.resolve())}, meta.get("classes"), meta)


def resolve(spec: str, num_classes: int, weights: str | None = None, pretrained: bool = True, flag: str = "--teacher-weights",
            kwargs: dict | None = None, keep_head: bool = True, task: str | None = None) -> Loaded:
    """A model from a run folder, a student weights file, or NAME [+ weights file | hub weights] of a
    family of `task` (of any task when None).

    keep_head: the weights' classifier must fit the data (a teacher); False gives a student
    a fresh head for the data's classes on top of weights trained for other classes."""
    path = Path(spec)
    if path.is_dir():
        return load_run(path)
    if path.suffix == ".safetensors" and path.is_file() and weights is None:
        return load_run(path)
    found = registry.parse(spec, task)
    if found is None:
        raise (registry.families(task) or registry.FAMILIES)[0].unknown(spec)
    family, arch = found
    arch["kwargs"] = dict(kwargs or {})
    return family.resolve(arch, num_classes, weights, pretrained, flag, keep_head)


def rebuild(spec: dict, num_classes: int) -> Loaded:
    """Build again from a Loaded.spec (as stored in student.json's teacher entry)."""
    if "run" in spec:
        return load_run(Path(spec["run"]))
    arch = {k: spec[k] for k in ("source", "name", "kwargs")}
    return registry.family_of(arch).resolve(arch, num_classes, spec.get("weights"), spec.get("pretrained", False), "--teacher-weights", True)


def model_meta(loaded: Loaded, classes: list[str], input_size: list[int], extra: dict[str, Any] | None = None) -> dict:
    """What student.json records: enough to rebuild the model and feed it."""
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
