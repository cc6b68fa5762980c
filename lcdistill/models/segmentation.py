"""Segmentation models: torchvision's and segmentation_models_pytorch's encoder-decoders, by name.

Names (`--model`, `--teacher`, `--student`, `student.name` with `student.source`):

    tv:deeplabv3_resnet50, tv:deeplabv3_resnet101, tv:deeplabv3_mobilenet_v3_large,
    tv:fcn_resnet50, tv:fcn_resnet101, tv:lraspp_mobilenet_v3_large
        torchvision.models.segmentation, built by torchvision.models.get_model(name, num_classes=N,
        weights=None, weights_backbone=None, aux_loss=True): the auxiliary head is on where the
        model has one (FCN, DeepLabV3; its loss counts 0.5, as torchvision's reference trains them);
        student.kwargs {aux_loss: false} drops it. Exported files never compute it.
    smp:<Arch>:<encoder>
        segmentation_models_pytorch: smp.create_model(Arch, encoder_name=encoder, encoder_weights=None,
        classes=N), any smp architecture (Unet, UnetPlusPlus, FPN, PSPNet, DeepLabV3, DeepLabV3Plus,
        Linknet, MAnet, PAN, UPerNet, Segformer, DPT) over any smp encoder (resnet18, resnet101,
        mobilenet_v2, efficientnet-b0, ...) or timm encoder as tu-<timm name>, e.g.
        smp:DeepLabV3Plus:resnet101 (the paper's teacher), smp:DeepLabV3Plus:mobilenet_v2,
        smp:Unet:tu-mobilenetv3_small_100. In a recipe: student: {source: smp, name: DeepLabV3Plus:mobilenet_v2}.

Pretrained (`--pretrained`, student.pretrained): the encoder's ImageNet weights (smp: encoder_weights
"imagenet", tu-: timm's; torchvision: weights_backbone DEFAULT), or torchvision's whole model
(COCO with VOC labels) when the data has VOC's 21 classes. Offline, the same one-line error as for
classifiers, naming a weights file instead.

Data config: ImageNet mean/std, 512 px unless the recipe (or a teacher run) says otherwise, crop_pct
1.0 (eval resizes the whole image, never centre-crops), bilinear.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import torch
from torch import nn

from lcdistill.errors import UserError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
DEFAULT_SIZE = 512
NAME_HINT = "name a segmentation model: tv:lraspp_mobilenet_v3_large, tv:fcn_resnet50, tv:deeplabv3_resnet50 or smp:<Arch>:<encoder> such as smp:DeepLabV3Plus:mobilenet_v2"


@lru_cache(maxsize=1)
def tv_names() -> tuple[str, ...]:
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models.segmentation))


def is_arch(arch: dict) -> bool:
    """Whether an arch dict ({"source", "name", "kwargs"}) is a segmentation model this module builds."""
    return arch.get("source") == "smp" or (arch.get("source") == "tv" and arch.get("name") in tv_names())


def parse(spec: str) -> dict | None:
    """'smp:Arch:encoder' or 'tv:<segmentation name>' (also a bare torchvision segmentation name) as an
    arch dict; None for anything else (a classifier name, a path)."""
    if spec.startswith("smp:"):
        parts = spec.split(":")
        if len(parts) != 3 or not all(parts[1:]):
            raise UserError(f"model name '{spec}' is not smp:<Arch>:<encoder>", "write it like smp:DeepLabV3Plus:resnet18")
        return {"source": "smp", "name": f"{parts[1]}:{parts[2]}", "kwargs": {}}
    for prefix in ("tv:", "torchvision:", ""):
        if spec.startswith(prefix) and spec[len(prefix):] in tv_names():
            return {"source": "tv", "name": spec[len(prefix):], "kwargs": {}}
    return None


def spec_of(arch: dict) -> str:
    return f"{arch['source']}:{arch['name']}"


def _smp_parts(name: str) -> tuple[str, str]:
    arch, _, encoder = name.partition(":")
    return arch, encoder


def _check_smp_name(name: str) -> None:
    import segmentation_models_pytorch as smp

    arch, encoder = _smp_parts(name)
    if not encoder:
        raise UserError(f"model name 'smp:{name}' names no encoder", "write it like smp:DeepLabV3Plus:resnet18")
    if arch.lower() not in smp.MODEL_ARCHITECTURES_MAPPING:
        import difflib

        names = [a.__name__ for a in smp.MODEL_ARCHITECTURES_MAPPING.values()]
        close = difflib.get_close_matches(arch, names, n=1, cutoff=0.5)
        raise UserError(f"unknown smp architecture '{arch}'" + (f" (did you mean {close[0]}?)" if close else ""),
                        f"choose one of: {', '.join(names)}")
    if encoder.startswith("tu-"):
        import timm

        if not timm.is_model(encoder[3:].split(".")[0]):
            raise UserError(f"unknown timm encoder '{encoder[3:]}' in smp:{name}", "name a timm model after tu-, e.g. tu-mobilenetv3_small_100")
    elif encoder not in smp.encoders.get_encoder_names():
        import difflib

        close = difflib.get_close_matches(encoder, smp.encoders.get_encoder_names(), n=3, cutoff=0.6)
        raise UserError(f"unknown smp encoder '{encoder}' in smp:{name}",
                        f"did you mean {', '.join(close)}?" if close else "see smp.encoders.get_encoder_names(), or use a timm encoder as tu-<name>")


def _pretrained_smp(name: str, flag: str) -> object:
    """encoder_weights for smp.create_model, once the hub is reachable (else the offline error)."""
    from lcdistill.models.hub import _offline_error, _reachable

    _, encoder = _smp_parts(name)
    if not _reachable("huggingface.co"):
        raise _offline_error(f"smp:{name}", flag)
    return True if encoder.startswith("tu-") else "imagenet"


def _pretrained_tv(name: str, num_classes: int, flag: str) -> dict:
    """get_model kwargs: the whole model's weights for VOC's 21 classes, else the backbone's."""
    import inspect
    from pathlib import Path

    import torchvision

    from lcdistill.models.hub import _offline_error, _reachable

    builder = torchvision.models.get_model_builder(name)
    if num_classes == 21:
        key, weights = "weights", torchvision.models.get_model_weights(name).DEFAULT
    else:  # the builder's own default backbone weights (ImageNet)
        key, weights = "weights_backbone", inspect.signature(builder).parameters["weights_backbone"].default
    cached = Path(torch.hub.get_dir()) / "checkpoints" / weights.url.split("/")[-1]
    if not cached.is_file() and not _reachable(weights.url.split("/")[2]):
        raise _offline_error(f"tv:{name}", flag)
    return {key: weights}


def build(arch: dict, num_classes: int, pretrained: bool = False, flag: str = "--weights") -> nn.Module:
    """The segmentation model of arch with num_classes output channels (see the module doc)."""
    source, name, kwargs = arch["source"], arch["name"], dict(arch.get("kwargs") or {})
    try:
        if source == "smp":
            import segmentation_models_pytorch as smp

            _check_smp_name(name)
            model_arch, encoder = _smp_parts(name)
            weights = _pretrained_smp(name, flag) if pretrained else None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return smp.create_model(model_arch, encoder_name=encoder, encoder_weights=weights, classes=num_classes, **kwargs)
        import inspect

        import torchvision

        params = inspect.signature(torchvision.models.get_model_builder(name)).parameters
        if "aux_loss" in params:
            kwargs.setdefault("aux_loss", True)
        weights = {"weights": None, "weights_backbone": None}
        if pretrained:
            weights.update(_pretrained_tv(name, num_classes, flag))
        if weights.get("weights") is not None:  # whole-model weights: 21 classes and the aux head as saved
            kwargs.pop("aux_loss", None)
            return torchvision.models.get_model(name, **weights, **kwargs)
        return torchvision.models.get_model(name, num_classes=num_classes, **weights, **kwargs)
    except (TypeError, ValueError, KeyError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"cannot build {spec_of(arch)} with {kwargs} ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                        "check student.kwargs in the recipe") from None


def data_config(input_size: int = DEFAULT_SIZE) -> dict:
    return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "input_size": [3, input_size, input_size],
            "interpolation": "bilinear", "crop_pct": 1.0}


def resolve(spec: str, num_classes: int, weights: str | None = None, pretrained: bool = True, flag: str = "--teacher-weights",
            kwargs: dict | None = None, keep_head: bool = True):
    """A segmentation model by name (+ a weights file, or hub weights) as a models.Loaded; None when
    spec names no segmentation model (the caller goes on to classifiers, run folders and files)."""
    from lcdistill.models.factory import from_weights_file
    from lcdistill.models.runs import Loaded

    arch = parse(spec)
    if arch is None:
        return None
    arch["kwargs"] = dict(kwargs or {})
    if arch["source"] == "smp":
        _check_smp_name(arch["name"])
    if weights:
        model, origin, rebuild = from_weights_file(arch, num_classes, weights, keep_head, spec_of(arch))
    else:
        if pretrained and keep_head and not (arch["source"] == "tv" and num_classes == 21):
            raise UserError(
                f"{spec_of(arch)} has no trained segmentation head for the data's {num_classes} classes",
                f"pass {flag} FILE with weights for these classes, or train it on this data first"
                f" with `lcdistill train --model {spec_of(arch)} --data DIR` and pass that run folder",
            )
        model = build(arch, num_classes, pretrained=pretrained, flag=flag)
        origin = spec_of(arch) + (" (pretrained)" if pretrained else "")
        rebuild = {**arch, "pretrained": pretrained}
    return Loaded(model, arch, num_classes, data_config(), origin, rebuild)


# ---- stages for LONDON: inside the encoder, dilation counted as stride ----------------------------
def encoder_of(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(path, module) of a segmentation model's encoder: torchvision's `backbone`, smp's `encoder`."""
    module = type(model).__module__
    if module.startswith("torchvision.models.segmentation") and isinstance(getattr(model, "backbone", None), nn.Module):
        return "backbone", model.backbone
    if module.startswith("segmentation_models_pytorch") and isinstance(getattr(model, "encoder", None), nn.Module):
        return "encoder", model.encoder
    return None


def _units(root: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The encoder's blocks in order: its children, looking inside a lone child and inside a Sequential of Sequentials (timm's blocks)."""
    children = list(root.named_children())
    if len(children) == 1 and list(children[0][1].children()):
        name, child = children[0]
        return _units(child, f"{prefix}{name}.")
    out = []
    for name, child in children:
        grand = list(child.children())
        if isinstance(child, nn.Sequential) and grand and all(isinstance(g, nn.Sequential) for g in grand):
            out += [(f"{prefix}{name}.{n}", g) for n, g in child.named_children()]
        else:
            out.append((f"{prefix}{name}", child))
    return out


def _dilation(module: nn.Module) -> int:
    return max([int(m.dilation[0]) for m in module.modules() if isinstance(m, nn.Conv2d)] or [1])


def encoder_stages(model: nn.Module, probe_size: int = 224):
    """LONDON stages of a segmentation model: found in its encoder only (a decoder or head is never
    paired), one per *nominal* stride, i.e. the stride the encoder would have without dilation.

    Dilated encoders (torchvision's resnets keep layer2-4 at stride 8, smp's DeepLabV3 keeps the last
    stage at 16) turn stride into dilation; counting each block's largest dilation so far as stride
    keeps one stage per depth, so layer3 and layer4 stay apart and pairing by stride pairs by depth.
    None for a model that is not a segmentation model."""
    from lcdistill.models.probe import ProbeResult, Stage, probe_twice
    from lcdistill.models.taps import unwrap

    found = encoder_of(unwrap(model))
    if found is None:
        return None
    path, encoder = found
    factor, running = {}, 1
    for name, unit in _units(encoder):
        running = max(running, _dilation(unit))
        factor[name] = running
    fired, fired2, size2 = probe_twice(encoder, probe_size)
    probe = ProbeResult(fired, probe_size, fired2, size2)
    interior = probe.transition_interior()

    def nominal(name: str) -> int | None:
        unit = next((u for u in factor if name == u or name.startswith(u + ".")), None)
        return None if unit is None else probe.stages[name].stride * factor[unit]

    last, boundary = {}, {}
    for name, _, _ in fired:
        if name not in probe.stages or nominal(name) is None:
            continue
        stride = nominal(name)
        last[stride] = name
        if name not in interior:
            boundary[stride] = name
    stages = []
    for stride in sorted(last):
        name = boundary.get(stride, last[stride])
        real = probe.stages[name].stride
        stages.append(Stage(f"{path}.{name}", probe.stages[name].channels, stride, real if real != stride else None))
    return stages
