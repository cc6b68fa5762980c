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

from lcdistill.api import need_data  # noqa: F401  (the commands' one check of --data)
from lcdistill.errors import UserError
from lcdistill.options import TRAINING as OPTIONS


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

# The training options `compress` and `train` share (lcdistill.options: the recipe key each sets, its flags, its help).
TRAINING: dict[str, tuple[type, object]] = {name: (o.kind, typer.Option(None, *o.flags, help=o.help)) for name, o in OPTIONS.items()}


@dataclass
class TrainingOptions:
    """The shared training options as given (None: not given), and the --set overrides: lcdistill.compress's and
    lcdistill.train's keyword arguments."""

    values: dict[str, object]
    sets: list[str] = field(default_factory=list)  # --set KEY=VALUE

    def keywords(self) -> dict:
        return {**self.values, "overrides": self.sets or None}


def training_options(command):
    """Add the shared training options (and --set) to a command; it receives them as `options`."""
    sig = inspect.signature(command)
    own = [p for p in sig.parameters.values() if p.name != "options"]
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=Optional[kind])
              for name, (kind, opt) in TRAINING.items()]
    shared.append(inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, default=SetOpt, annotation=Optional[List[str]]))

    @functools.wraps(command)
    def wrapper(**kwargs):
        options = TrainingOptions({k: kwargs.pop(k) for k in TRAINING}, list(kwargs.pop("set_") or []))
        return command(options=options, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=own + shared)
    return wrapper
