"""`lcdistill lipschitz`: per-stage transmitting-matrix spectral norms of a model (and its
teacher) on real images, plus the classic whole-network upper bound.

Stage norms are measured on each network's own features, averaged over a few val
batches. For a london run compared with its own teacher, the student's maps are also
measured through the run's trained connectors ("connected"): that is the quantity the
Lipschitz term matches, since the connectors' BatchNorm sets the scale the teacher sees.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from lcdistill import recipe as recipes
from lcdistill.checkpoint import load_state
from lcdistill.data import ImageDataset, eval_loader, eval_transform, normalize
from lcdistill.features import FeatureTap, Stage, find_stages, pair_stages
from lcdistill.lipschitz import network_upper_bound, stage_sigmas
from lcdistill.methods.london import connector, match_pairs


def trained_connectors(run_dir: Path, student: nn.Module, teacher: nn.Module) -> tuple[list, nn.ModuleList] | None:
    """(stage pairs, connectors in eval mode) of a london run from its last checkpoint, or None."""
    from lcdistill.pipeline import RECIPE_FILE
    from lcdistill.trainer import LAST

    run_dir = Path(run_dir)
    recipe_file, last = run_dir / RECIPE_FILE, run_dir / "checkpoints" / LAST
    if not recipe_file.is_file() or not last.is_file():
        return None
    recipe = recipes.build([recipes.read_yaml(recipe_file)])
    if recipe["method"] != "london":
        return None
    state = {k.removeprefix("extras."): v for k, v in load_state(last)["trainable"].items() if k.startswith("extras.")}
    if not state:  # student_side raw: no connectors were trained
        return None
    pairs = match_pairs(student, teacher, recipe["london"])
    connectors = nn.ModuleList(connector(s.channels, t.channels) for s, t in pairs)
    connectors.load_state_dict(state)
    return pairs, connectors.eval()


@torch.no_grad()
def stage_norms(model: nn.Module, mean, std, stages: list[str], loader, device, batches: int, iterations: int,
                connectors: nn.ModuleList | None = None) -> tuple[list[float], list[float] | None]:
    """Mean TM spectral norm of each consecutive pair of the named stages over `batches` batches,
    on the model's own maps and (given connectors, one per stage) on the connected maps."""
    model.eval().to(device)
    if connectors is not None:
        connectors.eval().to(device)
    tap = FeatureTap(model, stages)
    own, joined, count = 0.0, 0.0, 0
    try:
        for i, batch in enumerate(loader):
            if i >= batches:
                break
            tap.clear()
            model(normalize(batch[0].to(device), mean, std))
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
           connected: tuple[list[tuple[Stage, Stage]], nn.ModuleList] | None = None, bound: bool = True) -> dict:
    """{"stages": [{"name", "model", "teacher", "gap", ...}], "upper_bound", "teacher_upper_bound"}.

    connected: a london run's (pairs, connectors); rows then also hold "connected" and
    "connected_gap", and the run's own pairing is used. bound=False skips the per-layer upper bounds."""
    if connected is not None:
        pairs, connectors = connected
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
                               batches, iterations, connectors)
    if teacher is not None:
        ref, _ = stage_norms(teacher, teacher_cfg["mean"], teacher_cfg["std"], [t.name for t in theirs], loader, device, batches, iterations)
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
        if joined is not None:
            row["connected"], row["connected_gap"] = joined[i], joined[i] - ref[i]
        rows.append(row)
    model.cpu()
    result = {"stages": rows, "upper_bound": finite(network_upper_bound(model, tuple(input_size))["upper_bound"]) if bound else None}
    if teacher is not None:
        teacher.cpu()
        result["teacher_upper_bound"] = finite(network_upper_bound(teacher, tuple(input_size))["upper_bound"]) if bound else None
    return result


def measure(model, teacher, val, device, batches: int = 4, batch_size: int = 64, min_stride: int = 4, run_dir: Path | None = None,
            bound: bool = True) -> dict:
    """report() for loaded models (models.Loaded) on `batches` seeded random batches of the val split
    (val is sorted by class: its first batches would hold a few classes only).

    run_dir: the model's run folder when `teacher` is that run's own teacher (its connectors fit only that one)."""
    meta = model.meta or {"input_size": model.data_config["input_size"], **model.data_config}
    dataset = ImageDataset(val, eval_transform({**model.data_config, **meta}))
    pick = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[: batches * batch_size].tolist()
    loader = eval_loader(torch.utils.data.Subset(dataset, pick), batch_size, 0)
    connected = trained_connectors(run_dir, model.model, teacher.model) if run_dir is not None and teacher is not None else None
    result = report(model.model, model.data_config, teacher.model if teacher else None, teacher.data_config if teacher else None,
                    loader, device, meta["input_size"], min_stride, batches, connected=connected, bound=bound)
    return {**result, "model": model.origin, "teacher": teacher.origin if teacher else None}
