"""Model families, registered per task in the spirit of timm's register_model.

A family knows one library's models for one task: which names are its own (`parse`), how to build
one with a head for the data's classes, how it is fed (`data_config`), which of its modules are
stages (or None: probe it), how a Hub folder loads it without lcdistill, and which small models
`lcdistill students` measures. Each family module (models/classifiers.py, models/segmentation.py)
registers its families when the package is imported; nothing outside a family asks which it is.
"""

from __future__ import annotations

from torch import nn

from lcdistill.errors import UserError
from lcdistill.models.loaded import Loaded, from_weights_file


class Family:
    name: str  # e.g. "timm", "tv-seg", "smp"
    task: str  # the task its models serve
    hint: str  # the models to suggest when one is refused, as a noun phrase ("a classifier: ...")
    count_classes: int = 1000  # the class count `lcdistill recipes` counts parameters at
    curated: tuple[tuple[str, str], ...] = ()  # (source, name) of small models `lcdistill students` measures

    def parse(self, spec: str) -> dict | None:
        """The arch dict ({"source", "name", "kwargs"}) of a name this family builds, else None; a name
        that is clearly its own but malformed is a UserError."""
        raise NotImplementedError

    def owns(self, arch: dict) -> bool:
        raise NotImplementedError

    def spec_of(self, arch: dict) -> str:
        return f"{arch['source']}:{arch['name']}"

    def build(self, arch: dict, num_classes: int, pretrained: bool = False, flag: str = "--weights") -> nn.Module:
        raise NotImplementedError

    def data_config(self, model: nn.Module) -> dict:
        raise NotImplementedError

    def check_head(self, arch: dict, num_classes: int, flag: str) -> None:
        """A UserError when hub weights have no head for num_classes (a teacher must come trained)."""

    def prefixes(self) -> tuple[str, ...]:
        """Where a backbone's own tensor names sit in this family's models (`layer1.0.conv1.weight` under
        `backbone.body.` in a detector): --init matches names across families under these."""
        return ("",)

    def class_layers(self, model: nn.Module) -> list[str]:
        """Module paths of model's class-specific layers: made fresh when --init brings another label set."""
        return []

    def stages(self, model: nn.Module, probe_size: int):
        """This family's stages of model (models.Stage list), None when model is not its own or it has no
        better answer than probing."""
        return None

    def prune_kept(self, model: nn.Module) -> list[str]:
        """Module paths `--student prune:R` keeps whole: the layers whose outputs the task reads (class scores)."""
        return self.class_layers(model)

    def prune_forward(self, model: nn.Module):
        """How the pruner runs model on an example batch (fn(model, x)), None for model(x)."""
        return None

    def library(self, arch: dict) -> str:
        """The pip package that builds arch (a Hub card's library_name)."""
        return {"timm": "timm", "tv": "torchvision"}.get(arch["source"], "lcdistill")

    def hub_kind(self, arch: dict) -> str:
        """How a Hub folder of this model loads: 'timm', 'tv' (torchvision) or 'lcdistill'."""
        return "lcdistill"

    def plain_usage(self, meta: dict) -> str:
        """Markdown for a model card: building the model with its own library alone ('' when there is none)."""
        return ""

    def unknown(self, spec: str) -> UserError:
        return UserError(f"'{spec}' is not a {self.task} model", f"name {self.hint}")

    def resolve(self, arch: dict, num_classes: int, weights: str | None, pretrained: bool, flag: str, keep_head: bool) -> Loaded:
        """Build arch from a weights file, from hub weights or from scratch."""
        label = self.spec_of(arch)
        if weights:
            model, origin, rebuild = from_weights_file(lambda: self.build(arch, num_classes), arch, num_classes, weights, keep_head, label)
        else:
            if pretrained and keep_head:
                self.check_head(arch, num_classes, flag)
            model = self.build(arch, num_classes, pretrained=pretrained, flag=flag)
            origin = label + (" (pretrained)" if pretrained else "")
            rebuild = {**arch, "pretrained": pretrained}
        return Loaded(model, arch, num_classes, self.data_config(model), origin, rebuild)


FAMILIES: list[Family] = []


def register(family: Family) -> Family:
    FAMILIES.append(family)
    return family


def families(task: str | None = None) -> list[Family]:
    return [f for f in FAMILIES if task is None or f.task == task]


def parse(spec: str, task: str | None = None) -> tuple[Family, dict] | None:
    """The family (of task, or of any task) that builds spec, and its arch dict."""
    for family in families(task):
        arch = family.parse(spec)
        if arch is not None:
            return family, arch
    return None


def family_of(arch: dict) -> Family:
    found = next((f for f in FAMILIES if f.owns(arch)), None)
    if found is None:
        raise UserError(f"no model family builds {arch.get('source')}:{arch.get('name')}", "pass a model name lcdistill knows (see `lcdistill students`)")
    return found


def build(arch: dict, num_classes: int, pretrained: bool = False, flag: str = "--weights") -> nn.Module:
    """The architecture of arch with a head of num_classes (its family builds it)."""
    return family_of(arch).build(arch, num_classes, pretrained, flag)


def stages(model: nn.Module, probe_size: int):
    """The stages a family declares for model, or None (then stage discovery probes it)."""
    for family in FAMILIES:
        found = family.stages(model, probe_size)
        if found is not None:
            return found
    return None
