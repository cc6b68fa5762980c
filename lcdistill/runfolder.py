"""RunFolder: the one place that knows every path in a run folder.

    RUN/recipe.yaml            resolved recipe (re-runs the run)
    RUN/run.json               inputs besides the recipe: data folder, teacher, classes
    RUN/checkpoints/last.safetensors, best.safetensors
    RUN/metrics.jsonl          one JSON record per logged step and per epoch end
    RUN/summary.csv            one row per epoch
    RUN/student.safetensors    the shippable student (+ lcdistill metadata in its header)
    RUN/student.json           how to rebuild and feed it
    RUN/student.onnx, student.int8.onnx (.w4a8.onnx), student.pt, student.pt2    `lcdistill export` (default folder)
    RUN/hub/                   `lcdistill export --format hub`: config.json, model.safetensors, README.md (timm's Hub format)
    RUN/eval.json, lipschitz.json, report.html, plots/*.png
"""

from __future__ import annotations

from pathlib import Path

from lcdistill.errors import UserError

# What `lcdistill export` writes, in the order tables list them.
EXPORTS = {"onnx": "student.onnx", "int8": "student.int8.onnx", "w4a8": "student.w4a8.onnx", "torchscript": "student.pt", "pt2": "student.pt2"}
EXPORT_FILES = tuple(EXPORTS.values())
HUB_FOLDER = "hub"


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    recipe = property(lambda self: self.path / "recipe.yaml")
    inputs = property(lambda self: self.path / "run.json")
    checkpoints = property(lambda self: self.path / "checkpoints")
    last = property(lambda self: self.path / "checkpoints" / "last.safetensors")
    best = property(lambda self: self.path / "checkpoints" / "best.safetensors")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    summary = property(lambda self: self.path / "summary.csv")
    student = property(lambda self: self.path / "student.safetensors")
    meta = property(lambda self: self.path / "student.json")
    eval = property(lambda self: self.path / "eval.json")
    lipschitz = property(lambda self: self.path / "lipschitz.json")
    report = property(lambda self: self.path / "report.html")
    plots = property(lambda self: self.path / "plots")
    hub = property(lambda self: self.path / HUB_FOLDER)

    def export(self, fmt: str) -> Path:
        """Where `lcdistill export --out THIS_FOLDER` writes a format (onnx, int8, torchscript, pt2)."""
        return self.path / EXPORTS[fmt]

    def finished(self) -> bool:
        """A student was written: the folder can be evaluated, exported, used as a teacher."""
        return self.meta.is_file() and self.student.is_file()

    def check_finished(self) -> None:
        """The UserError saying what an unfinished folder lacks."""
        if not self.finished():
            raise UserError(f"{self.path} is not a finished lcdistill run (no {self.student.name} + {self.meta.name})",
                            "pass a run folder written by `lcdistill train` or `lcdistill compress`")

    def started(self) -> bool:
        """The run was set up (recipe and inputs written): it may be resumed."""
        return self.recipe.is_file() and self.inputs.is_file()


def exported_files(folder: str | Path) -> list[Path]:
    """The export files present in folder, in a fixed order."""
    return [Path(folder) / name for name in EXPORT_FILES if (Path(folder) / name).is_file()]
