"""Quantization-aware training in a run. `finetune` lays the short schedule of a fine-tune under the user's
settings when the student is a finished run folder (run.prepare); `Hook` is what the Trainer calls: before
the optimizer it puts the fake quantization on the student (prepare.py), at finish it takes it off again
(the plain weights on their grid and what the run's student.json records of it); `line` says what it did in
the run's header. No branch in the loop: a run without it passes no hook."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lcdistill import guardrails, methods, recipe as recipes
from lcdistill.errors import UserError
from lcdistill.runfolder import RunFolder


def weights_text(bits: int, weight_range: str = "max") -> str:
    text = "int8 per channel (7-bit range)" if bits == 8 else f"int{bits} per channel"
    return text + (", clipping learnt" if weight_range == "learnt" else "")


def finetune(draft: dict) -> dict:
    """The schedule a quantization-aware run starting from a finished run folder (--student RUN) lays under the
    user's settings: a short fine-tune (3 epochs, no warm-up) at a tenth of the lr that run trained at, with its
    optimizer, as the field's QAT recipes do (torchvision's quantization references fine-tune a trained model), and
    its BatchNorm statistics fixed from the start."""
    spec = draft["student"]["name"]
    if draft["qat"]["mode"] == "none" or not spec or not RunFolder(spec).recipe.is_file():
        return {}
    saved = recipes.read_yaml(RunFolder(spec).recipe)
    trained = saved.get("schedule", {})
    schedule = {"epochs": 3, "warmup_epochs": 0}
    if isinstance(trained.get("lr"), (int, float)):
        schedule["lr"] = 0.1 * trained["lr"]
    schedule.update({k: trained[k] for k in ("optimizer", "weight_decay", "momentum", "batch_size") if k in trained})
    # the data as that run saw it (its augmentation: a digits run trained without flips must not meet them now)
    data = {k: v for k, v in saved.get("data", {}).items() if k in ("input_size", "crop_pct", "scale", "ratio", "hflip", "color_jitter", "auto_augment")}
    # a trained student needs no ramp-in of the terms: at their full weight from the first step
    ramps = {t.section: {t.warmup_key: 0} for t in methods.TERMS.values() if t.warmup_key}
    # its BatchNorm statistics are trained already: fixed from the first step, so every step trains the folded weights and
    # rounded biases the file will hold (int4 on the digits: seed 3 ended at 98.33 in its file, against 96.66 with them
    # fixed at 3/4 of the run, benchmarks/RESULTS.md)
    return {"schedule": schedule, "data": data, "qat": {"freeze_bn_at": 0}, **ramps}


class Hook:
    """The Trainer's hooks of a quantization-aware run: `report` (what prepare did) after before_optimizer,
    `shipped` ((weights, the student.json entry)) after finish."""

    def __init__(self, recipe: dict, task, input_size: int, images: int, world: int):
        s = recipe["schedule"]
        self.settings, self.steps = recipe["qat"], guardrails.steps_per_epoch(images, int(s["batch_size"]), world) * int(s["epochs"])
        self.example = task.export.example({"input_size": [3, input_size, input_size]}, 2)
        self.report: dict | None = None
        self.shipped: tuple[dict, dict] | None = None

    def before_optimizer(self, distiller) -> None:
        from lcdistill.quantize.prepare import prepare

        self.report = {**prepare(distiller.student, self.example, self.settings, self.steps), "weight_bits": int(self.settings["weight_bits"])}

    def finish(self, student: nn.Module) -> None:
        self.shipped = ship(student, self.report, self.settings)


def base_input(recipe: dict) -> dict:
    """{"base_run": its absolute path} for inputs.json when a quantization-aware run fine-tunes a run folder
    (eval measures that run's fp32 and post-training files beside this one's), else {}."""
    spec = recipe["student"]["name"]
    if recipe["qat"]["mode"] == "none" or not spec or not RunFolder(spec).finished():
        return {}
    return {"base_run": str(Path(spec).resolve())}


def hook(recipe: dict, task, model: nn.Module, input_size: int, images: int, world: int) -> Hook | None:
    """The hook when qat.mode is int8 (the task and model checked now, before anything is written), else None."""
    if recipe["qat"]["mode"] == "none":
        return None
    why = task.quantization_aware(model)
    if why:
        raise UserError(why, "distil in float, then `lcdistill export RUN --quantize int8` (post-training int8), or pick a student it covers")
    return Hook(recipe, task, input_size, images, world)


def line(q: dict) -> str:
    return (f"qat: int8 as onnxruntime runs it: {q['quantized']} layers fake-quantized (weights {weights_text(q['weight_bits'], q.get('weight_range', 'max'))}, {q['folded']} "
            f"BatchNorms folded in; their inputs and {q['outputs']} outputs a `+` or pooling reads in uint8), float as the export keeps "
            f"them: {', '.join(q['float']) or 'none'}; activation ranges "
            f"watched for {q['calibration_steps']} steps, fixed from step {q['observers_frozen_at']}, BatchNorm statistics from step "
            f"{q['bn_frozen_at']} of {q['steps']}" + ("; convolutions' biases rounded onto onnxruntime's int32 grid" if q["bias"] else ""))


def ship(model: nn.Module, q: dict, settings: dict) -> tuple[dict, dict]:
    """(the plain architecture's state dict, its weights on their grid; the "qat" entry of student.json)."""
    from lcdistill.quantize.prepare import bake

    weights, activations = bake(model)
    return weights, {"scheme": "int8", "weights": f"{weights_text(q['weight_bits'], q.get('weight_range', 'max'))}, symmetric, BatchNorm folded, baked into the weights",
                     "weight_bits": q["weight_bits"], "weight_range": q.get("weight_range", "max"), "activations": activations, "bias": q["bias"], "float": q["float"], "settings": settings}
