"""Segmentation: ce vs kd vs cwd vs london vs cwd+london on digit scenes, several seeds, mean +- std mIoU.

One teacher is trained from scratch on the scenes; every student method runs on the same seeds
with the same schedule. Writes a markdown table to benchmarks/results/seg_methods.md and prints it.
The defaults are `make demo-seg`'s setting (data, models, schedule, kd and london settings), so the
table says how the demo's student would fare with each method:

    python benchmarks/seg_methods.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lcdistill.data.scenes import write_digit_scenes
from methods import base_of, mean_std, train  # benchmarks/methods.py: the classification twin of this benchmark
from publish import publish  # benchmarks/publish.py: scripts run from this folder

# as the Makefile's demo-seg: SEG (schedule and data) and the student's term settings
SCHEDULE = {"batch_size": 8, "optimizer": "adamw", "weight_decay": 1e-4, "warmup_epochs": 1}
DATA = {"hflip": 0.0, "scale": [0.75, 1.25], "workers": 0}
TERMS = {"kd": {"temperature": 1.0}, "london": {"alpha": 0.3}}


def table(results: dict[str, list[float]]) -> list[str]:
    """Markdown rows: mean +- std mIoU, per seed, and for a Lipschitz variant the seed-by-seed
    difference to its base method (mean +- std) when the base ran too."""
    lines = ["| method | mIoU % (mean +- std) | paired vs base | per seed |", "|---|---|---|---|"]
    for method, values in results.items():
        base = base_of(method)  # london pairs with kd (it is kd + the term), X+london with X
        paired = ""
        if base in results and len(results[base]) == len(values) > 1:
            diffs = [v - b for v, b in zip(values, results[base])]
            paired = f"{'+' if statistics.mean(diffs) >= 0 else ''}{mean_std(diffs)} vs {base}"
        lines.append(f"| {method} | {mean_std(values)} | {paired} | {', '.join(f'{v:.1f}' for v in values)} |")
    return lines


def compare(args, work: Path) -> None:
    scenes = work / "scenes"
    n_train, n_val = write_digit_scenes(scenes, size=args.size, images=args.images)
    start = time.time()
    data = {"data": {**DATA, "input_size": args.size}, "train": {"device": "cpu"}}
    teacher = train([{"student": {"source": "smp", "name": args.teacher}, "method": "ce",
                      "schedule": {**SCHEDULE, "epochs": args.teacher_epochs, "lr": args.teacher_lr}}, data], scenes, None, work / "teacher")
    print(f"teacher {args.teacher}: mIoU {teacher['student']['miou']:.2f}", flush=True)
    results: dict[str, list[float]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            layers = [{"student": {"source": "smp", "name": args.student}, "method": method, "train": {"seed": seed},
                       "schedule": {**SCHEDULE, "epochs": args.epochs, "lr": args.lr}, **TERMS}, data]
            s = train(layers, scenes, str(work / "teacher") if method != "ce" else None, work / f"{method}-{seed}")
            results[method].append(s["student"]["miou"])
            print(method, seed, f"{s['student']['miou']:.2f}", flush=True)
    lines = [
        f"## digit scenes ({n_train} train / {n_val} val, {args.size} px): smp {args.student} from smp {args.teacher}, seeds {args.seeds}",
        "",
        f"Teacher trained from scratch for {args.teacher_epochs} epochs (AdamW lr {args.teacher_lr}): val mIoU {teacher['student']['miou']:.2f}. "
        f"Every student: {args.epochs} epochs, batch 8, AdamW lr {args.lr} (1 warm-up epoch, cosine), no flips, scale 0.75-1.25, "
        "as `make demo-seg` (kd: T 1; cwd: its recipe defaults, T 4, weight 3; london: ce + kd at T 1 + the Lipschitz term "
        "on encoder stage pairs, alpha 0.3, warm-up 3 epochs; cwd+london: ce + cwd + that term). Paired: seed by seed, "
        "london against kd (london is kd + the term), X+london against X.",
        "",
    ] + table(results)
    lines += ["", f"Took {time.time() - start:.0f} s on {torch.get_num_threads()} CPU threads.", ""]
    publish("\n".join(lines), args.out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--images", type=int, default=1600)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--teacher-epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.04, help="the students' peak lr")
    ap.add_argument("--teacher-lr", type=float, default=0.008)
    ap.add_argument("--teacher", default="FPN:resnet18")
    ap.add_argument("--student", default="FPN:tu-mobilenetv3_small_100")
    ap.add_argument("--methods", nargs="+", default=["ce", "kd", "cwd", "london", "cwd+london"])
    ap.add_argument("--out", default="benchmarks/results/seg_methods.md")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lcd-seg-bench-"))
    try:
        compare(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
