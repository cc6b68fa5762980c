"""Segmentation: ce vs kd vs cwd vs london on digit scenes, several seeds, mean +- std mIoU.

One teacher is trained from scratch on the scenes; every student method runs on the same seeds
with the same schedule. Writes a markdown table to benchmarks/results/seg_methods.md and prints it.

    python benchmarks/seg_methods.py --seeds 0 1 2 --images 1000 --epochs 8
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from lcdistill import recipe as recipes, run as runs
from lcdistill.data.scenes import write_digit_scenes
from publish import publish  # benchmarks/publish.py: scripts run from this folder

SCHEDULE = {"batch_size": 16, "optimizer": "adamw", "weight_decay": 1e-4, "warmup_epochs": 1}


def train(layers: list[dict], data: Path, teacher: str | None, out: Path) -> dict:
    prepared = runs.prepare(recipes.build(layers), str(data), teacher, None, str(out))
    return runs.run(prepared, Console(file=io.StringIO()))


def compare(args, work: Path) -> None:
    scenes = work / "scenes"
    n_train, n_val = write_digit_scenes(scenes, size=args.size, images=args.images)
    start = time.time()
    data = {"data": {"input_size": args.size, "workers": 0}, "train": {"device": "cpu"}}
    teacher = train([{"student": {"source": "smp", "name": args.teacher}, "method": "ce",
                      "schedule": {**SCHEDULE, "epochs": args.teacher_epochs, "lr": args.lr}}, data], scenes, None, work / "teacher")
    print(f"teacher {args.teacher}: mIoU {teacher['student']['miou']:.2f}", flush=True)
    results: dict[str, list[float]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            layers = [{"student": {"source": "smp", "name": args.student}, "method": method, "train": {"seed": seed},
                       "schedule": {**SCHEDULE, "epochs": args.epochs, "lr": args.lr}}, data]
            s = train(layers, scenes, str(work / "teacher") if method != "ce" else None, work / f"{method}-{seed}")
            results[method].append(s["student"]["miou"])
            print(method, seed, f"{s['student']['miou']:.2f}", flush=True)
    lines = [
        f"## digit scenes ({n_train} train / {n_val} val, {args.size} px): smp {args.student} from smp {args.teacher}, seeds {args.seeds}",
        "",
        f"Teacher trained from scratch for {args.teacher_epochs} epochs: val mIoU {teacher['student']['miou']:.2f}. Every student: "
        f"{args.epochs} epochs, batch 16, AdamW lr {args.lr} (1 warm-up epoch, cosine), the recipe defaults of each term "
        "(kd: T 4; cwd: T 4, weight 3; london: ce + kd + the Lipschitz term on encoder stage pairs, alpha 1, warm-up 3 epochs).",
        "",
        "| method | mIoU % (mean +- std) | per seed |",
        "|---|---|---|",
    ]
    for method, values in results.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"| {method} | {statistics.mean(values):.2f} +- {std:.2f} | {', '.join(f'{v:.1f}' for v in values)} |")
    lines += ["", f"Took {time.time() - start:.0f} s on {torch.get_num_threads()} CPU threads.", ""]
    publish("\n".join(lines), args.out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--teacher-epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.005)
    ap.add_argument("--teacher", default="Unet:resnet18")
    ap.add_argument("--student", default="Unet:tu-mobilenetv3_small_100")
    ap.add_argument("--methods", nargs="+", default=["ce", "kd", "cwd", "london"])
    ap.add_argument("--out", default="benchmarks/results/seg_methods.md")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lcd-seg-bench-"))
    try:
        compare(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
