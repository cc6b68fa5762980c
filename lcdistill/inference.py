"""`lcdistill.load`: a student run, weights file or exported file as an nn.Module ready for inference, with the
preprocessing it expects (read from its metadata: what training recorded, or what export wrote into the file).

    model = lcdistill.load("runs/student")          # or student.safetensors, student.onnx, student.pt, student.pt2
    model.preprocessing                              # task, classes, mean, std, input_size, interpolation, crop_pct
    scores = model.predict([Image.open("seven.png")])   # PIL images or [0, 1] tensors -> the task's prediction
    scores = model(x)                                # x already normalised: [N, 3, H, W] (a detector: [0, 1] images)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lcdistill import artifacts, tasks
from lcdistill.errors import UserError
from lcdistill.tasks import Batch


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects of its input."""

    task: str  # classification | segmentation | detection
    classes: list[str]  # class names, in the order of the model's scores
    mean: tuple[float, ...]  # per-channel, of [0, 1] pixels
    std: tuple[float, ...]
    input_size: tuple[int, int, int]  # channels, height, width
    interpolation: str  # for resizing (timm's names)
    crop_pct: float  # classification's eval centre crop: resize to input / crop_pct, then crop the input size

    @classmethod
    def of(cls, meta: dict) -> Preprocessing:
        return cls(tasks.of_meta(meta).name, list(meta["classes"]), tuple(meta["mean"]), tuple(meta["std"]),
                   tuple(int(v) for v in meta["input_size"]), meta.get("interpolation", "bilinear"), float(meta.get("crop_pct", 1.0)))

    def transform(self):
        """PIL image -> [3, H, W] float tensor in [0, 1], as the model was evaluated (the task's eval pipeline: a
        classifier's resize and centre crop by crop_pct, a dense model's resize to the input size, a detector's
        longer side to it)."""
        meta = {"input_size": list(self.input_size), "interpolation": self.interpolation, "crop_pct": self.crop_pct}
        return tasks.get(self.task).image_transform(meta)


class Model(nn.Module):
    """A loaded student: call it on what the task feeds a model (normalised [N, 3, H, W]; a detector: [0, 1] images) for
    its prediction (class scores, per-pixel scores, or a detector's boxes/scores/labels per image); `predict` starts
    from PIL images or [0, 1] tensors. PyTorch weights are a submodule (`.model`: fine-tune it, move it with `.to`);
    an ONNX file runs on onnxruntime's CPU session."""

    def __init__(self, artifact: artifacts.Artifact):
        super().__init__()
        self.kind, self.file = artifact.kind, artifact.file
        self.meta = artifact.meta
        self.preprocessing = Preprocessing.of(self.meta)
        self.model = artifact.module  # None for ONNX
        self._task = artifact.task
        self._predict = artifact.predict
        self.eval()

    @property
    def classes(self) -> list[str]:
        return self.preprocessing.classes

    def forward(self, x):
        return self._predict(x)

    def preprocess(self, images):
        """PIL images (or one), or [0, 1] tensors ([3, H, W] each, or one [N, 3, H, W]) -> the model's input."""
        if not isinstance(images, (list, tuple)):
            images = list(images) if isinstance(images, torch.Tensor) and images.dim() == 4 else [images]
        transform, size = None, list(self.preprocessing.input_size[1:])
        batch = []
        for image in images:
            if isinstance(image, torch.Tensor):
                if image.dim() != 3 or not image.is_floating_point():
                    raise UserError(f"an image tensor must be float [3, H, W] in [0, 1], got {image.dtype} {list(image.shape)}",
                                    "scale pixels to [0, 1] (ToTensor does) and pass one [3, H, W] tensor per image")
                batch.append(image if list(image.shape[1:]) == size else F.interpolate(image[None], size, mode="bilinear", antialias=True)[0])
            elif hasattr(image, "convert"):  # a PIL image
                transform = transform or self.preprocessing.transform()
                batch.append(transform(image.convert("RGB")))
            else:
                raise UserError(f"cannot read a {type(image).__name__} as an image", "pass PIL images or [3, H, W] float tensors in [0, 1]")
        device = next(self.model.parameters()).device if self.model is not None and any(True for _ in self.model.parameters()) else "cpu"
        same = all(image.shape == batch[0].shape for image in batch)  # a detector's images keep their aspect: a list then
        x = torch.stack(batch).to(device) if same else [image.to(device) for image in batch]
        return self._task.inputs(Batch(x, None), self.preprocessing.mean, self.preprocessing.std)

    @torch.no_grad()
    def predict(self, images):
        """The prediction for PIL images or [0, 1] tensors (preprocessed as the model expects)."""
        return self(self.preprocess(images))


def load(target: str | Path, device: str = "cpu") -> Model:
    """The student of a run folder, weights file or exported file (see the module doc), on device (ONNX: CPU)."""
    artifact = artifacts.identify(target)
    model = Model(artifact)
    if device != "cpu":
        if artifact.kind == "onnx":
            raise UserError(f"{target} is an ONNX file, which lcdistill runs on onnxruntime's CPU session", "load it with device='cpu'")
        model.to(device)
    return model
