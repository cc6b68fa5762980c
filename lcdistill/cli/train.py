"""`lcdistill compress` and `lcdistill train`: build recipe layers from the flags and run them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from lcdistill.cli.common import DataOpt, OutOpt, TrainingOptions, console_for, need_data, training_options, user_errors
from lcdistill.errors import UserError


def _run(layers: list[dict], data: str, teacher: str | None, teacher_weights: str | None, out: str | None, json_out: bool = False,
         resume: bool = False) -> None:
    from lcdistill import run

    prepared = run.prepare(layers, data, teacher, teacher_weights, out, resume=resume)
    summary = run.run(prepared, console_for(json_out), resume=resume)
    if json_out and prepared.runtime.main:
        print(json.dumps(summary))


@user_errors
@training_options
def compress(
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Model name (timm: / tv: / smp: prefix), run folder, or name + --teacher-weights."),
    student: Optional[str] = typer.Option(None, "--student", help="Recipe name (see `lcdistill recipes`), recipe file, or model name."),
    data: Optional[str] = DataOpt,
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Recipe YAML file."),
    method: Optional[str] = typer.Option(None, "--method", help="london | kd | ce, or terms joined by + (default: the task's, see `lcdistill methods`)"),
    teacher_weights: Optional[str] = typer.Option(None, "--teacher-weights", help="Teacher weights file (.safetensors or .pth)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue a run folder from its last checkpoint."),
    out: Optional[str] = OutOpt,
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
    *, options: TrainingOptions,
):
    """Distil a teacher into a smaller student (the task's default method: london for classification, cwd for segmentation)."""
    from lcdistill import recipe as recipes, run

    if resume:
        # every setting a resumed run would ignore (it follows its own recipe)
        own = {"--teacher": teacher, "--student": student, "--data": data, "--recipe": recipe, "--method": method,
               "--teacher-weights": teacher_weights, "--out": out}
        given = [flag for flag, value in own.items() if value is not None] + options.given()
        if given:
            raise UserError(f"--resume continues a run with its own recipe and takes no other settings (got {', '.join(given)})",
                            "drop them, or start a new run to change settings")
        saved, inputs = run.load_resume(resume)
        _run([saved], inputs["data"], inputs["teacher"], inputs["teacher_weights"], resume, json_out, resume=True)
        return
    need_data(data)
    layers = [recipes.resolve_student(student, recipe)] + options.layers({"method": method})
    _run(layers, data, teacher, teacher_weights, out, json_out)


@user_errors
@training_options
def train(
    model: str = typer.Option(..., "--model", help="Model name: timm or torchvision classifier, tv:/smp: segmentation model (see `lcdistill students`)."),
    data: Optional[str] = DataOpt,
    pretrained: bool = typer.Option(False, "--pretrained/--scratch", help="Start from hub weights (fine-tune)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Start from a local .safetensors / .pth file."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Recipe YAML for the schedule."),
    out: Optional[str] = OutOpt,
    *, options: TrainingOptions,
):
    """Train or fine-tune any model of a task on DIR (head sized to its classes); the run folder can be a teacher."""
    from lcdistill import recipe as recipes
    from lcdistill.specs import split_source

    need_data(data)
    if recipe and not Path(recipe).is_file():
        raise UserError(f"recipe file {recipe} not found", "pass an existing .yaml file")
    source, name = split_source(model)
    base = [recipes.read_yaml(Path(recipe))] if recipe else []
    student = {"method": "ce", "student.source": source, "student.name": name, "student.pretrained": pretrained, "student.weights": weights}
    _run(base + options.layers(student), data, None, None, out)
