"""Image classification: ImageFolder data, timm/torchvision classifiers, cross-entropy, top-1/top-5."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from lcdistill import data
from lcdistill.data import gpu
from lcdistill.models.classifiers import CLASSIFIERS
from lcdistill.tasks.base import ExportSpec, Metric, Splits, Task


class TopK(Metric):
    """Top-1 and top-5 accuracy in percent (top-k is capped by the number of classes)."""

    best = "top1"
    columns = (("top-1 %", "top1"), ("top-5 %", "top5"))

    def __init__(self, device: torch.device | str = "cpu"):
        self.counts = torch.zeros(3, dtype=torch.float64, device=device)  # correct@1, correct@5, images

    def update(self, prediction: torch.Tensor, targets: torch.Tensor) -> None:
        logits = prediction.float()
        if self.counts.device != logits.device:
            self.counts = self.counts.to(logits.device)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top.eq(targets[:, None])
        self.counts += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(), torch.tensor(targets.numel(), device=hit.device)]).double()

    def sync(self, comm) -> None:
        comm.all_reduce(self.counts)

    def compute(self) -> dict[str, float]:
        c1, c5, n = self.counts.tolist()
        return {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1)}

    @property
    def count(self) -> int:
        return int(self.counts[2].item())


class Classification(Task):
    name = "classification"
    export = ExportSpec(input_names=["input"], output_names=["logits"], dynamic_axes={0: "batch"})
    hub_pipeline = "image-classification"
    model_hint = CLASSIFIERS.hint

    def detect(self, root: Path) -> bool:
        train = Path(root) / "train"
        if (train / "images").is_dir() and (train / "masks").is_dir():  # a segmentation set, not two classes
            return False
        return train.is_dir() and any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(train))

    def layout_hint(self) -> str:
        return "train/<class>/*.jpg and val/<class>/*.jpg (an ImageFolder)"

    def scan(self, root, check: bool = True, skip_bad: bool = False) -> Splits:
        train, val = data.scan(root, check=check, skip_bad=skip_bad)
        return Splits(train.classes, train, val, train.skipped + val.skipped)

    def datasets(self, splits: Splits, input_size: int, data_config: dict, recipe: dict, device: torch.device):
        settings, seed, skip_bad = recipe["data"], recipe["train"]["seed"], recipe["data"]["skip_bad_images"]
        train = data.ImageDataset(splits.train, data.transforms(input_size, data_config, settings, True), seed, skip_bad)
        val = data.ImageDataset(splits.val, data.eval_transform({**data_config, "input_size": [3, input_size, input_size]}), skip_bad=skip_bad)
        # JPEG folders on CUDA: decode and augment on the GPU instead (data.gpu_decode)
        train = gpu.pick(train, splits.train, input_size, data_config, recipe, device, training=True)
        val = gpu.pick(val, splits.val, input_size, data_config, recipe, device, training=False)
        return train, val

    def eval_dataset(self, split, meta: dict):
        return data.ImageDataset(split, data.eval_transform(meta))

    def loss(self, raw, targets, settings: dict) -> torch.Tensor:
        return F.cross_entropy(raw.float(), targets, label_smoothing=float(settings["label_smoothing"]))

    def metric(self, num_classes: int) -> Metric:
        return TopK()
