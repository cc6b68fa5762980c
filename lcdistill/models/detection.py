"""Object detectors: torchvision's, by name, and FCOS / RetinaNet over any resnet or mobilenet_v3 backbone
through an FPN. Registers the detection family.

Names (`--model`, `--teacher`, `--student`):

    tv:fcos_resnet50_fpn, tv:retinanet_resnet50_fpn(_v2), tv:fasterrcnn_resnet50_fpn(_v2),
    tv:fasterrcnn_mobilenet_v3_large_fpn, tv:fasterrcnn_mobilenet_v3_large_320_fpn, tv:ssdlite320_mobilenet_v3_large
        torchvision.models.detection, built with weights=None, weights_backbone=None (BatchNorm, not
        FrozenBN, from scratch) and num_classes from the data (+ 1 for the background class of Faster
        R-CNN and SSD).
    det:<FCOS|RetinaNet>:<backbone>
        FCOS or RetinaNet over resnet18/34/50/101 (layer2-4 through an FPN, P6-P7 on top: strides 8-128,
        as torchvision's R50 models) or mobilenet_v3_large/small (its stride 8-32 stages, the same grid), e.g. det:FCOS:resnet18 as a student of
        tv:fcos_resnet50_fpn: both give P3-P7 of 256 channels, so FPN maps and dense-head logits match.
        student.kwargs head_convs (FCOS: convs in each head tower, torchvision's 4) and fpn_channels (256)
        make it cheaper: at small input sizes the head towers hold most of the FLOPs. `make demo-det` trains
        teacher and student with head_convs 2 (on digit scenes at 64 px, the student learnt the classes far
        sooner: 65.6 AP50 against 44.5 after 8 epochs). fpn_channels other than the teacher's leaves the FPN
        terms (cwd, pkd) without levels to pair.

The input size the recipe trains at is the size the detector's own transform uses (min_size =
max_size = input size, set by the detection task): a 128 px scene is not upscaled to 800.
Pretrained (`--pretrained`): a torchvision detector's whole COCO weights, its class layers made fresh for the
data's classes (torchvision's fine-tuning recipe); det:<arch>:<backbone>'s ImageNet backbone (offline: the one-line error).
"""

from __future__ import annotations

import textwrap
from functools import lru_cache

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from lcdistill.errors import UserError
from lcdistill.models.hub import _offline_error, _reachable, tv_pretrained_weights
from lcdistill.models.probe import Stage
from lcdistill.models.registry import Family, register
from lcdistill.models.stages import find_stages
from lcdistill.models.loaded import quick_batchnorm
from lcdistill.models.transfer import load_matching

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
ARCHS = {"fcos": FCOS, "retinanet": RetinaNet}
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large", "mobilenet_v3_small")
HINT = ("a detector: tv:fcos_resnet50_fpn, tv:retinanet_resnet50_fpn, tv:fasterrcnn_mobilenet_v3_large_fpn, "
        "tv:ssdlite320_mobilenet_v3_large or det:<FCOS|RetinaNet>:<backbone> such as det:FCOS:resnet18")


@lru_cache(maxsize=1)
def tv_names() -> tuple[str, ...]:
    return tuple(n for n in torchvision.models.list_models(module=torchvision.models.detection)
                 if not n.startswith(("maskrcnn", "keypointrcnn")))  # boxes only


def label_offset(arch: dict) -> int:
    """1 where the detector counts a background class at label 0 (Faster R-CNN, SSD), else 0."""
    return int(arch["source"] == "tv" and arch["name"].startswith(("fasterrcnn", "ssd")))


def _custom(arch: dict, num_classes: int, pretrained: bool, flag: str, kwargs: dict) -> nn.Module:
    kind, _, backbone = arch["name"].partition(":")
    weights = None
    if pretrained:
        weights = torchvision.models.get_model_weights(backbone).DEFAULT
        if not _reachable(weights.url.split("/")[2]):
            raise _offline_error(f"det:{arch['name']}", flag)
    # from scratch every layer trains, with BatchNorm (FrozenBN keeps random statistics)
    norm = nn.BatchNorm2d if not pretrained else torchvision.ops.misc.FrozenBatchNorm2d
    extra = LastLevelP6P7(256, 256)
    if backbone.startswith("resnet"):
        body = resnet_fpn_backbone(backbone_name=backbone, weights=weights, norm_layer=norm, trainable_layers=5,
                                   returned_layers=[2, 3, 4], extra_blocks=extra)
    else:
        # the stages at strides 8, 16 and 32, as resnet's layer2-4: the same P3-P7 grid, so heads match one to one
        body = mobilenet_backbone(backbone_name=backbone, weights=weights, fpn=True, norm_layer=norm, trainable_layers=6,
                                  returned_layers=[2, 3, 4], extra_blocks=extra)
    model_cls = next(c for k, c in ARCHS.items() if k == kind.lower())
    head = _slim(body, kind.lower(), num_classes, kwargs)
    return model_cls(body, num_classes=num_classes, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, **head, **kwargs)


SLIM = ("fpn_channels", "head_convs")  # det: families' own kwargs, not the model class's


def _slim(body: nn.Module, kind: str, num_classes: int, kwargs: dict) -> dict:
    """A narrower FPN (kwargs fpn_channels, torchvision's is 256) and, for FCOS, fewer head convs (head_convs,
    FCOSHead's num_convs, 4): at small input sizes the 256-channel head towers hold most of a detector's
    FLOPs (det:FCOS:mobilenet_v3_small at 64 px: 0.28 s a batch of 16 to train, 0.09 s without the towers).
    Pops both from kwargs; returns the head argument for the model class."""
    channels, convs = (kwargs.pop(k, None) for k in SLIM)
    if channels is not None:
        fpn = body.fpn
        sizes = [block[0].in_channels for block in fpn.inner_blocks]
        body.fpn = torchvision.ops.FeaturePyramidNetwork(sizes, int(channels), extra_blocks=LastLevelP6P7(int(channels), int(channels)))
        body.out_channels = int(channels)
    if convs is None:
        return {}
    if kind != "fcos":
        raise TypeError("head_convs is an FCOS setting (RetinaNet's head has 4 convs)")
    return {"head": FCOSHead(body.out_channels, 1, num_classes, num_convs=int(convs))}


def build(arch: dict, num_classes: int, pretrained: bool = False, flag: str = "--weights") -> nn.Module:
    """The detector of arch for num_classes object classes (see the module doc)."""
    model = _build(arch, num_classes, pretrained, flag)
    if isinstance(model, FCOS):
        alive_box_regression(model)
    return model


def alive_box_regression(model: FCOS) -> None:
    """Start an FCOS box regression at a box twice its anchor's size (bias 1 in anchor units) rather than 0.

    torchvision's FCOS passes the regression through a ReLU, and with its bias at 0 a fresh head predicts
    0 for a side on most locations (99% of the `top` outputs at seed 1 on digit scenes). Where a side is
    0 everywhere, that ReLU passes no gradient, the GIoU loss sits at 1.0 for good and the run ends at 0
    mAP: 1 seed in 3 did so. From a bias of 1 each side starts above 0 on 89-100% of locations (seeds
    0-5), so gradient flows. Weights loaded afterwards (--weights, a run folder) replace it."""
    nn.init.constant_(model.head.regression_head.bbox_reg.bias, 1.0)


def _build(arch: dict, num_classes: int, pretrained: bool, flag: str) -> nn.Module:
    kwargs = dict(arch.get("kwargs") or {})
    n = num_classes + label_offset(arch)
    try:
        if arch["source"] == "det":
            return _custom(arch, n, pretrained, flag, kwargs)
        coco = tv_pretrained_weights(arch["name"], flag) if pretrained else None  # offline: the one-line error, before building
        size = kwargs.pop("min_size", None) if arch["name"].startswith("ssd") else None  # SSD resizes to a fixed size of its own
        if size:
            kwargs.pop("max_size", None)
        model = torchvision.models.get_model(arch["name"], num_classes=n, weights=None, weights_backbone=None, **kwargs)
        if size:
            model.transform.fixed_size = (size, size)
        if coco is None:
            quick_batchnorm(model)  # SSDlite sets 0.03, for 600 COCO epochs
        else:  # the whole COCO detector, its class layers made fresh for the data's classes (torchvision's fine-tuning recipe)
            load_matching(model, arch, coco.get_state_dict(progress=False), f"tv:{arch['name']} {coco}")
        return model
    except (TypeError, ValueError) as e:
        raise UserError(f"cannot build {arch['source']}:{arch['name']} with {kwargs} ({str(e).splitlines()[0]})",
                        "check student.kwargs in the recipe") from None


def set_input_size(model: nn.Module, arch: dict, size: int) -> None:
    """Make the detector's own transform resize to the recipe's input size (and record it in arch, so a
    rebuilt model does the same)."""
    arch.setdefault("kwargs", {}).update(min_size=size, max_size=size)
    if isinstance(model, SSD):
        model.transform.fixed_size = (size, size)
    else:
        model.transform.min_size, model.transform.max_size = (size,), size


def is_detector(model: nn.Module) -> bool:
    return isinstance(model, (GeneralizedRCNN, RetinaNet, FCOS, SSD))


def background_offset(model: nn.Module) -> int:
    """label_offset of a built detector: 1 for Faster R-CNN and SSD (label 0 is their background)."""
    return int(isinstance(model, (GeneralizedRCNN, SSD)))


def dense_head(model: nn.Module) -> bool:
    """Whether the detector scores every location and anchor itself (FCOS, RetinaNet): its logits can be distilled one to one."""
    return isinstance(model, (RetinaNet, FCOS))


class Detectors(Family):
    name = "detection"
    task = "detection"
    hint = HINT
    count_classes = 80  # COCO's
    curated = (("det", "FCOS:resnet18"), ("det", "FCOS:mobilenet_v3_large"), ("det", "RetinaNet:resnet18"),
               ("tv", "fasterrcnn_mobilenet_v3_large_320_fpn"), ("tv", "ssdlite320_mobilenet_v3_large"))

    def parse(self, spec: str) -> dict | None:
        if spec.startswith("det:"):
            parts = spec.split(":")
            if len(parts) != 3 or parts[1].lower() not in ARCHS or parts[2] not in BACKBONES:
                raise UserError(f"model name '{spec}' is not det:<FCOS|RetinaNet>:<backbone>",
                                f"write it like det:FCOS:resnet18 (backbones: {', '.join(BACKBONES)})")
            return {"source": "det", "name": f"{parts[1]}:{parts[2]}", "kwargs": {}}
        for prefix in ("tv:", "torchvision:", ""):
            if spec.startswith(prefix) and spec[len(prefix):] in tv_names():
                return {"source": "tv", "name": spec[len(prefix):], "kwargs": {}}
        return None

    def owns(self, arch: dict) -> bool:
        return arch.get("source") == "det" or (arch.get("source") == "tv" and arch.get("name") in tv_names())

    def build(self, arch: dict, num_classes: int, pretrained: bool = False, flag: str = "--weights") -> nn.Module:
        return build(arch, num_classes, pretrained, flag)

    def data_config(self, model: nn.Module) -> dict:
        size = int(model.transform.fixed_size[0]) if getattr(model.transform, "fixed_size", None) else int(model.transform.min_size[0])
        return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "input_size": [3, size, size], "interpolation": "bilinear", "crop_pct": 1.0}

    def check_head(self, arch: dict, num_classes: int, flag: str) -> None:
        spec = self.spec_of(arch)
        raise UserError(f"{spec} has no trained head for the data's {num_classes} classes",
                        f"pass {flag} FILE with weights for these classes, or train it on this data first"
                        f" with `lcdistill train --model {spec} --data DIR` and pass that run folder")

    def prefixes(self) -> tuple[str, ...]:
        return ("backbone.body.",)  # the trunk under an FPN (resnet's layer1-4, mobilenet's features)

    def class_layers(self, model: nn.Module) -> list[str]:
        """The layers that score (and, in Faster R-CNN, box) each class: dense heads' cls_logits, the ROI box
        predictor, SSD's classification head."""
        names = {n for n, _ in model.named_modules()}
        wanted = ("head.classification_head.cls_logits", "roi_heads.box_predictor")
        found = [n for n in wanted if n in names]
        if isinstance(model, SSD):
            found.append("head.classification_head")
        return found

    def prune_kept(self, model: nn.Module) -> list[str]:
        """The class and box outputs, and the FPN (its widths stay the teacher's, so pkd and cwd still pair its levels)."""
        if not isinstance(model, (FCOS, RetinaNet)):
            raise UserError(f"--student prune:R cuts FCOS and RetinaNet detectors, not {type(model).__name__}",
                            "pass a det:FCOS:... or det:RetinaNet:... teacher, or name a student")
        names = {n for n, _ in model.named_modules()}
        outputs = ("head.regression_head.bbox_reg", "head.regression_head.bbox_ctrness", "backbone.fpn")
        return self.class_layers(model) + [n for n in outputs if n in names]

    def prune_forward(self, model: nn.Module):
        """The backbone and the dense head on a batch: the full forward resizes a list of images and post-processes."""
        return lambda m, x: m.head(list(m.backbone(x).values()))

    def stages(self, model: nn.Module, probe_size: int):
        """The backbone's stages (before the FPN), found by probing the backbone body alone: a detector's
        own forward wants a list of images and resizes them."""
        if not is_detector(model):
            return None
        path, body = ("backbone.body", model.backbone.body) if hasattr(model.backbone, "body") else ("backbone", model.backbone)
        return [Stage(f"{path}.{s.name}", s.channels, s.stride, s.map_stride) for s in find_stages(body, probe_size)]

    def plain_usage(self, meta: dict) -> str:
        arch, n = meta["arch"], meta["num_classes"] + label_offset(meta["arch"])
        ours = {k: v for k, v in (arch.get("kwargs") or {}).items() if k in SLIM}
        kwargs = "".join(f", {k}={v!r}" for k, v in (arch.get("kwargs") or {}).items() if k not in SLIM)
        if arch["source"] == "tv":
            build = f'model = torchvision.models.get_model("{arch["name"]}", num_classes={n}, weights=None, weights_backbone=None{kwargs})'
        else:
            kind, _, backbone = arch["name"].partition(":")
            cls = {"fcos": "FCOS", "retinanet": "RetinaNet"}[kind.lower()]
            body = (f'resnet_fpn_backbone(backbone_name="{backbone}", weights=None, norm_layer=torch.nn.BatchNorm2d, trainable_layers=5, '
                    if backbone.startswith("resnet") else
                    f'mobilenet_backbone(backbone_name="{backbone}", weights=None, fpn=True, norm_layer=torch.nn.BatchNorm2d, trainable_layers=6, ')
            build = ("from torchvision.models.detection import FCOS, RetinaNet\n"
                     "from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone\n"
                     "from torchvision.ops.feature_pyramid_network import LastLevelP6P7\n"
                     f"backbone = {body}returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))\n")
            if "fpn_channels" in ours:
                c = int(ours["fpn_channels"])
                build += ("sizes = [block[0].in_channels for block in backbone.fpn.inner_blocks]\n"
                          f"backbone.fpn = torchvision.ops.FeaturePyramidNetwork(sizes, {c}, extra_blocks=LastLevelP6P7({c}, {c}))\n"
                          f"backbone.out_channels = {c}\n")
            if "head_convs" in ours:
                build += "from torchvision.models.detection.fcos import FCOSHead\n"
                kwargs = f", head=FCOSHead(backbone.out_channels, 1, {n}, num_convs={int(ours['head_convs'])})" + kwargs
            build += f"model = {cls}(backbone, num_classes={n}, image_mean={IMAGENET_MEAN}, image_std={IMAGENET_STD}{kwargs})"
        return textwrap.dedent(f"""\
            With torchvision alone (input: a list of [3, H, W] images in [0, 1]; the model normalises and resizes inside):

            ```python
            import torch, torchvision
            from huggingface_hub import snapshot_download
            from safetensors.torch import load_file

            folder = snapshot_download("ORG/NAME")  # or the path of this folder on disk
            """) + build + "\n" + textwrap.dedent(f"""\
            model.load_state_dict(load_file(f"{{folder}}/model.safetensors"))
            detections = model.eval()([torch.rand(3, {meta['input_size'][-1]}, {meta['input_size'][-1]})])  # boxes, scores, labels
            ```
            """) + (f"Labels count from 1 (0 is the background): label k is class k - 1 of config.json's label_names.\n\n" if label_offset(arch) else "")


DETECTORS = register(Detectors())
