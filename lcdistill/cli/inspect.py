"""`lcdistill recipes`, `methods`, `lipschitz` and `report`: look at recipes, models and finished runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from lcdistill.cli.common import DataOpt, EvalBatchOpt, EvalDeviceOpt, JsonObjectOpt, console_for, need_data, user_errors
from lcdistill.errors import UserError
from lcdistill.runfolder import RunFolder


@user_errors
def list_recipes():
    """List the shipped student recipes."""
    from lcdistill import models, recipe as recipes, tasks

    table = Table(title="shipped recipes (use --student NAME)")
    for col in ("name", "model", "method", "epochs", "params (classes)"):
        table.add_column(col, no_wrap=col in ("name", "model"))
    for name, path in recipes.list_recipes().items():
        raw = recipes.read_yaml(path)
        own = raw.get("task", "auto")
        r = recipes.build([raw], tasks.get(own).recipe_defaults if own != "auto" else None)  # a method left out is the task's default
        s = r["student"]
        spec = s["name"] if s["source"] == "auto" else f"{s['source']}:{s['name']}"
        found = models.parse(spec, r["task"] if r["task"] != "auto" else None)
        if found is None:
            raise models.families()[0].unknown(spec)
        family, arch = found
        n = models.params(family.build({**arch, "kwargs": s["kwargs"]}, family.count_classes))  # at the classes its family counts (ImageNet's, VOC's)
        table.add_row(name, family.spec_of(arch), r["method"], str(r["schedule"]["epochs"]), f"{n / 1e6:.2f}M ({family.count_classes})")
    console_for().print(table)


@user_errors
def lipschitz(
    target: str = typer.Argument(..., help="Run folder, student .safetensors, or model name."),
    data: Optional[str] = DataOpt,
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher to compare with (default: the run's own teacher)."),
    teacher_weights: Optional[str] = typer.Option(None, "--teacher-weights"),
    no_teacher: bool = typer.Option(False, "--no-teacher", help="Report the model alone."),
    batches: int = typer.Option(4, "--batches", help="Val batches to average over."),
    batch_size: int = EvalBatchOpt,
    min_stride: int = typer.Option(4, "--min-stride"),
    device: str = EvalDeviceOpt,
    json_out: bool = JsonObjectOpt,
):
    """Per-stage transmitting-matrix spectral norms (model, teacher, gap) and the per-layer upper bound."""
    from lcdistill.lipschitz_report import for_target
    from lcdistill.training import eval_runtime

    need_data(data)
    result = for_target(target, data, eval_runtime(device).device, teacher, teacher_weights, no_teacher, batches, batch_size, min_stride)
    connected = "connected" in result["stages"][0]
    if json_out:
        print(json.dumps(result))
        return
    table = Table(title=f"transmitting-matrix spectral norms on {batches} random batches of {data}/val")
    columns = ("stages", "model", "teacher", "gap") + (("connected", "connected gap") if connected else ())
    for col in columns:
        table.add_column(col, justify="left" if col == "stages" else "right")
    for row in result["stages"]:
        f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        cells = [f(row["model"]), f(row["teacher"]), f(row["gap"])] + ([f(row["connected"]), f(row["connected_gap"])] if connected else [])
        table.add_row(f"{row['name']}  ({' -> '.join(row['model_stages'])})", *cells)
    console = console_for()
    console.print(table)
    if connected:
        console.print("connected: the student's maps through the run's 1x1 conv + BN connectors, the quantity the Lipschitz term matches")
        for row in result["stages"]:
            if row.get("connected_note"):
                console.print(f"connected {row['name']}: -, {row['connected_note']}")
    ub = result["upper_bound"]
    console.print(f"per-layer upper bound (product of exact layer norms, BN folded): {ub:.3e}" if ub else "per-layer upper bound: 0 or overflow")


@user_errors
def report(
    run: str = typer.Argument(..., help="Run folder."),
    data: Optional[str] = typer.Option(None, "--data", help="Compute the Lipschitz chart on DIR/val when RUN/lipschitz.json is missing (saved there)."),
    eval_file: Optional[str] = typer.Option(None, "--eval", help="`lcdistill eval --save` output for the table (default: RUN/eval.json)."),
    device: str = EvalDeviceOpt,
):
    """RUN/report.html (self-contained) and RUN/plots/*.png: training curves, teacher/student/export table, Lipschitz chart.

    The table comes from RUN/eval.json (`lcdistill eval RUN --data DIR --save RUN/eval.json`) when present."""
    from lcdistill import report as reports

    reports.pyplot()  # fail before any work when matplotlib is missing
    path = Path(run)
    if eval_file is not None and not Path(eval_file).is_file():
        raise UserError(f"--eval {eval_file} not found", "write it with `lcdistill eval RUN --data DIR --save FILE`")
    lip = None
    folder = RunFolder(path)
    if data and not folder.lipschitz.is_file() and folder.finished():
        from lcdistill.checkpoint import atomic_write_json
        from lcdistill.lipschitz_report import for_target
        from lcdistill.training import eval_runtime

        try:
            lip = for_target(run, data, eval_runtime(device).device)
        except UserError as e:  # an architecture without stride-separated stages: the report goes on without the chart
            raise UserError(e.message, "this architecture has too few stride-separated stages for the chart") from None
        atomic_write_json(folder.lipschitz, lip)
    evaluation = reports.read_json(Path(eval_file)) if eval_file else None
    written = reports.write(path, evaluation=evaluation, lipschitz=lip)
    typer.echo(f"report: {written['html']}")
    for plot in written["plots"]:
        typer.echo(f"plot: {plot}")


@user_errors
def list_methods():
    """List the method terms (join them with '+': --method ofd+london) and the named methods."""
    from lcdistill import methods

    table = Table(title="method terms (a method is ce plus terms joined by '+'; at most one of " + ", ".join(methods.LOGIT_TERMS) + ")")
    for col in ("term", "what it does", "paper", "recipe section"):
        table.add_column(col, overflow="fold")
    for name, term in methods.TERMS.items():
        table.add_row(name, term.summary, term.paper, term.section)
    console = console_for()
    console.print(table)
    named = Table(title="named methods (--method NAME)")
    for col in ("name", "terms"):
        named.add_column(col)
    for name, terms in methods.describe_methods():
        named.add_row(name, terms)
    console.print(named)
    console.print("the paper's LONDON (Shang et al., ICCV 2021) is ce + ofd + london: --method ofd+london")
    for line in default_methods():
        console.print(line, highlight=False, soft_wrap=True)
    from lcdistill import tasks

    for name, task in tasks.TASKS.items():
        console.print(f"{name} takes: ce, {', '.join(methods.served(task))}", highlight=False, soft_wrap=True)


def default_methods() -> list[str]:
    """One line per task: the method a run gets when none is named, and why."""
    from lcdistill import recipe as recipes, tasks

    lines = []
    for name, task in tasks.TASKS.items():
        method = task.recipe_defaults.get("method", recipes.CORE["method"])
        reason = getattr(task, "default_method_reason", "") if "method" in task.recipe_defaults else "lcdistill's default: not measured for this task"
        lines.append(f"{name}'s default: {method}" + (f" ({reason})" if reason else ""))
    return lines
