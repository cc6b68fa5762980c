"""`lcdistill compress` and `lcdistill train`: build a recipe from the flags and run it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from lcdistill.cli.common import (
    AmpOpt, BatchOpt, ChannelsLastOpt, CkptOpt, ClipOpt, CompileOpt, DataOpt, DeviceOpt, EmaOpt, EpochsOpt, InputSizeOpt, LrOpt,
    OutOpt, SeedOpt, SetOpt, SkipBadOpt, TaskOpt, WorkersOpt, common_flags, console_for, need_data, overrides, user_errors,
)
from lcdistill.errors import UserError


def _train(recipe_layers: list[dict], data: str, teacher: str | None, teacher_weights: str | None, out: str | None, json_out: bool = False) -> None:
    from lcdistill import recipe as recipes, run

    recipe = recipes.build(recipe_layers)
    _run(run.prepare(recipe, data, teacher, teacher_weights, out), json_out)


def _run(prepared, json_out: bool, resume: bool = False) -> None:
    from lcdistill import run

    summary = run.run(prepared, console_for(json_out), resume=resume)
    if json_out and prepared.runtime.main:
        print(json.dumps(summary))


@user_errors
def compress(
    teacher: Optional[str] = typer.Option(None, "--teacher", help="timm/torchvision name (timm: / tv: prefix), run folder, or name + --teacher-weights."),
    student: Optional[str] = typer.Option(None, "--student", help="Recipe name (see `lcdistill recipes`), recipe file, or model name."),
    data: Optional[str] = DataOpt,
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Recipe YAML file."),
    method: Optional[str] = typer.Option(None, "--method", help="london | kd | ce, or terms joined by + (see `lcdistill methods`)"),
    teacher_weights: Optional[str] = typer.Option(None, "--teacher-weights", help="Teacher weights file (.safetensors or .pth)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue a run folder from its last checkpoint."),
    epochs: Optional[int] = EpochsOpt, batch_size: Optional[int] = BatchOpt, lr: Optional[float] = LrOpt,
    out: Optional[str] = OutOpt, device: Optional[str] = DeviceOpt, seed: Optional[int] = SeedOpt,
    input_size: Optional[int] = InputSizeOpt, amp_dtype: Optional[str] = AmpOpt, channels_last: Optional[bool] = ChannelsLastOpt,
    torchcompile: Optional[bool] = CompileOpt, model_ema: Optional[bool] = EmaOpt, workers: Optional[int] = WorkersOpt,
    checkpoint_every: Optional[int] = CkptOpt, max_grad_norm: Optional[float] = ClipOpt, skip_bad_images: Optional[bool] = SkipBadOpt,
    task: Optional[str] = TaskOpt, set_: Optional[List[str]] = SetOpt,
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
):
    """Distil a teacher into a smaller student (LONDON by default)."""
    from lcdistill import recipe as recipes, run

    if resume:
        # every setting a resumed run would ignore (it follows its own recipe); all default to None
        settings = {
            "--teacher": teacher, "--student": student, "--data": data, "--recipe": recipe, "--method": method,
            "--teacher-weights": teacher_weights, "--epochs": epochs, "--batch-size": batch_size, "--lr": lr, "--out": out,
            "--device": device, "--seed": seed, "--input-size": input_size, "--amp-dtype": amp_dtype,
            "--channels-last": channels_last, "--torchcompile": torchcompile, "--model-ema": model_ema, "--workers": workers,
            "--checkpoint-every": checkpoint_every, "--max-grad-norm": max_grad_norm, "--skip-bad-images": skip_bad_images,
            "--task": task, "--set": set_,
        }
        given = [flag for flag, value in settings.items() if value is not None and value != []]
        if given:
            raise UserError(f"--resume continues a run with its own recipe and takes no other settings (got {', '.join(given)})",
                            "drop them, or start a new run to change settings")
        recipe_dict, inputs = run.load_resume(resume)
        _run(run.prepare(recipe_dict, inputs["data"], inputs["teacher"], inputs["teacher_weights"], resume, resume=True), json_out, resume=True)
        return
    need_data(data)
    flags = common_flags(epochs, batch_size, lr, device, seed, input_size, amp_dtype, channels_last, torchcompile, model_ema, workers, checkpoint_every, max_grad_norm, skip_bad_images, task)
    flags["method"] = method
    layers = [recipes.resolve_student(student, recipe)] + overrides(flags, set_)
    _train(layers, data, teacher, teacher_weights, out, json_out)


@user_errors
def train(
    model: str = typer.Option(..., "--model", help="timm or torchvision model name (timm: / tv: prefix to choose)."),
    data: Optional[str] = DataOpt,
    pretrained: bool = typer.Option(False, "--pretrained/--scratch", help="Start from hub weights (fine-tune)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Start from a local .safetensors / .pth file."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Recipe YAML for the schedule."),
    epochs: Optional[int] = EpochsOpt, batch_size: Optional[int] = BatchOpt, lr: Optional[float] = LrOpt,
    out: Optional[str] = OutOpt, device: Optional[str] = DeviceOpt, seed: Optional[int] = SeedOpt,
    input_size: Optional[int] = InputSizeOpt, amp_dtype: Optional[str] = AmpOpt, channels_last: Optional[bool] = ChannelsLastOpt,
    torchcompile: Optional[bool] = CompileOpt, model_ema: Optional[bool] = EmaOpt, workers: Optional[int] = WorkersOpt,
    checkpoint_every: Optional[int] = CkptOpt, max_grad_norm: Optional[float] = ClipOpt, skip_bad_images: Optional[bool] = SkipBadOpt,
    task: Optional[str] = TaskOpt, set_: Optional[List[str]] = SetOpt,
):
    """Train or fine-tune any classifier on DIR (head sized to its classes); the run folder can be a teacher."""
    from lcdistill import recipe as recipes

    need_data(data)
    flags = common_flags(epochs, batch_size, lr, device, seed, input_size, amp_dtype, channels_last, torchcompile, model_ema, workers, checkpoint_every, max_grad_norm, skip_bad_images, task)
    source, name = recipes.split_source(model)
    flags.update({"method": "ce", "student.source": source, "student.name": name, "student.pretrained": pretrained, "student.weights": weights})
    base = [recipes.read_yaml(Path(recipe))] if recipe else []
    if recipe and not Path(recipe).is_file():
        raise UserError(f"recipe file {recipe} not found", "pass an existing .yaml file")
    _train(base + overrides(flags, set_), data, None, None, out)
