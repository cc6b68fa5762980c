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
"imagenet", tu-: timm's), or torchvision's whole model (COCO with VOC labels): as it is when the data has
VOC's 21 classes, else with its class layers made fresh for the data's. Offline, the same one-line error
as for classifiers, naming a weights file instead.

Data config: ImageNet mean/std, 512 px unless the recipe (or a teacher run) says otherwise, crop_pct
1.0 (eval resizes the whole image, never centre-crops), bilinear.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import torch
from torch import nn

from lcdistill.errors import UserError
from lcdistill.models.registry import Family, register
from lcdistill.models.hub import _offline_error, _reachable, tv_pretrained_weights
from lcdistill.models.probe import ProbeResult, Stage, probe_twice
from lcdistill.models.taps import unwrap
from lcdistill.models.loaded import quick_batchnorm
from lcdistill.models.transfer import load_matching

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
DEFAULT_SIZE = 512
NAME_HINT = "a model with a dense (per-pixel) output: tv:lraspp_mobilenet_v3_large, tv:fcn_resnet50, tv:deeplabv3_resnet50 or smp:<Arch>:<encoder> such as smp:DeepLabV3Plus:mobilenet_v2"


@lru_cache(maxsize=1)
def tv_names() -> tuple[str, ...]:
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models.segmentation))


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
    _, encoder = _smp_parts(name)
    if not _reachable("huggingface.co"):
        raise _offline_error(f"smp:{name}", flag)
    return True if encoder.startswith("tu-") else "imagenet"


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
        whole = tv_pretrained_weights(name, flag) if pretrained else None
        if whole is not None and num_classes == 21:  # VOC's 21 classes: the model and its aux head as saved
            kwargs.pop("aux_loss", None)
            return torchvision.models.get_model(name, weights=whole, weights_backbone=None, **kwargs)
        model = torchvision.models.get_model(name, num_classes=num_classes, weights=None, weights_backbone=None, **kwargs)
        if whole is None:
            quick_batchnorm(model)
        else:  # the COCO-VOC model, its class layers made fresh for the data's classes
            load_matching(model, arch, whole.get_state_dict(progress=False), f"tv:{name} {whole}")
        return model
    except (TypeError, ValueError, KeyError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"cannot build {spec_of(arch)} with {kwargs} ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                        "check student.kwargs in the recipe") from None


def data_config(input_size: int = DEFAULT_SIZE) -> dict:
    return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "input_size": [3, input_size, input_size],
            "interpolation": "bilinear", "crop_pct": 1.0}


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


# ---- the Hub folder's card: building the model with torchvision or smp alone ------------------------
def plain_usage(meta: dict) -> str:
    """How torchvision or segmentation_models_pytorch builds the student without lcdistill (as `build` does)."""
    import inspect
    import textwrap

    import torchvision

    arch, n = meta["arch"], meta["num_classes"]
    kwargs = dict(arch.get("kwargs") or {})
    size = meta["input_size"][-1]
    extra = lambda: "".join(f", {k}={v!r}" for k, v in kwargs.items())  # noqa: E731
    if arch["source"] == "tv":
        try:
            if "aux_loss" in inspect.signature(torchvision.models.get_model_builder(arch["name"])).parameters:
                kwargs.setdefault("aux_loss", True)  # the saved weights hold the auxiliary head lcdistill trained
        except ValueError:
            return ""
        build = (f"import torchvision\nmodel = torchvision.models.get_model(\"{arch['name']}\", num_classes={n}, weights=None, "
                 f"weights_backbone=None{extra()})")
        call, library = 'model(x)["out"]', "torchvision"
    else:
        model_arch, _, encoder = arch["name"].partition(":")
        build = (f"import segmentation_models_pytorch as smp\nmodel = smp.create_model(\"{model_arch}\", encoder_name=\"{encoder}\", "
                 f"encoder_weights=None, classes={n}{extra()})")
        call, library = "model(x)", "segmentation_models_pytorch"
    return textwrap.dedent(f"""\
        With {library} alone (config.json carries the classes and the preprocessing: resize to {size}x{size}, normalise with
        mean {meta['mean']} and std {meta['std']}):

        ```python
        import torch
        import torch.nn.functional as F
        from huggingface_hub import snapshot_download
        from safetensors.torch import load_file
        """) + build + "\n" + textwrap.dedent(f"""\
        folder = snapshot_download("ORG/NAME")  # or the path of this folder on disk
        model.load_state_dict(load_file(f"{{folder}}/model.safetensors"))
        model.eval()
        with torch.no_grad():  # x: a normalised [N, 3, H, W] batch
            logits = F.interpolate({call}, size=x.shape[-2:], mode="bilinear", align_corners=False)  # [N, {n}, H, W]
        ```

        """)


class SegmentationModels(Family):
    """torchvision's segmentation models and segmentation_models_pytorch's (see the module doc)."""

    name = "segmentation"
    task = "segmentation"
    hint = NAME_HINT
    count_classes = 21  # VOC's
    curated = (
        ("tv", "lraspp_mobilenet_v3_large"), ("tv", "deeplabv3_mobilenet_v3_large"), ("smp", "DeepLabV3Plus:mobilenet_v2"),
        ("smp", "Unet:resnet18"), ("smp", "Unet:tu-mobilenetv3_small_100"), ("smp", "FPN:efficientnet-b0"),
    )

    def parse(self, spec: str) -> dict | None:
        arch = parse(spec)
        if arch is not None and arch["source"] == "smp":
            _check_smp_name(arch["name"])
        return arch

    def owns(self, arch: dict) -> bool:
        return arch.get("source") == "smp" or (arch.get("source") == "tv" and arch.get("name") in tv_names())

    def build(self, arch: dict, num_classes: int, pretrained: bool = False, flag: str = "--weights") -> nn.Module:
        return build(arch, num_classes, pretrained, flag)

    def data_config(self, model: nn.Module) -> dict:
        return data_config()

    def check_head(self, arch: dict, num_classes: int, flag: str) -> None:
        if not (arch["source"] == "tv" and num_classes == 21):
            spec = self.spec_of(arch)
            raise UserError(
                f"{spec} has no trained segmentation head for the data's {num_classes} classes",
                f"pass {flag} FILE with weights for these classes, or train it on this data first"
                f" with `lcdistill train --model {spec} --data DIR` and pass that run folder",
            )

    def stages(self, model: nn.Module, probe_size: int):
        return encoder_stages(model, probe_size)

    def prefixes(self) -> tuple[str, ...]:
        return ("encoder.", "encoder.model.", "backbone.")  # smp's encoders (timm's under tu-), torchvision's backbone

    def class_layers(self, model: nn.Module) -> list[str]:
        """The final convolutions that score the classes: smp's segmentation (and aux) head, torchvision's last classifier convs."""
        names = [n for n, _ in model.named_modules()]
        wanted = ("segmentation_head", "classification_head", "classifier.4", "aux_classifier.4", "classifier.low_classifier",
                  "classifier.high_classifier")
        return [n for n in wanted if n in names]

    def library(self, arch: dict) -> str:
        return "segmentation_models_pytorch" if arch["source"] == "smp" else "torchvision"

    def plain_usage(self, meta: dict) -> str:
        return plain_usage(meta)


SEGMENTATION = register(SegmentationModels())
