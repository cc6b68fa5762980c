"""`lcdistill eval`: lcdistill.evaluate of the flags, rendered as a table (or JSON)."""

from __future__ import annotations

import json
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from lcdistill import api
from lcdistill.cli.common import DataOpt, EvalBatchOpt, EvalDeviceOpt, JsonObjectOpt, console_for, user_errors
from lcdistill.defaults import FGSM_EPSILONS, NOISE_SIGMAS


@user_errors
def eval_(
    targets: List[str] = typer.Argument(..., help="Run folder, student .safetensors, or exported .onnx / .pt; further files are measured beside it."),
    data: Optional[str] = DataOpt,
    device: str = EvalDeviceOpt,
    batch_size: int = EvalBatchOpt,
    workers: int = typer.Option(2, "--workers", "-j"),
    teacher: bool = typer.Option(True, "--teacher/--no-teacher", help="Also measure the run's teacher."),
    exports: Optional[str] = typer.Option(None, "--exports", help="Folder of `lcdistill export` files to measure beside the student (default: the run folder)."),
    json_out: bool = JsonObjectOpt,
    save: Optional[str] = typer.Option(None, "--save", help="Also write that JSON object to this file."),
    robust: bool = typer.Option(False, "--robustness", help="Also measure the metric under seeded Gaussian noise and one-step FGSM (\"robustness\" per model in --json)."),
    noise: Optional[str] = typer.Option(None, "--noise", help=f"Noise sigmas in [0, 1] pixel units, comma-separated; implies --robustness (default {','.join(f'{v:g}' for v in NOISE_SIGMAS)}; '' for none)."),
    fgsm: Optional[str] = typer.Option(None, "--fgsm", help=f"FGSM epsilons in [0, 1] pixel units (2/255 works), comma-separated; implies --robustness (default {','.join(f'{e * 255:g}/255' for e in FGSM_EPSILONS)}; '' for none)."),
):
    """The task's metric (top-1/top-5, mIoU), params, FLOPs and latency; teacher beside student when the run knows its teacher, exported files beside both."""
    result = api.evaluate(targets[0], *targets[1:], data=data, device=device, batch_size=batch_size, workers=workers, teacher=teacher,
                          exports=exports, robustness=robust, noise=noise, fgsm=fgsm, save=save)
    for note in result.notes:
        console_for(True).print(f"[yellow]{escape(note)}[/]")
    if json_out:
        print(json.dumps(result.rows))
        return
    results, metric_columns = result.rows, result.columns
    table = Table(title=f"{targets[0]} on {data}/val ({result.images} images)")
    for col in ("", "runs on", *(h for h, _ in metric_columns), "params", "GFLOPs", "file MB", "ms @1", f"ms @{batch_size}", "img/s"):
        table.add_column(col, justify="left" if col in ("", "runs on") else "right")
    for role, r in results.items():
        fmt = lambda v, f: f.format(v) if v is not None else "-"  # noqa: E731
        runs_on = {"onnx": "onnxruntime"}.get(r["kind"], r["kind"])
        where = f"{runs_on} {r['device']}" + (f" x{r['threads']}" if r.get("threads") else "")
        table.add_row(role, where, *(f"{r[key]:.2f}" for _, key in metric_columns), fmt(r.get("params") and r["params"] / 1e6, "{:.2f}M"),
                      fmt(r.get("flops") and r["flops"] / 1e9, "{:.3f}"), fmt(r.get("file_bytes") and r["file_bytes"] / 1e6, "{:.2f}"),
                      f"{r['latency_ms_b1']:.2f}", f"{r['latency_ms_batch']:.2f}", f"{r['throughput_img_s']:,.0f}")
    console_for().print(table)
    console_for().print("latency: median of 10 timed calls after 3 warm-up calls, random input; 'xN': CPU threads")
    if any("robustness" in r for r in results.values()):
        from lcdistill.robustness import NOTE

        console_for().print(robustness_table(results, result.best_header))
        console_for().print(NOTE)


def robustness_table(results: dict, header: str) -> Table:
    """One row per model: the metric clean, under each noise sigma and each FGSM epsilon ('-': not measured)."""
    from lcdistill.robustness import columns

    rows = {role: r["robustness"] for role, r in results.items()}
    levels = columns(rows.values())
    table = Table(title=f"{header} under input perturbation ([0, 1] pixel units)")
    for col in ("", "clean", *(label for _, _, label in levels)):
        table.add_column(col, justify="left" if col == "" else "right")
    for role, r in rows.items():
        table.add_row(role, f"{r['clean']:.2f}", *(f"{r[kind][k]:.2f}" if k in r.get(kind, {}) else "-" for kind, k, _ in levels))
    return table
