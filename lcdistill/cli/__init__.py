"""The lcdistill command line. Parses flags, turns user errors into one line + exit 2, calls the rest.

One module per command group; each imports its heavy modules (torch, timm) inside the command,
so `lcdistill --help` stays fast.
"""

from __future__ import annotations

import signal
import sys

import typer

from lcdistill.cli import data, evaluate, export, inspect, students, train
from lcdistill.cli.common import fail

app = typer.Typer(
    help="Compress pretrained vision models (image classifiers, segmentation models, object detectors) with Lipschitz-continuity-guided knowledge distillation (LONDON).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data.app, name="data")
# registration order is the order `lcdistill --help` lists them in
app.command()(train.compress)
app.command()(train.train)
app.command("eval")(evaluate.eval_)
app.command()(export.export)
app.command()(export.push)
app.command()(students.students)
app.command("recipes")(inspect.list_recipes)
app.command("methods")(inspect.list_methods)
app.command()(inspect.lipschitz)
app.command()(inspect.report)


class Terminated(BaseException):
    """SIGTERM outside training (the trainer checkpoints on its own): unwinds like Ctrl-C, so
    half-made run folders are removed on the way out."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main() -> None:
    """Entry point: usage errors too become one line on stderr and exit 2."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        code = app(standalone_mode=False)
    except Terminated:
        typer.echo("error: terminated by SIGTERM (nothing half-written is left behind); run the command again", err=True)
        sys.exit(143)
    except Exception as e:  # click's and typer's own (vendored) usage errors share no importable base
        kind = type(e).__name__
        if kind == "NoArgsIsHelpError":
            e.show()
            sys.exit(0)
        if kind == "Abort":
            fail("interrupted", 130)
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
            raise
        ctx = getattr(e, "ctx", None)
        where = f"lcdistill {ctx.info_name}" if ctx is not None and ctx.parent is not None else "lcdistill"
        typer.echo(f"error: {e.format_message()} (see `{where} --help`)", err=True)
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
