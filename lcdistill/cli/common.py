"""What every command shares: user errors as one line + exit 2, consoles, recipe overrides, options."""

from __future__ import annotations

import functools
import sys

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
DataOpt = typer.Option(None, "--data", help="Folder with train/ and val/ ImageFolders.")
EpochsOpt = typer.Option(None, "--epochs", help="Training epochs (schedule.epochs).")
BatchOpt = typer.Option(None, "--batch-size", "-b", help="Global batch size, split over torchrun processes.")
LrOpt = typer.Option(None, "--lr", help="Peak learning rate for the global batch.")
OutOpt = typer.Option(None, "--out", help="Run folder (default runs/<student>-<method>-<time>).")
DeviceOpt = typer.Option(None, "--device", help="auto | cpu | cuda")
SeedOpt = typer.Option(None, "--seed")
SetOpt = typer.Option(None, "--set", help="Override any recipe key: --set kd.temperature=2 (repeatable).")
InputSizeOpt = typer.Option(None, "--input-size", help="Square input side in pixels (data.input_size).")
AmpOpt = typer.Option(None, "--amp-dtype", help="auto | bfloat16 | float16 | float32")
ChannelsLastOpt = typer.Option(None, "--channels-last/--no-channels-last", help="NHWC memory format (default on CUDA).")
CompileOpt = typer.Option(None, "--torchcompile/--no-torchcompile", help="torch.compile student and teacher.")
EmaOpt = typer.Option(None, "--model-ema/--no-model-ema", help="Keep an EMA of the student and ship it.")
WorkersOpt = typer.Option(None, "--workers", "-j", help="Data loader processes per training process.")
CkptOpt = typer.Option(None, "--checkpoint-every", help="Also checkpoint every N steps.")
ClipOpt = typer.Option(None, "--max-grad-norm", help="Clip the gradient norm.")
TaskOpt = typer.Option(None, "--task", help="auto | classification | segmentation (auto: from the data layout).")
SkipBadOpt = typer.Option(None, "--skip-bad-images/--no-skip-bad-images", help="Skip unreadable images instead of stopping.")
# measuring commands (eval, lipschitz, report)
EvalDeviceOpt = typer.Option("auto", "--device")
EvalBatchOpt = typer.Option(64, "--batch-size", "-b")
JsonObjectOpt = typer.Option(False, "--json", help="Print one JSON object on stdout.")


def common_flags(epochs, batch_size, lr, device, seed, input_size, amp_dtype, channels_last, torchcompile, model_ema, workers, checkpoint_every, max_grad_norm, skip_bad_images, task) -> dict:
    """The training options compress and train share, keyed by the recipe entry each sets."""
    return {
        "schedule.epochs": epochs, "schedule.batch_size": batch_size, "schedule.lr": lr, "schedule.max_grad_norm": max_grad_norm,
        "train.device": device, "train.seed": seed, "train.amp_dtype": amp_dtype, "train.channels_last": channels_last,
        "train.compile": torchcompile, "train.ema": model_ema, "train.checkpoint_every": checkpoint_every,
        "data.input_size": input_size, "data.workers": workers, "data.skip_bad_images": skip_bad_images, "task": task,
    }
