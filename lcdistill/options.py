"""The training options `compress` and `train` share, once: the recipe key each sets, its type, its CLI
flags and help. The CLI makes its flags from this table and lcdistill.compress / lcdistill.train take the
same names as keyword arguments. Importable without torch (the CLI builds --help from it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Option:
    key: str  # the recipe key it sets, dotted
    kind: type
    flags: tuple[str, ...]  # as the CLI spells it: ("--batch-size", "-b"), ("--channels-last/--no-channels-last",)
    help: str


TRAINING: dict[str, Option] = {o.flags[0].split("/")[0].removeprefix("--").replace("-", "_"): o for o in (
    Option("schedule.epochs", int, ("--epochs",), "Training epochs (schedule.epochs)."),
    Option("schedule.batch_size", int, ("--batch-size", "-b"), "Global batch size, split over torchrun processes."),
    Option("schedule.lr", float, ("--lr",), "Peak learning rate for the global batch."),
    Option("train.device", str, ("--device",), "auto | cpu | cuda"),
    Option("train.seed", int, ("--seed",), "Seed of the student's initial weights, the data order and augmentation."),
    Option("data.input_size", int, ("--input-size",), "Square input side in pixels (data.input_size)."),
    Option("train.amp_dtype", str, ("--amp-dtype",), "auto | bfloat16 | float16 | float32"),
    Option("train.channels_last", bool, ("--channels-last/--no-channels-last",), "NHWC memory format (default on CUDA)."),
    Option("train.compile", bool, ("--torchcompile/--no-torchcompile",), "torch.compile student and teacher."),
    Option("train.ema", bool, ("--model-ema/--no-model-ema",), "Keep an EMA of the student and ship it."),
    Option("data.workers", int, ("--workers", "-j"), "Data loader processes per training process."),
    Option("train.checkpoint_every", int, ("--checkpoint-every",), "Also checkpoint every N steps."),
    Option("schedule.max_grad_norm", float, ("--max-grad-norm",), "Clip the gradient norm."),
    Option("data.skip_bad_images", bool, ("--skip-bad-images/--no-skip-bad-images",), "Skip unreadable images instead of stopping."),
    Option("student.init", str, ("--init",), "Start the model trained from what fits of a run folder or weights file of another label set or task "
                                             "(a classifier's backbone, a COCO detector); its class layers fresh."),
    Option("qat.mode", str, ("--quantize",), "none | int8: train the student quantization-aware, as onnxruntime's int8 will run it (qat.* "
                                             "settings); `export --quantize int8` then uses what it learnt."),
    Option("task", str, ("--task",), "auto | classification | segmentation | detection (auto: from the data layout and the models named)."),
)}


def nested(flat: dict[str, Any]) -> dict:
    """{'a.b': 1, 'c': None} -> {'a': {'b': 1}}: a recipe layer of the values given (None: not given)."""
    layer: dict = {}
    for dotted, value in flat.items():
        if value is None:
            continue
        node = layer
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return layer


def given(values: dict[str, Any]) -> list[str]:
    """The CLI flags of the options given (not None), as typed."""
    return [TRAINING[name].flags[0].split("/")[0] for name, value in values.items() if value is not None]
