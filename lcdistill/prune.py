"""`--student prune:R`: the student is the teacher with whole channels removed until its FLOPs are at most R
times the teacher's, then distilled from the unpruned teacher like any student.

Torch-Pruning (DepGraph) finds which channels must go together (a residual add, a depthwise conv, a
concatenation) and removes them; this is its only import site. The importance is the L2 magnitude of each
channel group's weights (GroupMagnitudeImportance): it needs no data and no backward pass, so the cut is the
same on every process and every re-run. Pruning is local (every layer loses the same share per step), so
the widths follow from R and the architecture alone. The result is described in JSON (models/pruned.py)
and rebuilt from it with torch alone: eval, export and --resume never import the pruner.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from lcdistill import models
from lcdistill.errors import UserError
from lcdistill.measure import flops
from lcdistill.models.pruned import PRUNED, base_arch, describe, narrow, refresh, unfreeze_batchnorm
from lcdistill.tasks import Task

SOURCE = "prune"  # --student prune:R splits into this source and R (lcdistill.specs)
FIX = "use a CNN teacher: resnets, mobilenets, efficientnets, the smp and torchvision dense models over them, FCOS or RetinaNet"


@dataclass
class Cut:
    student: models.Loaded
    teacher_flops: int
    flops: int
    steps: int
    narrowed: int  # modules narrowed
    kept: dict[str, list[int]]  # each BatchNorm's surviving channels, as the teacher's channel indices

    @property
    def share(self) -> float:
        """The teacher's FLOPs the cut kept."""
        return self.flops / self.teacher_flops

    def line(self, size: int) -> str:
        return (f"{self.narrowed} layers narrowed in {self.steps} steps: {self.teacher_flops / 1e6:.1f} -> {self.flops / 1e6:.1f} "
                f"MFLOPs ({self.share:.3f} of the teacher's) at {size} px")

    def record(self) -> dict:
        """What inputs.json keeps so that --resume rebuilds the same student without the pruner."""
        return {"arch": self.student.arch, "origin": self.student.origin, "teacher_flops": self.teacher_flops, "flops": self.flops,
                "steps": self.steps}


def ratio_of(student: dict) -> float | None:
    """R of a recipe's student section when it says prune:R, else None (recipe.validate checked R)."""
    return float(student["name"]) if student.get("source") == SOURCE else None


def check(student: dict, settings: dict) -> None:
    """One line for a prune:R student that cannot be cut: R outside (0, 1), weights of its own, bad settings."""
    if student.get("source") != SOURCE:
        return
    try:
        r = float(student["name"])
    except (TypeError, ValueError):
        r = None
    if r is None or not 0 < r < 1:
        raise UserError(f"--student prune:{student['name']}: R must be a number between 0 and 1 (the share of the teacher's FLOPs to keep)",
                        "pass e.g. --student prune:0.5")
    for key, flag in (("weights", "--weights"), ("init", "--init"), ("pretrained", "--pretrained"), ("kwargs", "student.kwargs")):
        if student.get(key):
            raise UserError(f"--student prune:R starts from the teacher's own weights, so {flag} has nothing to set", f"drop {flag}")
    if settings["importance"] != "magnitude":
        raise UserError(f"unknown prune.importance {settings['importance']!r}", "pass --set prune.importance=magnitude")
    for key, example in (("steps", 100), ("round_to", 8)):
        value = settings[key]
        if (value is not None or key == "steps") and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UserError(f"prune.{key} must be a whole number >= 1, got {value!r}", f"pass --set prune.{key}={example}")
    if not isinstance(settings["max_ratio"], (int, float)) or not 0 < settings["max_ratio"] < 1:
        raise UserError(f"prune.max_ratio must be a number between 0 and 1, got {settings['max_ratio']!r}", "pass --set prune.max_ratio=0.9")
    if settings["connectors"] not in ("random", "select"):
        raise UserError(f"unknown prune.connectors {settings['connectors']!r}", "pass --set prune.connectors=random or select")
    if not isinstance(settings["keep"], list) or not all(isinstance(k, str) for k in settings["keep"]):
        raise UserError(f"prune.keep must be a list of module paths, got {settings['keep']!r}", "pass e.g. --set 'prune.keep=[layer1]'")


def cut(teacher: models.Loaded, ratio: float, settings: dict, task: Task, input_size: int) -> Cut:
    """The teacher with channels removed until its FLOPs at input_size are at most ratio of its own."""
    import torch_pruning as tp

    family = models.family_of(base_arch(teacher.arch))
    model = unfreeze_batchnorm(copy.deepcopy(teacher.model).cpu().float())
    for p in model.parameters():
        p.requires_grad_(True)  # a frozen layer traces to nothing
    example = task.export.example({"input_size": [3, input_size, input_size]}, 1)
    names = dict(model.named_modules())
    missing = [k for k in settings["keep"] if k not in names]
    if missing:
        raise UserError(f"prune.keep names {missing[0]!r}, which {teacher.origin} does not have", "pass module paths of the teacher (see `lcdistill lipschitz` for its stages)")
    whole_layers = [names[k] for k in [*family.prune_kept(model), *settings["keep"]]]
    # Torch-Pruning 1.6.1 rounds a GroupNorm's per-group share up to round_to channels of the whole layer, so with
    # round_to set a GroupNorm is never narrowed (FCOS's head towers, smp FPN's decoder): such models are cut at any width.
    whole = {id(m) for k in whole_layers for m in k.modules()}
    grouped = any(isinstance(m, nn.GroupNorm) and id(m) not in whole for m in model.modules())
    round_to = None if grouped else settings["round_to"]
    base = flops(model, example)
    means = _tag(model)
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its notes on parameters it cannot place: a model it cuts wrong is refused below
            pruner = tp.pruner.BasePruner(
                model, example, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=1.0,
                iterative_steps=settings["steps"], max_pruning_ratio=settings["max_ratio"], ignored_layers=whole_layers, round_to=round_to,
                forward_fn=family.prune_forward(model))
            now, steps = base, 0
            while now > ratio * base and pruner.current_step < settings["steps"]:
                pruner.step()
                steps, now = steps + 1, flops(model, example)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 (the pruner's own errors, whatever a model makes it raise)
        raise UserError(f"prune: Torch-Pruning cannot cut {teacher.origin} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                        FIX) from None
    if now > ratio * base:
        raise UserError(f"prune:{ratio}: the cut stops at {now / base:.3f} of the teacher's FLOPs (every layer at prune.max_ratio "
                        f"{settings['max_ratio']} of its channels removed)", f"pass a larger R (>= {now / base:.2f}) or raise prune.max_ratio")
    kept = _untag(model, means)
    refresh(model.eval())
    arch = {"source": "pruned", "name": family.spec_of(base_arch(teacher.arch)),
            "kwargs": {"base": teacher.arch, "ratio": ratio, "shapes": _shapes(model, teacher, example)}}
    origin = f"prune:{ratio} of {teacher.origin}"
    loaded = models.Loaded(model, arch, teacher.num_classes, copy.deepcopy(teacher.data_config), origin, dict(arch))
    return Cut(loaded, base, now, steps, len(arch["kwargs"]["shapes"]), kept)


def _batchnorms(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None}


@torch.no_grad()
def _tag(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each BatchNorm's running mean replaced by its channel numbers (the pruner slices it with the channels it
    keeps, and magnitude importance never reads it); the real means returned."""
    means = {}
    for name, bn in _batchnorms(model).items():
        means[name] = bn.running_mean.clone()
        bn.running_mean.copy_(torch.arange(bn.num_features, dtype=bn.running_mean.dtype))
    return means


@torch.no_grad()
def _untag(model: nn.Module, means: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """The teacher's channel indices each BatchNorm kept; its real running mean, sliced alike, put back."""
    kept = {}
    for name, bn in _batchnorms(model).items():
        ids = bn.running_mean.round().long()
        kept[name] = ids.tolist()
        bn.running_mean.copy_(means[name][ids])
    return kept


def channels_of(kept: dict[str, list[int]], module: str) -> list[int] | None:
    """The teacher's channel indices of a cut module's output: its last BatchNorm's (a block's output is its
    last norm's channels, summed with the shortcut's, which the pruner cuts alike), None when it has none."""
    inside = [n for n in kept if n == module or n.startswith(module + ".")]
    return kept[inside[-1]] if inside else None


@torch.no_grad()
def select_connectors(terms, kept: dict[str, list[int]]) -> int:
    """Start each feature term's 1x1 connectors as the selection of the teacher's kept channels (student channel i
    -> teacher channel kept[i]), instead of at random: prune.connectors=select. How many were set."""
    done = 0
    for term in terms:
        connectors = getattr(term, "connectors", None)
        for conn, (s, t) in zip(connectors or [], getattr(term, "pairs", [])):
            ids = channels_of(kept, s.name.split(":")[0])
            conv = conn[0]
            if ids is None or len(ids) != s.channels or max(ids) >= t.channels or tuple(conv.weight.shape[:2]) != (t.channels, s.channels):
                continue
            conv.weight.zero_()
            conv.weight[ids, list(range(s.channels)), 0, 0] = 1.0
            done += 1
    return done


@torch.no_grad()
def _shapes(model: nn.Module, teacher: models.Loaded, example) -> dict:
    """model's shape description, proven: a fresh build narrowed by it takes model's weights strictly and
    gives model's outputs bit for bit, else the teacher has layers this description cannot hold."""
    fresh = unfreeze_batchnorm(models.build(teacher.arch, teacher.num_classes))
    shapes = describe(model, fresh)
    try:
        rebuilt = narrow(fresh, shapes)  # what the pruned family's build does to a fresh base (unfreeze_batchnorm is done)
        own, got = model.state_dict(), rebuilt.state_dict()
        wrong = [k for k in own if k not in got or got[k].shape != own[k].shape] + [k for k in got if k not in own]
        if not wrong:
            rebuilt.load_state_dict(own)
            same = [torch.equal(a, b) for a, b in zip(_flat(model.eval()(example)), _flat(rebuilt.eval()(example)), strict=True)]
            wrong = [] if all(same) else ["its outputs differ"]
    except (ValueError, RuntimeError) as exc:  # a layer the description does not narrow makes the rebuilt model fail
        wrong = [str(exc).splitlines()[0][:100]]
    if wrong:
        raise UserError(f"prune: {teacher.origin} has layers lcdistill cannot rebuild after pruning ({wrong[0]})",
                        FIX)
    return shapes


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flat(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flat(v)]
    return []


def rebuilt(record: dict, teacher: models.Loaded) -> models.Loaded:
    """The student a first start cut, built again from its record in inputs.json (--resume): no pruner."""
    arch = record.get("arch") if isinstance(record, dict) else None
    if not isinstance(arch, dict) or arch.get("source") != "pruned":
        raise UserError("the run's inputs.json has no pruned student to resume", "resume the run with its own inputs.json, or start it again")
    model = PRUNED.build(arch, teacher.num_classes)
    return models.Loaded(model, arch, teacher.num_classes, copy.deepcopy(teacher.data_config), str(record.get("origin", "prune")), dict(arch))
