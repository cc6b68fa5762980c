"""Start a model from weights of another label set or task (`--init RUN_OR_FILE`, student.init).

Every tensor whose name and shape fit is loaded; the rest stays as built. Names are matched under the
prefix each family declares for its backbone (`Family.prefixes`): a classifier's `layer1.0.conv1.weight`
is a detector's `backbone.body.layer1.0.conv1.weight` and an smp model's `encoder.layer1.0.conv1.weight`.
Of all pairs of declared prefixes (and none) the one that fits the most tensors is taken, so a bare
weights file needs no metadata. The layers a family calls class-specific (`Family.class_layers`) are
always made fresh: they belong to the source's label set, even when its class count happens to match.

A file that fits too little (under half of its own tensors, or a fifth of the model's) is refused: it
is another architecture, and loading a few stray tensors would only hide that.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lcdistill.checkpoint import load_weights
from lcdistill.errors import UserError
from lcdistill.models import registry
from lcdistill.runfolder import RunFolder

MIN_SOURCE_SHARE, MIN_TARGET_SHARE = 0.5, 0.2


@dataclass
class InitReport:
    """What --init did: recorded in run.json and student.json, printed in the run header, shown in the report."""

    source: str
    loaded: int  # tensors loaded
    source_tensors: int  # tensors the source holds
    model_tensors: int  # tensors the model holds
    mapping: tuple[str, str]  # (source prefix, model prefix) the names were matched under
    fresh: list[str]  # maximal modules of the model left as built (none of their tensors loaded)
    class_layers: list[str]  # the model's class-specific layers, made fresh for the data's classes

    def as_dict(self) -> dict:
        return {"source": self.source, "loaded": self.loaded, "source_tensors": self.source_tensors, "model_tensors": self.model_tensors,
                "mapping": list(self.mapping), "fresh": self.fresh, "class_layers": self.class_layers}


def init_line(report: dict) -> str:
    """One line of what --init did (an InitReport.as_dict, as run.json keeps it)."""
    src, dst = report["mapping"]
    where = f" as {dst or 'top level'}*" if src != dst else ""
    fresh = report["fresh"]
    named = ", ".join(fresh[:6]) + (f" and {len(fresh) - 6} more" if len(fresh) > 6 else "")
    return (f"init: loaded {report['loaded']} of the {report['source_tensors']} tensors of {report['source']}{where} "
            f"({report['loaded']} of the model's {report['model_tensors']}); made fresh: {named or 'nothing'}")


def read_source(path: str) -> dict[str, torch.Tensor]:
    """The state dict of a finished run folder's student, or of a weights file (.safetensors, .pth)."""
    p = Path(path)
    if p.is_dir():
        RunFolder(p).check_finished()
        p = RunFolder(p).student
    elif not p.is_file():
        raise UserError(f"--init {path} not found", "pass a finished run folder or a .safetensors / .pth weights file")
    return load_weights(p)


def _prefixes() -> list[str]:
    found = {""}
    for family in registry.FAMILIES:
        found.update(family.prefixes())
    return sorted(found)


def match(source: dict[str, torch.Tensor], own: dict[str, torch.Tensor], skip: list[str]) -> tuple[dict[str, torch.Tensor], tuple[str, str]]:
    """The source's tensors renamed into the model's names (those whose shape fits, outside the skipped
    modules), under the pair of declared prefixes that fits the most; and that pair."""
    skipped = tuple(s + "." for s in skip)
    best: tuple[dict, tuple[str, str]] = ({}, ("", ""))
    for src in _prefixes():
        for dst in _prefixes():
            fitted = {}
            for name, tensor in source.items():
                if not name.startswith(src):
                    continue
                target = dst + name[len(src):]
                if target in own and own[target].shape == tensor.shape and not target.startswith(skipped):
                    fitted[target] = tensor
            if len(fitted) > len(best[0]) or (len(fitted) == len(best[0]) and src == dst and best[1][0] != best[1][1]):
                best = (fitted, (src, dst))
    return best


def fresh_modules(model: nn.Module, loaded: set[str]) -> list[str]:
    """The largest modules none of whose tensors were loaded (a parent wholly fresh stands for its children)."""
    own = model.state_dict()
    out: list[str] = []
    for name, _ in model.named_modules():
        if not name or any(name.startswith(f + ".") for f in out):
            continue
        keys = [k for k in own if k.startswith(name + ".")]
        if keys and not any(k in loaded for k in keys):
            out.append(name)
    return out


def init_from(model: nn.Module, arch: dict, path: str) -> InitReport:
    """Load into model (built by arch's family) what fits of the weights at path; refuse a file that barely fits."""
    source = read_source(path)
    return load_matching(model, arch, source, path)


def load_matching(model: nn.Module, arch: dict, source: dict[str, torch.Tensor], what: str) -> InitReport:
    own = model.state_dict()
    family = registry.family_of(arch)
    class_layers = family.class_layers(model)
    fitted, mapping = match(source, own, class_layers)
    spec = family.spec_of(arch)
    if len(fitted) < MIN_SOURCE_SHARE * len(source) or len(fitted) < MIN_TARGET_SHARE * len(own) or not fitted:
        raise UserError(f"--init {what} fits {spec} on {len(fitted)} of its {len(source)} tensors ({len(own)} in the model): "
                        "another architecture",
                        "pass a run folder or weights file of a model over the same backbone (e.g. a classifier of that architecture)")
    model.load_state_dict(fitted, strict=False)
    return InitReport(what, len(fitted), len(source), len(own), mapping, fresh_modules(model, set(fitted)), class_layers)
