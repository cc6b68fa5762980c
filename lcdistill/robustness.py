"""How far a model's metric falls when its input moves: seeded Gaussian noise and one-step FGSM.

Both perturb the images in [0, 1] pixel units, before each model's own mean/std normalisation, and
clip back to [0, 1]: a student, its teacher and its exported files see the same perturbed pixels,
so their numbers sit side by side. The noise of val image i comes from a generator seeded by
(seed, i), the same for every model, batch size and run. FGSM (Goodfellow et al., ICLR 2015)
needs the input's gradient, so only PyTorch models get it; exported files get the noise rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import torch

from lcdistill import artifacts
from lcdistill.data import eval_loader, normalize, sample_seed
from lcdistill.defaults import FGSM_EPSILONS, NOISE_SIGMAS, ROBUSTNESS_SEED
from lcdistill.errors import UserError
from lcdistill.measure import placed, score
from lcdistill.training import eval_runtime

NOTE = (f"noise: x + N(0, sigma^2) on the [0, 1] pixels, clipped to [0, 1], before each model's mean/std; the same noise for "
        f"every model (seed {ROBUSTNESS_SEED}). FGSM: one step x + eps * sign(grad_x loss), clipped; PyTorch models only. "
        "A smaller fall from 'clean': predictions that move less when the input moves (what a Lipschitz constant bounds).")


def key(level: float) -> str:
    """A sigma or epsilon as a JSON key: '0.05', '0.00392157' (6 significant digits)."""
    return f"{level:g}"


def parse_levels(text: str, flag: str) -> tuple[float, ...]:
    """'0.02,0.05' or '1/255,2/255' -> the levels (empty text: none), or a UserError naming the flag."""
    levels = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            value = float(Fraction(part))  # Fraction refuses nan and inf, and reads 2/255
        except (ValueError, ZeroDivisionError):
            raise UserError(f"{flag} {text!r}: {part!r} is not a number", f"pass comma-separated numbers in [0, 1] pixel units, e.g. {flag} 0.05,0.1 or 2/255") from None
        if not 0 <= value <= 1:
            raise UserError(f"{flag} {text!r}: {part} is outside [0, 1]", f"pass levels in [0, 1] pixel units, e.g. {flag} 0.05,0.1 or 2/255")
        if value not in levels:
            levels.append(value)
    return tuple(levels)


def unit_noise(seed: int, index: int, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise for val image `index`: the same for every model, batch size and run."""
    generator = torch.Generator().manual_seed(sample_seed(seed, 0, index))
    return torch.randn(tuple(shape), generator=generator)


def with_noise(loader: Iterable, sigma: float, seed: int) -> Iterator[tuple]:
    """The loader's batches with N(0, sigma^2) noise added to its [0, 1] images, clipped to [0, 1]."""
    index = 0
    for images, *rest in loader:
        noisy = [(image + sigma * unit_noise(seed, index + i, image.shape).to(image.device)).clamp(0, 1) for i, image in enumerate(images)]
        index += len(images)
        yield (torch.stack(noisy) if isinstance(images, torch.Tensor) else noisy, *rest)  # a detector's batch is a list


def fgsm(forward: Callable, loss: Callable, images: torch.Tensor, targets: torch.Tensor, mean, std, eps: float) -> torch.Tensor:
    """One FGSM step in [0, 1] pixel units: clip(x + eps * sign(d loss / d x), 0, 1). forward maps a
    normalised batch to predictions; only the input's gradient is computed (no parameter .grad)."""
    with torch.enable_grad():  # callers measure under no_grad
        x = images.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(forward(normalize(x, mean, std)), targets), x)
    return (images + eps * grad.sign()).clamp(0, 1).detach()


def with_fgsm(loader: Iterable, forward: Callable, loss: Callable, device: torch.device, mean, std, eps: float) -> Iterator[tuple]:
    """The loader's batches with each image replaced by its FGSM image against `forward`."""
    for images, targets, *rest in loader:
        images, targets = images.to(device), targets.to(device)
        yield (fgsm(forward, loss, images, targets, mean, std, eps), targets, *rest)


def measure(target, loader, device: torch.device, sigmas: Sequence[float] = NOISE_SIGMAS, epsilons: Sequence[float] = FGSM_EPSILONS,
            seed: int = ROBUSTNESS_SEED, clean: float | None = None) -> dict:
    """The task's checkpoint-picking metric (top-1 %, mIoU %) of one model (artifacts.Artifact or
    InMemory, fed with its own mean/std) on the loader's [0, 1] images: clean, under Gaussian noise
    per sigma and, for PyTorch models, under FGSM per epsilon. Plain JSON-able data:
    {"metric": <the metric's best>, "seed": 0, "clean": 97.5, "noise": {"0.05": 96.9, ...}, "fgsm": {"0.00392157": 80.1, ...}}."""
    meta, task = target.meta, target.task
    mean, std = meta["mean"], meta["std"]
    device = placed(target, device)
    best = task.metric(len(meta["classes"])).best

    def value(batches) -> float:
        return score(target.predict, batches, device, mean, std, task.metric(len(meta["classes"])), task)[best]

    # clean: the metric on this loader when the caller has it already (eval's main table), saving a pass
    result = {"metric": best, "seed": seed, "clean": value(loader) if clean is None else clean, "noise": {key(s): value(with_noise(loader, s, seed)) for s in sigmas}}
    if target.runtime == "pytorch" and epsilons and task.attackable:
        target.module.eval()

        result["fgsm"] = {key(e): value(with_fgsm(loader, target.predict, task.attack_loss, device, mean, std, e)) for e in epsilons}
    return result


def measure_run(path: str | Path, data: str | Path, device: str = "cpu", batch_size: int = 64, workers: int = 0, teacher: bool = False,
                sigmas: Sequence[float] = NOISE_SIGMAS, epsilons: Sequence[float] = FGSM_EPSILONS, seed: int = ROBUSTNESS_SEED) -> dict[str, dict]:
    """`measure` for a run folder's student (or an exported file) on DATA/val, and with teacher=True
    for the run's teacher on the same images: {"student": {...}, "teacher": {...}}."""
    target = artifacts.identify(path)
    splits = target.task.scan(data)
    artifacts.check_classes(target, splits.classes)
    loader = eval_loader(target.task.eval_dataset(splits.val, target.meta), batch_size, workers)
    run_on = eval_runtime(device).device
    results = {"student": measure(target, loader, run_on, sigmas, epsilons, seed)}
    model = artifacts.teacher_of(target) if teacher else None
    if model is not None:
        results["teacher"] = measure(model, loader, run_on, sigmas, epsilons, seed)
    return results


def level_label(level: float, kind: str) -> str:
    """A column header: 'noise 0.05', 'FGSM 2/255' (epsilons read best in 1/255 steps)."""
    if kind == "fgsm":
        steps = level * 255
        text = f"{round(steps)}/255" if math.isclose(steps, round(steps), abs_tol=1e-4) else f"{level:g}"
        return f"FGSM {text}"
    return f"noise {level:g}"


def columns(rows: Iterable[dict]) -> list[tuple[str, str, str]]:
    """(kind, key, header) of each level measured in some of the `measure` results, noise first: the table columns."""
    rows = list(rows)
    return [(kind, k, level_label(float(k), kind)) for kind in ("noise", "fgsm") for k in next((r[kind] for r in rows if r.get(kind)), {})]


__all__ = ["NOTE", "columns", "fgsm", "key", "level_label", "measure", "measure_run", "parse_levels", "unit_noise", "with_fgsm", "with_noise"]
