"""Recipes: load a YAML recipe, merge overrides, validate keys, save the resolved result.

A recipe is a nested dict. default_recipe() lists every key that exists (the core keys
here plus each method term's own section); a recipe or a
`--set a.b=c` override may only name keys found here (except inside the
free-form mappings in FREE_FORM).
"""

from __future__ import annotations

import copy
import functools
import difflib
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lcdistill import methods, prune, tasks
from lcdistill.checkpoint import atomic_write_text
from lcdistill.errors import UserError
from lcdistill.specs import split_source

# The core keys; default_recipe() adds the method terms' sections (methods.sections()), and a run
# lays its task's own defaults (Task.recipe_defaults) over them, under the user's settings.
CORE: dict[str, Any] = {
    "task": "auto",  # auto (from the data layout) | a task name (`lcdistill methods` lists them)
    "student": {
        "source": "auto",  # timm | tv | auto (timm first, then torchvision)
        "name": None,
        "kwargs": {},  # passed to the model constructor (drop_rate, width_mult, ...)
        "pretrained": False,  # start the student from hub weights
        "weights": None,  # or from a local .safetensors / .pth file
        "init": None,  # or from what fits of a run folder / weights file of another label set or task (--init)
    },
    "method": "london",  # ce | kd | london | terms joined by '+' (see `lcdistill methods`)
    "loss": {
        "ce": 1.0,  # weight of the task's supervised loss
        "label_smoothing": 0.0,
    },
    "schedule": {
        "epochs": 10,
        "batch_size": 64,
        "optimizer": "sgd",  # any timm create_optimizer_v2 name
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 5e-5,
        "scheduler": "cosine",  # any timm create_scheduler_v2 name
        "warmup_epochs": 0,
        "min_lr": 0.0,
        "max_grad_norm": None,
    },
    "data": {
        "input_size": None,  # square side; default: teacher run's size, else the student's
        "crop_pct": None,  # eval centre-crop fraction; default: teacher run's, else the student's
        "workers": 2,
        "scale": [0.08, 1.0],  # RandomResizedCrop area range
        "ratio": [0.75, 1.3333333333333333],
        "hflip": 0.5,
        "color_jitter": 0.0,
        "auto_augment": None,  # timm string, e.g. rand-m9-mstd0.5
        "skip_bad_images": False,
        "gpu_decode": "auto",  # decode + crop/flip JPEGs on the GPU: auto (CUDA and all files JPEG) | true | false
    },
    "qat": {  # quantization-aware training (--quantize int8 on compress and train): lcdistill/quantize/
        "mode": "none",  # none | int8: train the student as onnxruntime's int8 export will run it
        "weight_bits": 8,  # 8 (int8 weights, 7-bit range) | 4 (int4 weights: onnxruntime dequantizes them to float convolutions)
        "weight_range": "auto",  # where each channel's weight grid ends: max (max |w|) | learnt (a clipping share trained with the weights) | auto (learnt at 4 bits)
        "calibration_steps": 20,  # first steps: activation ranges watched, not yet quantized
        "freeze_observers_at": 0.5,  # share of the run after which the activation ranges stay fixed
        "freeze_bn_at": 0.75,  # share of the run after which BatchNorm statistics stay fixed
        "observer_momentum": 0.1,  # moving average of each activation's min / max
    },
    "prune": {  # --student prune:R: the teacher cut to at most R of its FLOPs, then distilled (lcdistill/prune.py)
        "importance": "magnitude",  # the L2 norm of each channel group's weights: needs no data, the same cut on every re-run
        "steps": 100,  # each step removes 1/steps of every layer's channels, until the FLOPs are at most R
        "max_ratio": 0.9,  # no layer loses more than this share of its channels
        "round_to": 8,  # widths stay multiples of this (null: any width; a model with GroupNorm layers to narrow uses null)
        "keep": [],  # module paths kept whole, besides the task's output layers
        "connectors": "random",  # random | select: feature terms' 1x1 connectors start as the selection of the teacher's kept channels
    },
    "train": {
        "device": "auto",  # auto | cpu | cuda
        "seed": 0,
        "amp_dtype": "auto",  # auto (bf16 on cuda, fp32 on cpu) | bfloat16 | float16 | float32
        "channels_last": "auto",  # auto (on for cuda) | true | false
        "compile": False,
        "ema": False,
        "ema_decay": 0.999,
        "sync_bn": False,
        "checkpoint_every": 0,  # also checkpoint every N steps (0: only at epoch ends)
        "deterministic": False,
        "log_every": 10,
    },
}



@functools.cache
def _defaults() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in CORE.items():
        out[key] = copy.deepcopy(value)
        if key == "loss":  # the terms' sections read best right after the loss weights
            out.update(methods.sections())
    return out


def default_recipe() -> dict[str, Any]:
    """Every key a recipe may set, with its default."""
    return copy.deepcopy(_defaults())


def __getattr__(name: str):
    if name == "DEFAULTS":  # a fresh copy each time: no caller can change the defaults
        return default_recipe()
    raise AttributeError(name)


# Mappings whose keys are the user's own (model kwargs), not recipe keys.
FREE_FORM = {("student", "kwargs")}


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-3 and 5E-5 as floats (YAML 1.1 wants a dot: 1.0e-3)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def recipe_dirs() -> list[Path]:
    """Where shipped recipes live: inside the package when installed, the repo's recipes/ when editable."""
    return [Path(str(resources.files("lcdistill.recipes")))]


def list_recipes() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in recipe_dirs():
        for path in sorted(folder.glob("*.yaml")):
            found.setdefault(path.stem, path)
    return found


def deep_merge(base: dict, over: dict, path: tuple = ()) -> dict:
    """Merge `over` into a copy of `base`, refusing keys that base does not have."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        here = path + (key,)
        if path in FREE_FORM:
            out[key] = copy.deepcopy(value)
            continue
        if key not in base:
            where = ".".join(path) or "the recipe's top level"
            valid = ", ".join(sorted(base))
            close = difflib.get_close_matches(str(key), list(base), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(
                f"unknown recipe key '{'.'.join(map(str, here))}'{hint}",
                f"valid keys in {where}: {valid}",
            )
        if isinstance(base[key], dict) and here not in FREE_FORM:
            if not isinstance(value, dict):
                raise UserError(f"recipe key '{'.'.join(here)}' must be a mapping", f"its keys are: {', '.join(sorted(base[key]))}")
            out[key] = deep_merge(base[key], value, here)
        elif here in FREE_FORM and isinstance(base[key], dict) and isinstance(value, dict):
            # a later layer adds to (or overrides single keys of) the user's own mapping
            out[key] = deep_merge(base[key], value, here)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> dict:
    """'a.b=c' -> {'a': {'b': c}} with c parsed as YAML (numbers, lists, null...)."""
    if "=" not in text:
        raise UserError(f"--set '{text}' is not KEY=VALUE", "write it like --set kd.temperature=2")
    key, raw = text.split("=", 1)
    value = load_yaml(raw) if raw.strip() else None
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def read_yaml(path: Path) -> dict:
    try:
        data = load_yaml(path.read_text()) or {}
    except FileNotFoundError:
        raise UserError(f"recipe file {path} not found", "pass an existing .yaml file or a shipped recipe name (see `lcdistill recipes`)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"recipe file {path} cannot be read ({type(e).__name__})", "pass a readable .yaml file") from None
    except yaml.YAMLError as e:
        raise UserError(f"recipe {path} is not valid YAML ({str(e).splitlines()[0]})", "fix the file's syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a YAML mapping", "see recipes/mobilenetv2.yaml for the layout")
    return data


def resolve_student(spec: str | None, recipe_file: str | None) -> dict:
    """The student recipe named by --student / --recipe: a shipped recipe, a file, or a bare model name."""
    if recipe_file:
        path = Path(recipe_file)
        if not path.is_file():
            raise UserError(f"recipe file {recipe_file} not found", "pass an existing .yaml file or a shipped recipe name (see `lcdistill recipes`)")
        data = read_yaml(path)
        if spec:
            data.setdefault("student", {})["name"] = spec
        return data
    if spec is None:
        raise UserError("no student given", "pass --student NAME (a recipe from `lcdistill recipes` or a model name)")
    if Path(spec).is_dir():  # a run folder: its student, trained further (a quantization-aware fine-tune)
        return {"student": {"source": "auto", "name": spec}}
    if spec.endswith((".yaml", ".yml")) or os.sep in spec:
        if not Path(spec).is_file():
            raise UserError(f"recipe file {spec} not found", "pass an existing .yaml file or a shipped recipe name (see `lcdistill recipes`)")
        return read_yaml(Path(spec))
    shipped = list_recipes()
    if spec in shipped:
        return read_yaml(shipped[spec])
    source, name = split_source(spec)
    return {"student": {"source": source, "name": name}}


def build(layers: list[dict], task_defaults: dict | None = None) -> dict:
    """The defaults (with a task's own laid over them) merged with each layer in turn (recipe file, CLI
    flags, --set overrides)."""
    recipe = default_recipe()
    for layer in [task_defaults or {}, *layers]:
        recipe = deep_merge(recipe, layer)
    validate(recipe)
    return recipe


def validate(recipe: dict) -> None:
    methods.validate(recipe)
    if recipe["task"] != "auto":
        tasks.get(recipe["task"])
    if not recipe["student"]["name"]:
        raise UserError("the recipe names no student model", "set student.name or pass --student NAME")
    sched = recipe["schedule"]
    for key in ("epochs", "batch_size"):
        if not isinstance(sched[key], int) or sched[key] < 1:
            raise UserError(f"schedule.{key} must be a positive integer, got {sched[key]!r}", f"pass --set schedule.{key}=N")
    if not isinstance(sched["lr"], (int, float)) or sched["lr"] <= 0:
        raise UserError(f"schedule.lr must be a positive number, got {sched['lr']!r}", "pass --lr X")
    prune.check(recipe["student"], recipe["prune"])
    qat = recipe["qat"]
    if qat["mode"] not in ("none", "int8"):
        raise UserError(f"unknown qat.mode {qat['mode']!r} (--quantize)", "choose none or int8")
    if qat["weight_bits"] not in (8, 4) or isinstance(qat["weight_bits"], bool):
        raise UserError(f"qat.weight_bits must be 8 or 4 (the weight widths onnxruntime's quantizer writes), got {qat['weight_bits']!r}", "pass --set qat.weight_bits=8")
    if qat["weight_range"] not in ("auto", "max", "learnt"):
        raise UserError(f"unknown qat.weight_range {qat['weight_range']!r}", "choose auto, max or learnt")
    for key in ("freeze_observers_at", "freeze_bn_at", "observer_momentum"):
        if not isinstance(qat[key], (int, float)) or not 0 <= qat[key] <= 1:
            raise UserError(f"qat.{key} must be a number from 0 to 1, got {qat[key]!r}", f"pass --set qat.{key}=0.5")
    if not isinstance(qat["calibration_steps"], int) or qat["calibration_steps"] < 0:
        raise UserError(f"qat.calibration_steps must be a whole number >= 0, got {qat['calibration_steps']!r}", "pass --set qat.calibration_steps=20")
    if qat["mode"] != "none" and recipe["train"]["compile"]:
        raise UserError("quantization-aware training does not run under torch.compile here", "drop --torchcompile with --quantize int8")
    if recipe["data"]["gpu_decode"] not in ("auto", True, False):
        raise UserError(f"unknown data.gpu_decode {recipe['data']['gpu_decode']!r}", "choose auto, true or false")
    if recipe["train"]["amp_dtype"] not in ("auto", "bfloat16", "float16", "float32"):
        raise UserError(f"unknown train.amp_dtype '{recipe['train']['amp_dtype']}'", "choose auto, bfloat16, float16 or float32")


def save(recipe: dict, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(recipe, sort_keys=False))
