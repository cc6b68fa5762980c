"""Guardrails: settings that run but are very likely mistakes, said in one line each before training.

Each check is a pure function of numbers (tested without training); `check(prepared)` gathers
those numbers from a prepared run (lcdistill.run.Prepared) and `warn` prints the lines. None is an
error: the run goes on as asked.
"""

from __future__ import annotations

import math
import statistics
import warnings
from typing import Iterable, Sequence

from lcdistill import methods

# An image is "much smaller" than the input when its median side is under this share of it.
SMALL_IMAGE_SHARE = 0.5
# Fewer optimizer steps than this in an epoch: per-epoch schedules, logging and checkpoints are coarse.
MIN_STEPS_PER_EPOCH = 10
# EMA is still mostly its initial (random) weights while decay**steps is above this.
EMA_MEMORY = 0.1
# How many training images the size check reads (headers only).
SIZE_SAMPLE = 64


# ---- the pure checks ------------------------------------------------------------------------
def image_size(median_side: float | None, input_size: int) -> str | None:
    """Training images much smaller than the input size: the model mostly sees upscaling blur."""
    if not median_side or median_side >= SMALL_IMAGE_SHARE * input_size:
        return None
    side = int(round(median_side))
    return (f"training images are about {side} px (median side) but the input size is {input_size} px, so they are upscaled "
            f"{input_size / median_side:.0f}x: pass --input-size {side} (or near it; data.input_size in a recipe)")


def shorter(epochs: int) -> int:
    """A warm-up to suggest: a fifth of training, at least one epoch where training has two or more."""
    return max(epochs // 5, 1 if epochs > 1 else 0)


def warmup(epochs: int, warmup_epochs: float) -> str | None:
    """Warm-up as long as training: the learning rate never reaches its peak, and cosine never decays."""
    if not warmup_epochs or warmup_epochs < epochs:
        return None
    return (f"warm-up lasts {warmup_epochs:g} of {epochs} epochs, so the learning rate never reaches --lr: "
            f"lower it with --set schedule.warmup_epochs={shorter(epochs)} or raise --epochs")


def term_warmup(section: str, key: str, epochs: int, warmup_epochs: float) -> str | None:
    """A term's own ramp-in (dkd.warmup_epochs) as long as training or longer: it never reaches its full weight."""
    if not warmup_epochs or warmup_epochs < epochs:
        return None
    return (f"{section} ramps in over {section}.{key}={warmup_epochs:g} of {epochs} epochs, so it never reaches its full weight: "
            f"lower it with --set {section}.{key}={shorter(epochs)} or raise --epochs")


def term_warmups(epochs: int, warmups: Iterable[tuple[str, str, float]]) -> list[str]:
    """term_warmup for each (section, key, value) of a method's terms that ramp in."""
    found = [term_warmup(section, key, epochs, value) for section, key, value in warmups]
    return [line for line in found if line]


def steps_per_epoch(images: int, batch_size: int, world: int = 1) -> int:
    """Optimizer steps in one epoch as the trainer's loader makes them (drop_last, batch split over processes)."""
    per_rank_batch = max(1, batch_size // max(1, world))
    return (images // max(1, world)) // per_rank_batch


def few_steps(steps: int, images: int, batch_size: int) -> str | None:
    """Very few optimizer steps per epoch: batch size near the data size."""
    if steps >= MIN_STEPS_PER_EPOCH:
        return None
    suggest = max(1, 2 ** int(math.log2(max(1, images // MIN_STEPS_PER_EPOCH))))
    return (f"an epoch is only {steps} optimizer step{'s' if steps != 1 else ''} ({images:,} training images / batch {batch_size}): "
            f"lower --batch-size (e.g. {suggest})")


def ema(enabled: bool, decay: float, total_steps: int) -> str | None:
    """EMA on with too few steps to forget the initial weights (decay**steps above EMA_MEMORY)."""
    if not enabled or total_steps <= 0 or decay ** total_steps <= EMA_MEMORY:
        return None
    fitting = EMA_MEMORY ** (1 / total_steps)  # the largest decay that forgets in total_steps
    fitting = math.floor(fitting * 1000) / 1000
    return (f"EMA keeps {100 * decay ** total_steps:.0f}% of the initial weights after all {total_steps:,} steps (decay {decay:g}), "
            f"so the shipped model is mostly untrained: lower it with --set train.ema_decay={fitting:g}, train longer, or drop --model-ema")


def schedule(epochs: int, warmup_epochs: float, images: int, batch_size: int, world: int = 1,
             ema_on: bool = False, ema_decay: float = 0.999) -> list[str]:
    """The schedule checks from a recipe's numbers and the training set size."""
    steps = steps_per_epoch(images, batch_size, world)
    found = [warmup(epochs, warmup_epochs), few_steps(steps, images, batch_size), ema(ema_on, ema_decay, steps * epochs)]
    return [line for line in found if line]


# ---- reading what they need -----------------------------------------------------------------
def sample_paths(samples: Sequence, limit: int = SIZE_SAMPLE) -> list[str]:
    """Up to `limit` image paths spread evenly over a split's samples ((image, target) tuples or paths)."""
    if not samples:
        return []
    step = max(1, len(samples) // limit)
    picked = list(samples)[::step][:limit]
    return [str(s[0] if isinstance(s, (tuple, list)) else s) for s in picked]


def median_side(paths: Iterable[str]) -> float | None:
    """Median over images of their shorter side, from the headers only; None when none can be read."""
    from PIL import Image

    sides = []
    for path in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(path) as im:
                    sides.append(min(im.size))
        except Exception:  # an unreadable file is the data checks' business, not ours
            continue
    return float(statistics.median(sides)) if sides else None


def check(p) -> list[str]:
    """The warning lines for a prepared run (lcdistill.run.Prepared)."""
    recipe, train = p.recipe, p.splits.train
    samples = getattr(train, "samples", train)
    lines = [image_size(median_side(sample_paths(samples)), p.input_size)]
    s = recipe["schedule"]
    lines += schedule(int(s["epochs"]), float(s["warmup_epochs"] or 0), len(samples), int(s["batch_size"]), p.runtime.world,
                      bool(recipe["train"]["ema"]), float(recipe["train"]["ema_decay"]))
    ramps = [(t.section, t.warmup_key, float(recipe[t.section][t.warmup_key] or 0)) for t in methods.terms_of(recipe["method"]) if t.warmup_key]
    lines += term_warmups(int(s["epochs"]), ramps)
    lines += p.task.checks(p)
    return [line for line in lines if line]


def warn(p, console) -> list[str]:
    """Print check(p) on the console, one `warning:` line each; returns the lines."""
    from rich.markup import escape

    lines = check(p)
    for line in lines:
        console.print(f"[bold yellow]warning[/]: {escape(line)}", soft_wrap=True, highlight=False)
    return lines
