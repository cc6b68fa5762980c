"""lcdistill: compress vision models (image classifiers, semantic segmentation models, object detectors) into small,
fast students with Lipschitz-continuity-guided knowledge distillation (LONDON, Shang et al., ICCV 2021), then check
they are ready to ship: the task's metric beside the teacher, params, FLOPs, latency, ONNX / TorchScript / torch.export
files checked against PyTorch, int8.

The public API (docs/api.md has an example of each):

    Distiller    an nn.Module for your own training loop: Distiller(student, teacher, "kd+london")(batch) returns the
                 student's prediction and a dict of named losses (the task's supervised loss included)
    compress     `lcdistill compress` as a function: distil a teacher into a student -> Run (folder, metrics)
    train        `lcdistill train`: train or fine-tune a model (a teacher) -> Run
    evaluate     `lcdistill eval`: metric, params, FLOPs, latency of a run, its teacher and exports -> Evaluation
    export       `lcdistill export`: ONNX, TorchScript, torch.export, Hub folder, int8, checked against PyTorch -> Exported
    load         a run folder, weights file or export as a ready nn.Module (lcdistill.Model) with its preprocessing
    UserError    the one exception for input a user can fix: .message (the problem) and .fix

`import lcdistill` loads none of them (nor torch): each is imported on first use.
"""

from __future__ import annotations

import importlib

from lcdistill.errors import UserError

__version__ = "0.1.0"

# public name -> the module that defines it, imported on first use (module __getattr__, PEP 562)
_LAZY = {
    "Distiller": "lcdistill.distiller",
    "compress": "lcdistill.api", "train": "lcdistill.api", "evaluate": "lcdistill.api", "export": "lcdistill.api",
    "load": "lcdistill.api",
    "Run": "lcdistill.api", "Evaluation": "lcdistill.api", "Exported": "lcdistill.api",
    "Model": "lcdistill.inference", "Preprocessing": "lcdistill.inference",
}
__all__ = ["Distiller", "compress", "train", "evaluate", "export", "load", "UserError",
           "Run", "Evaluation", "Exported", "Model", "Preprocessing", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'lcdistill' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
