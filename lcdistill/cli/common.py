"""What every command shares: user errors as one line + exit 2, consoles, recipe overrides, options
(the training options `compress` and `train` share, as one TrainingOptions)."""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass, field
from typing import List, Optional

import typer
from rich.console import Console

from lcdistill.errors import UserError


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def user_errors(command):
    """One clear line on stderr and exit 2 (or the run's own code) instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as e:
            fail(e.line(), getattr(e, "exit_code", 2))
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper


def need_data(data: str | None) -> str:
    if data is None:
        raise UserError("--data is missing", "pass --data DIR holding train/ and val/ (e.g. `lcdistill data digits data/digits`)")
    return data


def overrides(flags: dict, sets: list[str] | None) -> list[dict]:
    """Recipe layers from CLI flags (only those given) and --set KEY=VALUE pairs."""
    from lcdistill.recipe import parse_override

    layer: dict = {}
    for dotted, value in flags.items():
        if value is None:
            continue
        node = layer
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return [layer] + [parse_override(s) for s in sets or []]


def console_for(json_out: bool = False) -> Console:
    # Logs and pipes get 120 columns instead of rich's 80, so tables keep whole names.
    stream = sys.stderr if json_out else sys.stdout
    return Console(stderr=json_out, highlight=False, width=None if stream.isatty() else 120)


# ---- shared options (typer reads a default Option object afresh for each command) ---------
DataOpt = typer.Option(None, "--data", help="Data folder: train/ and val/ in a layout a task reads (class folders, VOC, images + masks).")
OutOpt = typer.Option(None, "--out", help="Run folder (default runs/<student>-<method>-<time>).")
SetOpt = typer.Option(None, "--set", help="Override any recipe key: --set kd.temperature=2 (repeatable).")
# measuring commands (eval, lipschitz, report)
EvalDeviceOpt = typer.Option("auto", "--device")
EvalBatchOpt = typer.Option(64, "--batch-size", "-b")
JsonObjectOpt = typer.Option(False, "--json", help="Print one JSON object on stdout.")

# The training options `compress` and `train` share: parameter name -> (recipe key it sets, its type, the option).
TRAINING: dict[str, tuple[str, type, object]] = {
    "epochs": ("schedule.epochs", int, typer.Option(None, "--epochs", help="Training epochs (schedule.epochs).")),
    "batch_size": ("schedule.batch_size", int, typer.Option(None, "--batch-size", "-b", help="Global batch size, split over torchrun processes.")),
    "lr": ("schedule.lr", float, typer.Option(None, "--lr", help="Peak learning rate for the global batch.")),
    "device": ("train.device", str, typer.Option(None, "--device", help="auto | cpu | cuda")),
    "seed": ("train.seed", int, typer.Option(None, "--seed")),
    "input_size": ("data.input_size", int, typer.Option(None, "--input-size", help="Square input side in pixels (data.input_size).")),
    "amp_dtype": ("train.amp_dtype", str, typer.Option(None, "--amp-dtype", help="auto | bfloat16 | float16 | float32")),
    "channels_last": ("train.channels_last", bool, typer.Option(None, "--channels-last/--no-channels-last", help="NHWC memory format (default on CUDA).")),
    "torchcompile": ("train.compile", bool, typer.Option(None, "--torchcompile/--no-torchcompile", help="torch.compile student and teacher.")),
    "model_ema": ("train.ema", bool, typer.Option(None, "--model-ema/--no-model-ema", help="Keep an EMA of the student and ship it.")),
    "workers": ("data.workers", int, typer.Option(None, "--workers", "-j", help="Data loader processes per training process.")),
    "checkpoint_every": ("train.checkpoint_every", int, typer.Option(None, "--checkpoint-every", help="Also checkpoint every N steps.")),
    "max_grad_norm": ("schedule.max_grad_norm", float, typer.Option(None, "--max-grad-norm", help="Clip the gradient norm.")),
    "skip_bad_images": ("data.skip_bad_images", bool, typer.Option(None, "--skip-bad-images/--no-skip-bad-images", help="Skip unreadable images instead of stopping.")),
    "init": ("student.init", str, typer.Option(None, "--init", help="Start the model trained from what fits of a run folder or weights file of another label set or task (a classifier's backbone, a COCO detector); its class layers fresh.")),
    "quantize": ("qat.mode", str, typer.Option(None, "--quantize", help="none | int8: train the student quantization-aware, as onnxruntime's int8 will run it (qat.* settings); `export --quantize int8` then uses what it learnt.")),
    "task": ("task", str, typer.Option(None, "--task", help="auto | classification | segmentation | detection (auto: from the data layout and the models named).")),
}


@dataclass
class TrainingOptions:
    """The shared training options as given (None: not given), and the recipe layers they make."""

    values: dict[str, object]
    sets: list[str] = field(default_factory=list)  # --set KEY=VALUE

    def given(self) -> list[str]:
        """The flags given, as typed (for --resume, which takes none)."""
        named = [TRAINING[k][2].param_decls[0].split("/")[0] for k, v in self.values.items() if v is not None]
        return named + (["--set"] if self.sets else [])

    def layers(self, extra: dict | None = None) -> list[dict]:
        """Recipe layers: the flags given (and extra recipe keys), then each --set."""
        flags = {TRAINING[k][0]: v for k, v in self.values.items()}
        return overrides({**flags, **(extra or {})}, self.sets)


def training_options(command):
    """Add the shared training options (and --set) to a command; it receives them as `options`."""
    sig = inspect.signature(command)
    own = [p for p in sig.parameters.values() if p.name != "options"]
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=Optional[kind])
              for name, (_, kind, opt) in TRAINING.items()]
    shared.append(inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, default=SetOpt, annotation=Optional[List[str]]))

    @functools.wraps(command)
    def wrapper(**kwargs):
        options = TrainingOptions({k: kwargs.pop(k) for k in TRAINING}, list(kwargs.pop("set_") or []))
        return command(options=options, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=own + shared)
    return wrapper
