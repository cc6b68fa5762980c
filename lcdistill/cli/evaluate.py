"""`lcdistill eval`: the task metric, size and speed of a run, its teacher and its exported files, side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from lcdistill.cli.common import DataOpt, EvalBatchOpt, EvalDeviceOpt, JsonObjectOpt, console_for, need_data, user_errors
from lcdistill.defaults import FGSM_EPSILONS, NOISE_SIGMAS
from lcdistill.errors import UserError


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
    from lcdistill import artifacts, measure, robustness
    from lcdistill.data import eval_loader
    from lcdistill.training import eval_runtime

    need_data(data)
    levels = robustness_levels(robust, noise, fgsm)  # bad numbers fail before any work
    target = targets[0]
    runtime = eval_runtime(device)
    student = artifacts.identify(target)
    meta, task = student.meta, student.task
    if exports is not None and not Path(exports).is_dir():
        raise UserError(f"--exports {exports} is not a folder", "pass the --out folder of `lcdistill export`")
    extras = [artifacts.identify(f) for f in targets[1:]]
    named = {a.path.resolve() for a in extras}
    extras += [a for a in artifacts.exports_beside(student, exports) if a.path.resolve() not in named]
    base = artifacts.base_run(student)  # a quantization-aware run: its starting run's fp32 and post-training int8 files beside
    based = [a for a in artifacts.exports_beside(base, None) if a.path.resolve() not in named] if base else []
    splits = task.scan(data)
    for t in [student] + extras + based:
        artifacts.check_classes(t, splits.classes)
    metric = task.metric(len(meta["classes"]))
    loader = eval_loader(task.eval_dataset(splits.val, meta), batch_size, workers)

    def measured(model, model_loader, name) -> dict:  # each model fed with its own mean/std
        result = {**measure.measure(model, model_loader, runtime.device, batch_size, model.meta["mean"], model.meta["std"]), "model": name}
        if levels is not None:
            result["robustness"] = robustness.measure(model, model_loader, runtime.device, *levels, clean=result[metric.best])
        return result

    results = {"student": measured(student, loader, target)}
    if teacher:
        try:
            t = artifacts.teacher_of(student)
        except UserError as e:
            console_for(True).print(f"[yellow]teacher skipped: {e.line()}[/]")
        else:
            if t is not None:
                results["teacher"] = measured(t, loader, t.origin)
    for extra in extras + based:  # each file fed by its own metadata, as a deployment would
        own_loader = eval_loader(task.eval_dataset(splits.val, extra.meta), batch_size, workers)
        key = f"base {extra.role}" if extra in based else extra.role
        key = key if key not in results else f"{key} {extra.path.name}"
        results[key] = measured(extra, own_loader, str(extra.file))
    if save:
        from lcdistill.checkpoint import atomic_write_json

        atomic_write_json(Path(save), results)
    if json_out:
        print(json.dumps(results))
        return
    table = Table(title=f"{target} on {data}/val ({results['student']['images']} images)")
    for col in ("", "runs on", *(h for h, _ in metric.columns), "params", "GFLOPs", "file MB", "ms @1", f"ms @{batch_size}", "img/s"):
        table.add_column(col, justify="left" if col in ("", "runs on") else "right")
    for role, r in results.items():
        fmt = lambda v, f: f.format(v) if v is not None else "-"  # noqa: E731
        runs_on = {"onnx": "onnxruntime"}.get(r["kind"], r["kind"])
        where = f"{runs_on} {r['device']}" + (f" x{r['threads']}" if r.get("threads") else "")
        table.add_row(role, where, *(f"{r[key]:.2f}" for _, key in metric.columns), fmt(r.get("params") and r["params"] / 1e6, "{:.2f}M"),
                      fmt(r.get("flops") and r["flops"] / 1e9, "{:.3f}"), fmt(r.get("file_bytes") and r["file_bytes"] / 1e6, "{:.2f}"),
                      f"{r['latency_ms_b1']:.2f}", f"{r['latency_ms_batch']:.2f}", f"{r['throughput_img_s']:,.0f}")
    console_for().print(table)
    console_for().print("latency: median of 10 timed calls after 3 warm-up calls, random input; 'xN': CPU threads")
    if levels is not None:
        console_for().print(robustness_table(results, metric))
        console_for().print(robustness.NOTE)


def robustness_levels(robust: bool, noise: str | None, fgsm: str | None):
    """(sigmas, epsilons) to measure, or None without --robustness (--noise or --fgsm imply it)."""
    from lcdistill.robustness import parse_levels

    if not robust and noise is None and fgsm is None:
        return None
    sigmas = parse_levels(noise, "--noise") if noise is not None else NOISE_SIGMAS
    epsilons = parse_levels(fgsm, "--fgsm") if fgsm is not None else FGSM_EPSILONS
    return sigmas, epsilons


def robustness_table(results: dict, metric) -> Table:
    """One row per model: the metric clean, under each noise sigma and each FGSM epsilon ('-': not measured)."""
    from lcdistill.robustness import columns

    header = metric.best_header
    rows = {role: r["robustness"] for role, r in results.items()}
    levels = columns(rows.values())
    table = Table(title=f"{header} under input perturbation ([0, 1] pixel units)")
    for col in ("", "clean", *(label for _, _, label in levels)):
        table.add_column(col, justify="left" if col == "" else "right")
    for role, r in rows.items():
        table.add_row(role, f"{r['clean']:.2f}", *(f"{r[kind][k]:.2f}" if k in r.get(kind, {}) else "-" for kind, k, _ in levels))
    return table
