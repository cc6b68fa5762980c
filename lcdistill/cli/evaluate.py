"""`lcdistill eval`: the task metric, size and speed of a run, its teacher and its exported files, side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from lcdistill.cli.common import DataOpt, EvalBatchOpt, EvalDeviceOpt, JsonObjectOpt, console_for, need_data, user_errors
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
):
    """The task's metric (top-1/top-5, mIoU), params, FLOPs and latency; teacher beside student when the run knows its teacher, exported files beside both."""
    from lcdistill import artifacts, evaluate, models
    from lcdistill.data import eval_loader
    from lcdistill.train import eval_runtime

    need_data(data)
    target = targets[0]
    runtime = eval_runtime(device)
    student = artifacts.identify(target)
    meta, task = student.meta, student.task
    if exports is not None and not Path(exports).is_dir():
        raise UserError(f"--exports {exports} is not a folder", "pass the --out folder of `lcdistill export`")
    extras = [artifacts.identify(f) for f in targets[1:]]
    named = {a.path.resolve() for a in extras}
    extras += [a for a in artifacts.exports_beside(student, exports) if a.path.resolve() not in named]
    splits = task.scan(data)
    for t in [student] + extras:
        if splits.classes != t.meta["classes"]:
            raise UserError(f"the data's classes {splits.classes[:5]}... differ from {t.file}'s {t.meta['classes'][:5]}...", "evaluate on the data the model was trained for")
    loader = eval_loader(task.eval_dataset(splits.val, meta), batch_size, workers)
    results = {"student": evaluate.measure(student, loader, runtime.device, batch_size, meta["mean"], meta["std"])}
    teacher_entry = meta.get("teacher")
    if teacher and teacher_entry:
        try:
            t = models.rebuild(teacher_entry["spec"], meta["num_classes"])
        except UserError as e:
            console_for(True).print(f"[yellow]teacher skipped: {e.line()}[/]")
        else:
            t_meta = {**meta, **t.data_config, "input_size": meta["input_size"]}
            t_target = artifacts.InMemory(t.model.eval(), t_meta, task)
            results["teacher"] = evaluate.measure(t_target, loader, runtime.device, batch_size, t.data_config["mean"], t.data_config["std"])
            results["teacher"]["model"] = t.origin
    results["student"]["model"] = target
    for extra in extras:  # each file fed by its own metadata, as a deployment would
        m = extra.meta
        own_loader = eval_loader(task.eval_dataset(splits.val, m), batch_size, workers)
        key = extra.role if extra.role not in results else f"{extra.role} {extra.path.name}"
        results[key] = {**evaluate.measure(extra, own_loader, runtime.device, batch_size, m["mean"], m["std"]), "model": str(extra.file)}
    if save:
        from lcdistill.checkpoint import atomic_write_json

        atomic_write_json(Path(save), results)
    if json_out:
        print(json.dumps(results))
        return
    metric = task.metric(len(meta["classes"]))
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
