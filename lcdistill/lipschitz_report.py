"""`lcdistill lipschitz`: per-stage transmitting-matrix spectral norms of a model (and its
teacher) on real images, plus the classic whole-network upper bound.

Stage norms are measured on each network's own features, averaged over a few val
batches. For a london run compared with its own teacher, the student's maps are also
measured through the run's trained connectors ("connected"): that is the quantity the
Lipschitz term matches, since the connectors' BatchNorm sets the scale the teacher sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lcdistill import methods, models, recipe as recipes, tasks
from lcdistill.artifacts import identify
from lcdistill.data import eval_loader
from lcdistill.errors import UserError
from lcdistill.lipschitz.bounds import network_upper_bound
from lcdistill.lipschitz.tm import stage_sigmas
from lcdistill.models import FeatureTap, Stage, find_stages, pair_stages
from lcdistill.runfolder import RunFolder
from lcdistill.training.checkpointer import Checkpointer


@dataclass
class Connected:
    """A london run's trained connectors: its stage pairs, the connectors (eval mode), and per transmitting
    matrix (pair i -> i + 1) why the run left it out (None: matched), which has no connector for its deeper stage."""

    pairs: list[tuple[Stage, Stage]]
    connectors: nn.ModuleList
    left_out: list[str | None]


def trained_connectors(run_dir: Path, student: nn.Module, teacher: nn.Module, task) -> Connected | None:
    """A london run's connectors, rebuilt from its recipe and loaded from its last checkpoint's method
    state; None for a run without trained connectors."""
    folder = RunFolder(run_dir)
    if not folder.recipe.is_file() or not folder.last.is_file():
        return None
    recipe = recipes.build([recipes.read_yaml(folder.recipe)])
    cfg = {"mean": [0.0] * 3, "std": [1.0] * 3}  # only the terms' state is used: no forward runs here
    distiller = methods.build(recipe, task, student, teacher, cfg, cfg)
    london = distiller.term("london")
    if london is None or london.connectors is None:  # not london, or student_side raw
        return None
    state = Checkpointer(folder, main=False).load()
    if "method" not in state:  # written before the task layer: its connectors are not where this looks
        return None
    try:
        distiller.load_method_state(state["method"])
    except UserError:  # connectors of another lcdistill version: the report goes without them
        return None
    notes = []
    for i in range(len(london.pairs) - 1):
        why = london.left_out(i)
        side = london.sides[i + 1]
        notes.append(None if why is None else f"not matched in training: the stride-{london.pairs[i + 1][1].stride} map is {side}x{side} at "
                                              f"{london.input_size} px ({why}), so no connector was trained for it")
    return Connected(london.pairs, london.connectors.eval(), notes)


@torch.no_grad()
def stage_norms(model: nn.Module, mean, std, stages: list[str], loader, device, batches: int, iterations: int,
                connectors: nn.ModuleList | None = None, task=None) -> tuple[list[float], list[float] | None]:
    """Mean TM spectral norm of each consecutive pair of the named stages over `batches` batches,
    on the model's own maps and (given connectors, one per leading stage) on the connected maps."""
    model.eval().to(device)
    if connectors is not None:
        connectors.eval().to(device)
    task = task or tasks.get(tasks.LEGACY)
    tap = FeatureTap(model, stages)
    own, joined, count = 0.0, 0.0, 0
    try:
        for i, batch in enumerate(loader):
            if i >= batches:
                break
            tap.clear()
            model(task.inputs(task.batch(batch).to(device), mean, std))
            features = tap.get(stages)
            own = own + stage_sigmas(features, iterations).sum(0)  # (P,)
            if connectors is not None:
                joined = joined + stage_sigmas([c(f) for c, f in zip(connectors, features)], iterations).sum(0)
            count += features[0].shape[0]
    finally:
        tap.remove()
    count = max(count, 1)
    return (own / count).tolist(), (joined / count).tolist() if connectors is not None else None


def finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def report(model, model_cfg: dict, teacher, teacher_cfg: dict | None, loader, device, input_size: list[int],
           min_stride: int = 4, batches: int = 4, iterations: int = 20,
           connected: Connected | None = None, bound: bool = True, task=None) -> dict:
    """{"stages": [{"name", "model", "teacher", "gap", ...}], "upper_bound", "teacher_upper_bound"}.

    connected: a london run's connectors; rows then also hold "connected" and "connected_gap" (None with
    "connected_note", the reason, for a matrix the run left out), and the run's own pairing is used.
    bound=False skips the per-layer upper bounds."""
    if connected is not None:
        pairs, connectors = connected.pairs, connected.connectors
    elif teacher is not None:
        pairs, connectors = pair_stages(find_stages(model), find_stages(teacher), min_stride=min_stride), None
    else:
        pairs, connectors = None, None
    if pairs is not None:
        mine, theirs = [s for s, _ in pairs], [t for _, t in pairs]
    else:
        mine, theirs = [s for s in find_stages(model) if s.stride >= min_stride], []
        if len(mine) < 2:
            raise ValueError("the model has fewer than two stride-separated stages")
    ours, joined = stage_norms(model, model_cfg["mean"], model_cfg["std"], [s.name for s in mine], loader, device,
                               batches, iterations, connectors, task)
    if teacher is not None:
        ref, _ = stage_norms(teacher, teacher_cfg["mean"], teacher_cfg["std"], [t.name for t in theirs], loader, device, batches, iterations,
                             task=task)
    rows = []
    for i, value in enumerate(ours):
        row = {
            "name": f"stride {mine[i].stride}->{mine[i + 1].stride}",
            "model_stages": [mine[i].name, mine[i + 1].name],
            "model": value,
            "teacher": ref[i] if teacher is not None else None,
            "gap": value - ref[i] if teacher is not None else None,
        }
        if teacher is not None:
            row["teacher_stages"] = [theirs[i].name, theirs[i + 1].name]
        if joined is not None:  # a matrix london left out (min_positions) has no trained connector: the reason instead
            row["connected"], row["connected_gap"] = (joined[i], joined[i] - ref[i]) if i < len(joined) else (None, None)
            if i >= len(joined):
                row["connected_note"] = connected.left_out[i] or "not matched in training: no connector was trained for its deeper stage"
        rows.append(row)
    model.cpu()
    result = {"stages": rows, "upper_bound": finite(network_upper_bound(model, tuple(input_size))["upper_bound"]) if bound else None}
    if teacher is not None:
        teacher.cpu()
        result["teacher_upper_bound"] = finite(network_upper_bound(teacher, tuple(input_size))["upper_bound"]) if bound else None
    return result


def measure(model, teacher, val, task, device, batches: int = 4, batch_size: int = 64, min_stride: int = 4, run_dir: Path | None = None,
            bound: bool = True) -> dict:
    """report() for loaded models (models.Loaded) on `batches` seeded random batches of the val split
    (val is sorted by class: its first batches would hold a few classes only).

    run_dir: the model's run folder when `teacher` is that run's own teacher (its connectors fit only that one)."""
    meta = model.meta or {"input_size": model.data_config["input_size"], **model.data_config}
    dataset = task.eval_dataset(val, {**model.data_config, **meta})
    pick = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[: batches * batch_size].tolist()
    loader = eval_loader(torch.utils.data.Subset(dataset, pick), batch_size, 0)
    connected = trained_connectors(run_dir, model.model, teacher.model, task) if run_dir is not None and teacher is not None else None
    result = report(model.model, model.data_config, teacher.model if teacher else None, teacher.data_config if teacher else None,
                    loader, device, meta["input_size"], min_stride, batches, connected=connected, bound=bound, task=task)
    return {**result, "model": model.origin, "teacher": teacher.origin if teacher else None}


def for_target(target: str, data: str, device, teacher: str | None = None, teacher_weights: str | None = None, no_teacher: bool = False,
               batches: int = 4, batch_size: int = 64, min_stride: int = 4) -> dict:
    """`lcdistill lipschitz TARGET --data DIR`: a run folder, student file or model name, beside the
    teacher named (or the run's own, whose trained connectors are then measured too)."""
    artifact = identify(target, accept=("run", "weights")) if Path(target).exists() else None
    task = artifact.task if artifact else tasks.for_data("auto", data, (target,))
    splits = task.scan(data)
    n = len(splits.classes)
    model = artifact.loaded if artifact else task.resolve(target, n, pretrained=False)
    t, own = None, False
    if not no_teacher:
        if teacher:
            t = task.resolve(teacher, n, weights=teacher_weights)
        elif model.meta.get("teacher"):
            t, own = models.rebuild(model.meta["teacher"]["spec"], n), True
    try:
        # the run's own connectors fit only its own teacher
        return measure(model, t, splits.val, task, device, batches, batch_size, min_stride,
                       run_dir=artifact.folder if own and artifact.kind == "run" else None)
    except ValueError as e:
        raise UserError(f"lipschitz: {e}", "pass --min-stride 2, or a CNN with stride-separated stages") from None
