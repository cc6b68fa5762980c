"""What a path on disk is: a run folder, a student weights file, an ONNX, a TorchScript or a torch.export (.pt2) file.

`identify(path)` names it (or says in one line why it is none of what the command accepts);
`Artifact` reads its metadata and gives what eval, export, lipschitz and report need from it: the
model, a predict function on normalised batches, the task it was trained for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch

from lcdistill import exporters, models, tasks
from lcdistill.errors import UserError
from lcdistill.runfolder import RunFolder, exported_files

KINDS = ("run", "weights", "onnx", "torchscript", "pt2")
# How each command's error names what it accepts, and where such a file comes from.
_WHAT = {
    ("run", "weights"): ("a run folder or student .safetensors", "pass the --out folder of `lcdistill compress` or `lcdistill train`"),
    KINDS: ("a run folder, student .safetensors, .onnx, TorchScript or .pt2 file",
            "pass the --out folder of `lcdistill compress`/`train`, or a file written by `lcdistill export`"),
}


def kind_of(path: Path) -> str | None:
    path = Path(path)
    if path.is_dir():
        return "run" if RunFolder(path).finished() else None
    if not path.is_file():
        return None
    return {".safetensors": "weights", ".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript", ".pt2": "pt2"}.get(path.suffix)


def identify(path: str | Path, accept: tuple[str, ...] = KINDS) -> Artifact:
    path = Path(path)
    kind = kind_of(path)
    if kind in accept:
        return Artifact(path, kind)
    if path.is_dir():  # a folder, but no finished run: say what is missing
        RunFolder(path).check_finished()
    what, fix = _WHAT.get(accept, _WHAT[KINDS])
    raise UserError(f"{path} is not {what}", fix)


@dataclass
class Artifact:
    path: Path
    kind: str  # one of KINDS
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def runtime(self) -> str:
        """What runs it: pytorch, onnx (ONNX Runtime), torchscript or pt2 (torch.export program)."""
        return "pytorch" if self.kind in ("run", "weights") else self.kind

    @property
    def file(self) -> Path:
        """The file that holds the weights (a run's student.safetensors)."""
        return RunFolder(self.path).student if self.kind == "run" else self.path

    @property
    def folder(self) -> Path:
        return self.path if self.kind == "run" else self.path.parent

    @cached_property
    def meta(self) -> dict:
        if self.kind == "onnx":
            return exporters.read_onnx_metadata(self.path)
        if self.kind == "torchscript":
            return exporters.read_torchscript_metadata(self.path)
        if self.kind == "pt2":
            return exporters.read_pt2_metadata(self.path)
        return models.read_meta(self.path)

    @property
    def task(self):
        return tasks.of_meta(self.meta)

    @property
    def role(self) -> str:
        """A row name for a measured file: its runtime, and how it was quantized (onnx-int8, onnx-w4a8 for int4
        weights; "qat" when from a quantization-aware run's learnt scales)."""
        how = self.meta.get("quantization") if self.kind == "onnx" else None
        if not how:
            return self.runtime
        bits = how.get("weight_bits", 8)
        return ("onnx-int8" if bits == 8 else f"onnx-w{bits}a8") + (" qat" if how.get("method") == "quantization-aware" else "")

    @cached_property
    def loaded(self):
        """The rebuilt PyTorch model (models.Loaded) of a run folder or weights file."""
        if self.runtime != "pytorch":
            raise UserError(f"{self.path} is an exported file, not PyTorch weights", "pass the run folder or its student.safetensors")
        return models.load_run(self.path)

    @cached_property
    def module(self):
        """The module to measure params and FLOPs of (a TorchScript or torch.export module too); None for ONNX."""
        if self.runtime == "pytorch":
            return self.loaded.model.eval()
        if self.kind == "torchscript":
            with exporters.quiet_jit():
                return torch.jit.load(str(self.path)).eval()
        if self.kind == "pt2":
            return exporters.load_pt2(self.path)
        return None

    @cached_property
    def predict(self) -> Callable:
        """What the task feeds a model (a normalised [N, C, H, W] batch, a detector's images) -> its prediction,
        refusing input of the wrong shape or type."""
        meta, task, spec = self.meta, self.task, self.task.export
        if self.kind == "onnx":
            session = exporters.onnx_session(self.path)
            return lambda x: spec.call(lambda batch: exporters.run_onnx_all(session, batch), x, meta)
        if self.runtime == "pytorch":
            predict = task.predictor(self.module)
            return lambda x: predict(spec.check(x, meta))
        module = self.module  # an exported module (TorchScript, torch.export) gives what the export gives
        return lambda x: spec.call(module, x, meta)


def exports_beside(target: Artifact, folder: str | Path | None) -> list[Artifact]:
    """The exported files in folder (default: the target's run folder), as artifacts."""
    where = Path(folder) if folder is not None else (target.path if target.kind == "run" else None)
    return [Artifact(p, kind_of(p)) for p in exported_files(where)] if where is not None else []


def base_run(target: Artifact) -> Artifact | None:
    """The finished run a quantization-aware run fine-tuned (its --student RUN, recorded in inputs.json), whose fp32
    and post-training files eval measures beside the quantization-aware ones; None for any other target."""
    if target.kind != "run" or not target.meta.get("qat") or not RunFolder(target.path).inputs.is_file():
        return None
    spec = json.loads(RunFolder(target.path).inputs.read_text()).get("base_run")
    return Artifact(Path(spec), "run") if spec and RunFolder(spec).finished() else None


def check_classes(target: Artifact, classes: list[str]) -> None:
    """A UserError unless the data's classes are the ones target was trained for."""
    if classes != target.meta["classes"]:
        raise UserError(f"the data's classes {classes[:5]}... differ from {target.file}'s {target.meta['classes'][:5]}...",
                        "evaluate on the data the model was trained for")


def teacher_of(student: Artifact) -> InMemory | None:
    """The run's teacher rebuilt, fed at the student's input size with its own mean/std (as in training);
    None when the run names no teacher. A teacher that cannot be rebuilt (hub weights offline) is a UserError."""
    meta = student.meta
    entry = meta.get("teacher")
    if not entry:
        return None
    t = models.rebuild(entry["spec"], meta["num_classes"])
    t_meta = {**meta, **t.data_config, "input_size": meta["input_size"]}
    return InMemory(t.model.eval(), t_meta, student.task, origin=t.origin)


@dataclass
class InMemory:
    """A PyTorch model held in memory (a run's rebuilt teacher), measured like an artifact."""

    module: torch.nn.Module
    meta: dict
    task: object
    kind: str = "model"
    runtime: str = "pytorch"
    file: Path | None = None
    origin: str | None = None  # where it came from, e.g. the teacher's hub name or run folder

    @property
    def predict(self) -> Callable:
        predict = self.task.predictor(self.module)
        return lambda x: predict(self.task.export.check(x, self.meta))
