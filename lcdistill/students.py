"""Choosing a student: the shipped recipes and a curated list of small families, measured here.

Each candidate is built with the data's number of classes (random weights: speed and size do not
depend on them) and measured at one input size: params, FLOPs (lcdistill.measure.flops) and the
median latency of batch-1 calls on the chosen runtime, every candidate with the same thread count.
For onnxruntime each candidate is first exported to a temporary ONNX file by lcdistill.exporters.to_onnx,
the same path `lcdistill export` takes.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from lcdistill import exporters as export, models, prune, recipe as recipes, tasks
from lcdistill.errors import UserError
from lcdistill.specs import split_source
from lcdistill.measure import flops

RUNTIMES = ("onnxruntime", "torch")
WARMUP, REPEATS = 5, 20


@dataclass
class Candidate:
    student: str  # what to pass to --student: a recipe name or source:name
    source: str
    name: str
    recipe: bool = False
    role: str = "student"  # or "teacher"


@dataclass
class Row:
    student: str
    model: str
    role: str
    recipe: bool
    params: int | None = None
    flops: int | None = None
    latency_ms: float | None = None
    within_budget: bool | None = None
    error: str | None = None


PRUNE_RATIOS = (0.75, 0.5, 0.25)  # the cuts of the teacher listed beside the named students


def _key(spec: str, task) -> tuple[str, str]:
    """(library, name) of a model name of the task, or the one-line error for a name none of its families builds."""
    source, ratio = split_source(spec)
    if source == prune.SOURCE:
        prune.check({"source": source, "name": ratio}, recipes.default_recipe()["prune"])
        return source, str(float(ratio))
    found = models.parse(spec, task.name)
    if found is None:
        raise (models.families(task.name) or models.families())[0].unknown(spec)
    return found[1]["source"], found[1]["name"]


def candidates(only: list[str] | None = None, task=None, teacher: bool = False) -> list[Candidate]:
    """The shipped recipes' students for the task and its families' curated models, one row per
    architecture (a recipe's name wins), and with a teacher its prune:R cuts; or just the models /
    recipes named in `only`."""
    task = task or tasks.get(tasks.LEGACY)
    shipped = {}
    for recipe_name, path in recipes.list_recipes().items():
        r = recipes.read_yaml(path)
        own = r.get("task", "auto")
        if own == task.name or own == "auto" and task.name == tasks.LEGACY:  # a recipe without a task is a classifier's
            shipped[recipe_name] = r["student"]
    spec = lambda s: s["name"] if s.get("source", "auto") == "auto" else f"{s['source']}:{s['name']}"  # noqa: E731
    found: dict[tuple[str, str], Candidate] = {}
    if only:
        for name in only:
            if name in shipped:
                source, model = _key(spec(shipped[name]), task)
                found.setdefault((source, model), Candidate(name, source, model, recipe=True))
            else:
                source, model = _key(name, task)
                found.setdefault((source, model), Candidate(f"{source}:{model}", source, model))
        return list(found.values())
    for recipe_name, s in shipped.items():
        source, model = _key(spec(s), task)
        found.setdefault((source, model), Candidate(recipe_name, source, model, recipe=True))
    for family in models.families(task.name):
        for source, model in family.curated:
            found.setdefault((source, model), Candidate(f"{source}:{model}", source, model))
    for ratio in PRUNE_RATIOS if teacher else ():
        found.setdefault((prune.SOURCE, str(ratio)), Candidate(f"{prune.SOURCE}:{ratio}", prune.SOURCE, str(ratio)))
    return list(found.values())


def default_input_size(median_side: float | None) -> int:
    """A square size near the training images' own (a multiple of 32, 32 to 224)."""
    if not median_side:
        return 224
    return int(max(32, min(224, 32 * round(median_side / 32))))


def runnable(model: torch.nn.Module, meta: dict, task, runtime: str, folder: Path) -> tuple[dict, Callable[[], object]]:
    """params and FLOPs of one built model, and a batch-1 call on `runtime` to time (for onnxruntime the
    model is exported to ONNX in `folder` first, as `lcdistill export` does)."""
    model = task.exportable(model).eval()
    stats = {"params": models.params(model), "flops": flops(model, task.export.example(meta, 1))}
    x = task.export.example(meta, 1)
    if runtime == "torch":
        def call():
            with torch.no_grad():
                return model(x)
        return stats, call
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines, where fd 1 is not sys.stdout
        path = export.to_onnx(model, meta, folder / f"candidate{len(list(folder.iterdir()))}.onnx", task.export)
    session = export.onnx_session(path)
    return stats, lambda: export.run_onnx(session, x)


def interleaved(calls: list[Callable[[], object]], warmup: int = WARMUP, repeats: int = REPEATS,
                tick: Callable[[], None] | None = None) -> list[float]:
    """Median wall time (ms) of each call, timed in rounds (one call of each per round) so that load from
    other processes falls on all of them alike instead of on whichever was measured at the time."""
    for call in calls:
        for _ in range(warmup):
            call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for i, call in enumerate(calls):
            start = time.perf_counter()
            call()
            times[i].append((time.perf_counter() - start) * 1000)
        if tick:
            tick()
    return [statistics.median(t) for t in times]


def _short(e: BaseException) -> str:
    text = (e.line() if isinstance(e, UserError) else str(e)).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:120]}" if text else type(e).__name__


def survey(task, classes: list[str], input_size: int, runtime: str, cands: list[Candidate], teacher: str | None = None,
           max_latency_ms: float | None = None, repeats: int = REPEATS, progress: Callable[[str], None] | None = None) -> list[Row]:
    """Build (and export) each candidate and the teacher (for scale), then time them all in interleaved
    rounds; rows sorted by latency, budget marked. progress(name) is called per candidate built and
    per timing round ("timing")."""
    if runtime not in RUNTIMES:
        raise UserError(f"unknown --runtime '{runtime}'", f"choose {' or '.join(RUNTIMES)}")
    size = [3, input_size, input_size]
    todo: list[tuple[Candidate, Callable[[], models.Loaded]]] = []
    t = None
    if teacher:
        t = task.resolve(teacher, len(classes), pretrained=False)  # random weights: its speed, not its accuracy
        task.configure(t, input_size)
        todo.append((Candidate(teacher, t.arch["source"], t.arch["name"], role="teacher"), lambda t=t: t))
    if t is None and any(c.source == prune.SOURCE for c in cands):
        raise UserError("prune:R candidates are cuts of the teacher", "pass --teacher NAME_OR_RUN")
    settings = recipes.default_recipe()["prune"]
    for c in cands:  # a cut's widths follow from R and the architecture alone (local pruning), so random weights cut the same
        todo.append((c, (lambda c=c: prune.cut(t, float(c.name), settings, task, input_size).student) if c.source == prune.SOURCE else
                     (lambda c=c: task.resolve(f"{c.source}:{c.name}", len(classes), pretrained=False, keep_head=False))))
    rows, calls, timed = [], [], []
    with tempfile.TemporaryDirectory(prefix="lcdistill-students-") as tmp:
        for cand, build in todo:
            if progress:
                progress(cand.student)
            row = Row(cand.student, f"{cand.source}:{cand.name}" if cand.source != prune.SOURCE else f"{t.arch['source']}:{t.arch['name']} cut",
                      cand.role, cand.recipe)
            try:
                torch.manual_seed(0)
                loaded = build()
                task.configure(loaded, input_size)  # a detector resizes to the size it is measured at
                meta = models.model_meta(loaded, classes, size, task.metadata(classes))
                stats, call = runnable(loaded.model, meta, task, runtime, Path(tmp))
                row.params, row.flops = stats["params"], stats["flops"]
                call()  # a model that cannot run at this size fails here, not in the timing rounds
                calls.append(call)
                timed.append(row)
            except UserError as e:
                if cand.role == "teacher":
                    raise
                row.error = e.line()[:160]
            except Exception as e:  # a family that does not export or run: say so in its row, measure the rest
                row.error = _short(e)
            rows.append(row)
        for row, ms in zip(timed, interleaved(calls, repeats=repeats, tick=(lambda: progress("timing")) if progress else None)):
            row.latency_ms = ms
    if max_latency_ms is not None:
        for row in rows:
            row.within_budget = row.latency_ms is not None and row.latency_ms <= max_latency_ms
    return sorted(rows, key=lambda r: (r.latency_ms is None, r.latency_ms or 0.0))


def as_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]


__all__ = ["RUNTIMES", "Candidate", "Row", "as_dicts", "candidates", "default_input_size", "interleaved", "runnable", "survey"]
