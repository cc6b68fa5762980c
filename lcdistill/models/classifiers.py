"""Image classifiers: timm's and torchvision's, by name (`timm:NAME`, `tv:NAME`, or a bare NAME: timm
first, then torchvision), built with a head of the data's classes. Registers the classifier family."""

from __future__ import annotations

import textwrap

import timm
import torchvision
from torch import nn

from lcdistill.errors import UserError
from lcdistill.models.registry import Family, register
from lcdistill.models.loaded import quick_batchnorm
from lcdistill.models.hub import resolve_source, timm_pretrained_kwargs, torchvision_names, tv_pretrained_weights
from lcdistill.specs import split_source

REPO_PLACEHOLDER = "ORG/NAME"  # the card's repo id until `lcdistill push` writes the real one (hubfolder)

# Small timm and torchvision families, one or two sizes each (`lcdistill students`; shipped recipes come on top).
CURATED: tuple[tuple[str, str], ...] = (
    ("timm", "mobilenetv2_050"), ("timm", "mobilenetv2_100"), ("timm", "mobilenetv3_small_100"), ("timm", "mobilenetv3_large_100"),
    ("timm", "efficientnet_b0"), ("timm", "efficientnet_lite0"), ("timm", "ghostnet_100"), ("timm", "regnetx_002"),
    ("timm", "regnetx_004"), ("timm", "resnet18"), ("timm", "convnext_atto"), ("timm", "mobileone_s0"),
    ("tv", "mobilenet_v3_small"), ("tv", "mobilenet_v3_large"),
)


def _replace_tv_head(model: nn.Module, num_classes: int) -> None:
    """Point a torchvision model's last Linear at num_classes (its weights stay random)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError("this torchvision model has no Linear classifier to resize", "choose another model or train it with its own classes")
    path, old = linears[-1]
    parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    setattr(parent, path.rsplit(".", 1)[-1], nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def _init_head(model: nn.Module) -> None:
    """Small init for a new classifier. timm's EfficientNet-family init draws the head from
    U(+-1/sqrt(num_classes)): with 10 classes the first logits have a std near 10 and
    the first epoch is spent recovering from it."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    if isinstance(head, nn.Linear):
        nn.init.normal_(head.weight, std=0.01)
        if head.bias is not None:
            nn.init.zeros_(head.bias)


def data_config(model: nn.Module) -> dict:
    """mean/std/input size/interpolation/crop_pct from timm's pretrained_cfg (torchvision gets timm's ImageNet defaults)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return {
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "input_size": list(cfg["input_size"]),
        "interpolation": cfg.get("interpolation", "bilinear"),
        "crop_pct": float(cfg.get("crop_pct", 0.875)),
    }


class Classifiers(Family):
    name = "classifier"
    task = "classification"
    hint = "a classifier: a timm or torchvision classifier name such as resnet18 or tv:mobilenet_v3_small"
    count_classes = 1000
    curated = CURATED

    def parse(self, spec: str) -> dict | None:
        source, name = split_source(spec)
        if source not in ("timm", "tv", "auto"):
            return None  # prune:R is the cut teacher's (lcdistill.prune)
        known = timm.is_model(name) or name in torchvision_names()
        if source == "tv" and name not in torchvision_names():
            return None  # torchvision's segmentation and detection models are other families'
        if source == "auto" and not known:
            return None
        return {"source": resolve_source(source, name), "name": name, "kwargs": {}}

    def owns(self, arch: dict) -> bool:
        return arch.get("source") == "timm" or (arch.get("source") == "tv" and arch.get("name") in torchvision_names())

    def unknown(self, spec: str) -> UserError:
        try:
            resolve_source(*split_source(spec))  # the did-you-mean error
        except UserError as e:
            return e
        return super().unknown(spec)

    def build(self, arch: dict, num_classes: int, pretrained: bool = False, flag: str = "--weights") -> nn.Module:
        """Construct the architecture with a head of num_classes; optional hub weights (head re-initialised)."""
        source, name, kwargs = arch["source"], arch["name"], dict(arch.get("kwargs") or {})
        try:
            if source == "timm":
                extra = timm_pretrained_kwargs(name, flag) if pretrained else {}
                model = timm.create_model(name, num_classes=num_classes, **extra, **kwargs)
            elif pretrained:
                model = torchvision.models.get_model(name, weights=tv_pretrained_weights(name, flag), **kwargs)
                if num_classes != 1000:
                    _replace_tv_head(model, num_classes)
            else:
                model = torchvision.models.get_model(name, num_classes=num_classes, **kwargs)
                quick_batchnorm(model)
        except TypeError as e:
            raise UserError(f"cannot build {source}:{name} with {kwargs} ({e})", "check student.kwargs in the recipe") from None
        if not (pretrained and num_classes == 1000):  # keep a pretrained ImageNet head
            _init_head(model)
        return model

    def data_config(self, model: nn.Module) -> dict:
        return data_config(model)

    def prefixes(self) -> tuple[str, ...]:
        return ("", "features.")  # torchvision's mobilenets keep their trunk in `features`

    def class_layers(self, model: nn.Module) -> list[str]:
        """The classifier: timm's get_classifier, else the last Linear."""
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        found = [n for n, m in model.named_modules() if m is head and isinstance(m, nn.Linear)]
        return found or [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1:]

    def check_head(self, arch: dict, num_classes: int, flag: str) -> None:
        if num_classes != 1000:
            spec = self.spec_of(arch)
            raise UserError(
                f"{spec} comes with 1000 ImageNet classes but the data has {num_classes}",
                f"pass {flag} FILE with weights for these {num_classes} classes, or fine-tune it on this data first"
                f" with `lcdistill train --model {spec} --pretrained --data DIR` and pass that run folder",
            )

    def hub_kind(self, arch: dict) -> str:
        return {"timm": "timm", "tv": "tv"}[arch["source"]]

    def plain_usage(self, meta: dict) -> str:
        """How timm or torchvision loads the Hub folder, in code a user can paste."""
        arch, n, size = meta["arch"], meta["num_classes"], meta["input_size"][-1]
        if arch["source"] == "timm":
            return textwrap.dedent(f"""\
                With [timm](https://github.com/huggingface/pytorch-image-models) (config.json carries the classes and the preprocessing):

                ```python
                import timm, torch
                from PIL import Image

                model = timm.create_model("hf-hub:{REPO_PLACEHOLDER}", pretrained=True).eval()
                # or from this folder on disk: timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True)
                transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))
                with torch.no_grad():
                    logits = model(transform(Image.open("image.png").convert("RGB")).unsqueeze(0))
                print(model.pretrained_cfg["label_names"][logits.argmax(1).item()])
                ```
                """)
        mean, std, crop = meta["mean"], meta["std"], float(meta.get("crop_pct", 0.875))
        interp = meta.get("interpolation", "bilinear").upper()
        prep = textwrap.dedent(f"""\
            transform = T.Compose([T.Resize({int(size / crop)}, interpolation=T.InterpolationMode.{interp}), T.CenterCrop({size}),
                                   T.ToTensor(), T.Normalize({mean}, {std})])""")
        kwargs = "".join(f", {k}={v!r}" for k, v in (arch.get("kwargs") or {}).items())
        return textwrap.dedent(f"""\
            With [torchvision](https://pytorch.org/vision/) (timm cannot build torchvision architectures; config.json
            names the architecture, the classes and the preprocessing):

            ```python
            import json, torch, torchvision
            import torchvision.transforms as T
            from huggingface_hub import snapshot_download
            from PIL import Image
            from safetensors.torch import load_file

            folder = snapshot_download("{REPO_PLACEHOLDER}")  # or the path of this folder on disk
            model = torchvision.models.get_model("{arch['name']}", num_classes={n}{kwargs})
            model.load_state_dict(load_file(f"{{folder}}/model.safetensors"))
            model.eval()
            labels = json.load(open(f"{{folder}}/config.json"))["label_names"]
            """) + prep + "\n" + textwrap.dedent("""\
            with torch.no_grad():
                logits = model(transform(Image.open("image.png").convert("RGB")).unsqueeze(0))
            print(labels[logits.argmax(1).item()])
            ```
            """)


CLASSIFIERS = register(Classifiers())
