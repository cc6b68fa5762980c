"""`lcdistill students`: which student fits a latency budget, measured on this machine."""

from __future__ import annotations

import json
from typing import List, Optional

import typer
from rich.table import Table

from lcdistill.cli.common import DataOpt, JsonObjectOpt, console_for, need_data, user_errors
from lcdistill.errors import UserError


@user_errors
def students(
    data: Optional[str] = DataOpt,
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher (name or run folder) measured beside them for scale, with its prune:R cuts."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Square input side (default: the teacher run's, else near the training images' own size)."),
    max_latency_ms: Optional[float] = typer.Option(None, "--max-latency-ms", help="Latency budget at batch 1: candidates within it are marked."),
    runtime: str = typer.Option("onnxruntime", "--runtime", help="onnxruntime (each candidate exported to ONNX first) | torch (eager)."),
    model: Optional[List[str]] = typer.Option(None, "--model", help="Measure only these recipes / timm / torchvision names, or prune:R (the teacher cut to R of its FLOPs) (repeatable)."),
    repeats: int = typer.Option(20, "--repeats", help="Timed batch-1 calls per candidate (the median is shown)."),
    task_name: str = typer.Option("auto", "--task", help="auto | classification | segmentation | detection (auto: from the data layout and the models named)."),
    json_out: bool = JsonObjectOpt,
):
    """The shipped recipes and small models of the data's task: params, FLOPs and batch-1 latency here, fastest first."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lcdistill import guardrails, students as survey, tasks

    need_data(data)
    if runtime not in survey.RUNTIMES:
        raise UserError(f"unknown --runtime '{runtime}'", f"choose {' or '.join(survey.RUNTIMES)}")
    if input_size is not None and not 16 <= input_size <= 4096:
        raise UserError(f"--input-size {input_size} is out of range", "pass a side between 16 and 4096 pixels")
    if max_latency_ms is not None and max_latency_ms <= 0:
        raise UserError(f"--max-latency-ms {max_latency_ms:g} is not positive", "pass a budget in milliseconds, e.g. --max-latency-ms 5")
    if repeats < 1:
        raise UserError(f"--repeats {repeats} is below 1", "pass --repeats 20 or so")
    task = tasks.for_data(task_name, data, (*(model or []), teacher))
    splits = task.scan(data, check=False)
    cands = survey.candidates(model, task, teacher=bool(teacher))
    why = "--input-size"
    if input_size is None:
        teacher_meta = _run_meta(teacher)
        if teacher_meta:
            input_size, why = int(teacher_meta["input_size"][-1]), "the teacher run's input size"
        else:
            samples = getattr(splits.train, "samples", splits.train)
            input_size = survey.default_input_size(guardrails.median_side(guardrails.sample_paths(samples)))
            why = "near the training images' median side; --input-size to change"
    console = console_for(json_out)
    threads = torch.get_num_threads()
    total = len(cands) + (1 if teacher else 0) + repeats  # build/export each, then the timing rounds
    with Progress(TextColumn("measuring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[name]}"),
                  console=console_for(True), transient=True) as bar:
        job = bar.add_task("students", total=total, name="")
        seen = []

        def step(name: str) -> None:
            if seen:
                bar.advance(job)
            seen.append(name)
            bar.update(job, name="timing rounds" if name == "timing" else name)

        rows = survey.survey(task, splits.classes, input_size, runtime, cands, teacher, max_latency_ms, repeats, step)
        bar.advance(job)
    result = {"data": str(data), "classes": len(splits.classes), "input_size": input_size, "runtime": runtime, "threads": threads,
              "repeats": repeats, "max_latency_ms": max_latency_ms, "rows": survey.as_dicts(rows)}
    if json_out:
        print(json.dumps(result))
        return
    runs_on = "onnxruntime (exported ONNX)" if runtime == "onnxruntime" else "PyTorch eager"
    table = Table(title=f"{task.name} students for {len(splits.classes)} classes at {input_size}px ({why}), {runs_on}, batch 1, {threads} CPU thread(s)")
    for col in ("", "--student", "model", "params", "GFLOPs", "ms @1", *(("fits",) if max_latency_ms is not None else ())):
        table.add_column(col, justify="right" if col in ("params", "GFLOPs", "ms @1") else "left", no_wrap=col in ("--student", "model"))
    rank = 0
    for r in rows:
        rank += r.role == "student"
        fits = ("yes" if r.within_budget else "no") if max_latency_ms is not None else None
        if r.error:
            fits = "-" if fits is not None else None
        cells = ["teacher" if r.role == "teacher" else str(rank),
                 r.student if r.role == "student" else f"({r.student})", r.model,
                 f"{r.params / 1e6:.2f}M" if r.params is not None else "-", f"{r.flops / 1e9:.3f}" if r.flops is not None else "-",
                 f"{r.latency_ms:.2f}" if r.latency_ms is not None else "-"]
        table.add_row(*cells, *((fits,) if fits is not None else ()), style="bold" if r.within_budget else None)
    console.print(table)
    for r in rows:
        if r.error:
            console.print(f"{r.model}: not measured ({r.error})")
    budget = f"; within {max_latency_ms:g} ms: {sum(1 for r in rows if r.within_budget and r.role == 'student')} of them" if max_latency_ms is not None else ""
    console.print(f"median of {repeats} batch-1 calls after {survey.WARMUP} warm-up calls, timed in interleaved rounds, random weights and input{budget}. "
                  "Pass the --student column to `lcdistill compress`.")


def _run_meta(teacher: str | None) -> dict | None:
    from pathlib import Path

    from lcdistill import models

    if teacher and Path(teacher).is_dir() and models.is_run(Path(teacher)):
        return models.read_meta(Path(teacher))
    return None
