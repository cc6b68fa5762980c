"""Segmentation: kd and cwd, each with and without `+london`, on digit scenes, several seeds, paired by seed.

One teacher is trained from scratch on the scenes (or --teacher-run reuses one); every student method runs
on the same seeds with the same schedule. The defaults are `make demo-seg`'s setting (data, models,
schedule, kd and london settings), so the table says how the demo's student would fare with each
method. A `X+london` row is compared with its `X` row seed by seed: the paired difference's mean with its
standard error (std / sqrt(n)) and how many seeds went each way. Writes the raw numbers to
benchmarks/results/seg_methods.json after every run and appends a markdown table to seg_methods.md:

    python benchmarks/seg_methods.py --jobs 2 --threads 1
    python benchmarks/seg_methods.py --render benchmarks/results/seg_methods.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from lcdistill.data.scenes import write_digit_scenes
from methods import Record, base_of, by_method, late_change, load_raw, mean_std, paired, run_options, run_or_render, student_run, train  # benchmarks/methods.py: the classification twin
from publish import publish  # benchmarks/publish.py: scripts run from this folder

# as the Makefile's demo-seg: SEG (schedule and data) and the student's term settings
SCHEDULE = {"batch_size": 8, "optimizer": "adamw", "weight_decay": 1e-4, "warmup_epochs": 1}
DATA = {"hflip": 0.0, "scale": [0.75, 1.25], "workers": 0}
TERMS = {"kd": {"temperature": 1.0}, "london": {"alpha": 0.3}}
METHODS = ["kd", "kd+london", "cwd", "cwd+london"]


def layers(args, model: str, method: str, seed: int, epochs: int, lr: float) -> list[dict]:
    return [{"student": {"source": "smp", "name": model}, "method": method, "train": {"seed": seed, "device": "cpu"},
             "schedule": {**SCHEDULE, "epochs": epochs, "lr": lr}, **TERMS},
            {"data": {**DATA, "input_size": args.size}}]


def one_run(job: dict) -> dict:
    args = argparse.Namespace(**job["args"])
    s, val_curve, seconds = student_run(job, layers(args, args.student, job["method"], job["seed"], args.epochs, args.lr), "val_miou")
    return {"method": job["method"], "seed": job["seed"], "miou": s["miou"], "pixel_acc": s.get("pixel_acc"), "seconds": seconds, "curve": val_curve}


def render(raws: list[Path], out: str | None) -> None:
    """The markdown table of a raw results file."""
    saved = load_raw(raws)
    args, results, teacher = argparse.Namespace(**saved["args"]), saved["runs"], saved["teacher"]
    rows, seeds = by_method(results)
    lines = [f"## digit scenes ({saved['n_train']} train / {saved['n_val']} val, {args.size} px): smp {args.student} from smp {args.teacher}, seeds {seeds}",
             "",
             *[f"`python benchmarks/seg_methods.py {c}`" for c in saved["command"].split(" ; ")],
             "",
             f"Teacher trained from scratch for {args.teacher_epochs} epochs (AdamW lr {args.teacher_lr}): val mIoU {teacher['miou']:.2f}. "
             f"Every student: {args.epochs} epochs, batch 8, AdamW lr {args.lr} (weight decay 1e-4, 1 warm-up epoch, cosine), no flips, "
             "scale 0.75-1.25, as `make demo-seg` (kd: T 1; cwd: its recipe defaults, T 4, weight 3; london: the Lipschitz term "
             "on encoder stage pairs, alpha 0.3, warm-up 3 epochs). Paired: this row minus its row without `+london`, seed by seed, "
             f"mean (standard error), seeds up and down. Last 3 epochs: the val mIoU after the last epoch minus three epochs before, "
             f"mean over seeds. Took {saved['seconds']:.0f} s, {args.jobs} jobs x {args.threads} CPU threads.",
             "",
             "| method | mIoU % (mean +- std) | paired vs base | per seed | last 3 epochs |", "|---|---|---|---|---|"]
    for m in rows:
        base = base_of(m)
        diff = paired(rows[m], rows[base], lambda r: r["miou"], counts=True) if base in rows else ""
        per_seed = ", ".join(f"{r['miou']:.1f}" for r in rows[m])
        lines.append(f"| {m} | {mean_std([r['miou'] for r in rows[m]])} | {diff} | {per_seed} | {late_change(rows[m], 'curve')} |")
    publish("\n".join(lines) + "\n", out)


def compare(args, work: Path) -> None:
    scenes = work / "scenes"
    n_train, n_val = write_digit_scenes(scenes, size=args.size, images=args.images)
    start = time.time()
    teacher = Path(args.teacher_run) if args.teacher_run else work / "teacher"
    if not args.teacher_run:
        train(layers(args, args.teacher, "ce", 0, args.teacher_epochs, args.teacher_lr), scenes, None, teacher)
    t = json.loads((teacher / "student.json").read_text())  # what the run shipped, with its val scores
    print(f"teacher {args.teacher}: mIoU {t['miou']:.2f}", flush=True)
    record = Record(args.out, {"args": vars(args), "command": " ".join(args.argv), "teacher": {"miou": t["miou"]},
                               "n_train": n_train, "n_val": n_val}, start)
    # seed by seed, so a benchmark stopped early still has every method on the seeds it finished
    jobs = [{"method": m, "seed": s, "data": str(scenes), "teacher": str(teacher), "threads": args.threads, "args": vars(args),
             "out": str(work / f"{m}-{s}")} for s in args.seeds for m in args.methods]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for r in pool.map(one_run, jobs):
            record(r)
    render([record.path], args.out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    ap.add_argument("--images", type=int, default=1600)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--teacher-epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.04, help="the students' peak lr")
    ap.add_argument("--teacher-lr", type=float, default=0.008)
    ap.add_argument("--teacher", default="FPN:resnet18")
    ap.add_argument("--teacher-run", help="a finished teacher run folder to reuse (trained on the same scenes)")
    ap.add_argument("--student", default="FPN:tu-mobilenetv3_small_100")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    run_options(ap, "benchmarks/results/seg_methods.md")
    args = ap.parse_args()
    args.argv = sys.argv[1:]
    run_or_render(args, compare, render, "lcd-seg-bench-")


if __name__ == "__main__":
    main()
