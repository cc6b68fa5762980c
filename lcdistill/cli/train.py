"""`lcdistill compress` and `lcdistill train`: the flags, as lcdistill.compress's and lcdistill.train's keywords."""

from __future__ import annotations

import json
from typing import Optional

import typer

from lcdistill import api
from lcdistill.cli.common import DataOpt, OutOpt, TrainingOptions, console_for, training_options, user_errors


@user_errors
@training_options
def compress(
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Model name (timm: / tv: / smp: prefix), run folder, or name + --teacher-weights."),
    student: Optional[str] = typer.Option(None, "--student", help="Recipe name (see `lcdistill recipes`), recipe file, model name, a run folder (fine-tuned further), or prune:R (the teacher cut to at most R of its FLOPs)."),
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
    run = api.compress(teacher, student, data, method=method, recipe=recipe, teacher_weights=teacher_weights, resume=resume, out=out,
                       **options.keywords(), console=console_for(json_out))
    if json_out and run.summary:  # rank 0 of torchrun's processes: the others return no summary
        print(json.dumps(run.summary))


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
    api.train(model, data, pretrained=pretrained, weights=weights, recipe=recipe, out=out, **options.keywords(), console=console_for())
