"""Detection: the detector's loss alone vs kd, cwd, pkd, london, and the best of them + london, on digit
scenes, several seeds, paired by seed.

The teacher is `make demo-det`'s, built the same way (a resnet18 classifier on plain digits, then on coloured
digit crops, its trunk the start of an FCOS resnet18-FPN fine-tuned on the scenes; --teacher-run reuses one
trained on the same scenes), so it knows its classes. Every student starts from the demo's pretrained
mobilenet_v3_small trunk (--student-init reuses one) and runs each method on the same seeds with the demo's
schedule. The `+london` run takes the best mean mAP among kd, cwd and pkd (or ce, if none beats it)
once every seed of those has run. Writes the raw numbers to benchmarks/results/det_methods.json after every
run and appends a markdown table to benchmarks/results/det_methods.md:

    python benchmarks/det_methods.py --seeds 0 1 2 3 4 [--jobs 2] [--teacher-run runs/demo-det/teacher]
    python benchmarks/det_methods.py --render benchmarks/results/det_methods.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from lcdistill.data.crops import write_digit_crops
from lcdistill.data.scenes import write_digit_scenes
from methods import Record, base_of, by_method, late_change, load_raw, mean_std, paired, run_options, run_or_render, student_run, train  # benchmarks/methods.py: the classification twin of this benchmark
from publish import publish  # benchmarks/publish.py: scripts run from this folder

# as the Makefile's DET (schedule and data) and the demo student's london warm-up
SCHEDULE = {"batch_size": 16, "optimizer": "adamw", "weight_decay": 1e-4, "warmup_epochs": 1}
DATA = {"hflip": 0.0, "scale": [0.75, 1.25], "workers": 0}
TERMS = {"london": {"warmup_epochs": 1}}
FIRST = ["ce", "kd", "cwd", "pkd", "london"]
CANDIDATES = ("kd", "cwd", "pkd")  # the terms a "+london" run may build on


def layers(args, model: str, method: str, seed: int, epochs: int, lr: float, init: str | None = None) -> list[dict]:
    return [{"task": "detection", "student": {"name": model, "init": init, "kwargs": {"head_convs": args.head_convs}}, "method": method, "train": {"seed": seed, "device": "cpu"},
             "schedule": {**SCHEDULE, "epochs": epochs, "lr": lr}, **TERMS},
            {"data": {**DATA, "input_size": args.size}}]


# as the Makefile's CROPS: the classifier stages of the demo's pretrained backbones
CROPS = {"input_size": 32, "hflip": 0.0, "scale": [0.6, 1.0], "crop_pct": 1.0, "workers": 0}


def classifier(model: str, init: str | None, epochs: int, lr: float) -> list[dict]:
    return [{"student": {"name": model, "init": init}, "method": "ce", "train": {"seed": 0, "device": "cpu"},
             "schedule": {"batch_size": 64, "epochs": epochs, "lr": lr, "warmup_epochs": 1}}, {"data": CROPS}]


# `make demo-det`'s epochs on plain digits, then on the coloured crops
PRETRAIN = {"resnet18": (3, 4), "tv:mobilenet_v3_small": (3, 2)}


def backbone(model: str, work: Path, name: str) -> Path:
    """`make demo-det`'s pretrained backbone: the classifier on plain digits, then on coloured crops (PRETRAIN's epochs)."""
    if not (work / "plain").exists():
        write_digit_crops(work / "plain", train=3000, val=500, plain=True)
        write_digit_crops(work / "crops", train=6000, val=1000)
    plain, crops = PRETRAIN[model]
    train(classifier(model, None, plain, 0.1), work / "plain", None, work / f"{name}-plain")
    train(classifier(model, str(work / f"{name}-plain"), crops, 0.05), work / "crops", None, work / f"{name}-backbone")
    return work / f"{name}-backbone"


def demo_teacher(args, work: Path, scenes: Path) -> Path:
    """`make demo-det`'s teacher: its resnet18 trunk pretrained, then fine-tuned in the detector."""
    init = str(backbone("resnet18", work, "teacher"))
    train(layers(args, args.teacher, "ce", 0, args.teacher_epochs, args.teacher_lr, init), scenes, None, work / "teacher")
    return work / "teacher"


def one_run(job: dict) -> dict:
    args = argparse.Namespace(**job["args"])
    student = layers(args, args.student, job["method"], job["seed"], args.epochs, args.lr, job["init"])
    s, val_curve, seconds = student_run(job, student, "val_map")
    return {"method": job["method"], "seed": job["seed"], "map": s["map"], "map_50": s["map_50"], "labels_right": s["labels_right"],
            "seconds": seconds, "curve": val_curve}


def best_base(results: list[dict]) -> str:
    means = {m: statistics.mean(r["map"] for r in results if r["method"] == m) for m in ("ce", *CANDIDATES)
             if any(r["method"] == m for r in results)}
    best = max((m for m in CANDIDATES if m in means), key=means.get, default="ce")
    return best if means.get(best, -1) > means.get("ce", -1) else "ce"


def render(raws: list[Path], out: str | None) -> None:
    saved = load_raw(raws)
    args, results, teacher = argparse.Namespace(**saved["args"]), saved["runs"], saved["teacher"]
    rows, seeds = by_method(results)
    lines = [f"## digit scenes ({saved['n_train']} train / {saved['n_val']} val, {args.size} px): {args.student} from {args.teacher}, seeds {seeds}",
             "",
             f"Teacher: `make demo-det`'s (a resnet18 trunk pretrained on plain digits, then coloured digit crops, fine-tuned in "
             f"the detector for {args.teacher_epochs} epochs at AdamW lr {args.teacher_lr}, {getattr(args, 'head_convs', 4)} convs a head tower): val mAP {teacher['map']:.2f}, "
             f"AP50 {teacher['map_50']:.2f}, labels right on {teacher.get('labels_right', float('nan')):.1f}% of the boxes it finds. "
             f"Command: `python benchmarks/det_methods.py {saved.get('command', '')}`. Every student: its mobilenet_v3_small trunk pretrained as the demo's "
             f"(plain digits, then the crops), {args.epochs} epochs, batch 16, AdamW lr {args.lr} (weight decay 1e-4, "
             "1 warm-up epoch, cosine), no flips, scale 0.75-1.25, each term's recipe defaults (kd: sigmoid per class on the "
             "dense head's logits; cwd and pkd: FPN P3-P5; london: kd + the Lipschitz term on backbone stage pairs, warm-up 1 "
             "epoch), as `make demo-det`. Paired: this row minus the row named, seed by seed, mean (standard error), seeds up and down. "
             f"Took {saved['seconds']:.0f} s, {args.jobs} jobs x {args.threads} CPU threads.",
             "",
             "| method | mAP % (mean +- std) | AP50 % | labels right % | paired mAP | paired vs | per seed mAP | last 3 epochs |",
             "|---|---|---|---|---|---|---|---|"]
    for m in rows:
        base = base_of(m) or ("ce" if m != "ce" else None)  # a term alone pairs with the detector's loss alone
        diff = paired(rows[m], rows[base], lambda r: r["map"], counts=True) if base in rows else ""
        per_seed = ", ".join(f"{r['map']:.1f}" for r in rows[m])
        right = mean_std([r["labels_right"] for r in rows[m]]) if all("labels_right" in r for r in rows[m]) else ""
        lines.append(f"| {m} | {mean_std([r['map'] for r in rows[m]])} | {mean_std([r['map_50'] for r in rows[m]])} | {right} | {diff} | "
                     f"{base or ''} | {per_seed} | {late_change(rows[m], 'curve')} |")
    publish("\n".join(lines) + "\n", out)


def compare(args, work: Path) -> None:
    scenes = work / "scenes"
    n_train, n_val = write_digit_scenes(scenes, size=args.size, images=args.images)
    start = time.time()
    teacher = Path(args.teacher_run) if args.teacher_run else demo_teacher(args, work, scenes)
    init = args.student_init if args.student_init else str(backbone("tv:mobilenet_v3_small", work, "student"))
    t = json.loads((teacher / "student.json").read_text())  # what the run shipped, with its val scores
    print(f"teacher {args.teacher}: mAP {t['map']:.2f} AP50 {t['map_50']:.2f}, labels right {t.get('labels_right', float('nan')):.1f}%", flush=True)
    record = Record(args.out, {"args": vars(args), "command": " ".join(args.argv), "n_train": n_train, "n_val": n_val,
                               "teacher": {k: t[k] for k in ("map", "map_50", "labels_right") if k in t}}, start)

    def jobs(methods):
        return [{"method": m, "seed": s, "data": str(scenes), "teacher": str(teacher), "init": init, "threads": args.threads,
                 "args": vars(args), "out": str(work / f"{m}-{s}")} for s in args.seeds for m in methods]

    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for r in pool.map(one_run, jobs([m for m in FIRST if m in args.methods])):
            record(r)
        best = best_base(record.runs)
        print(f"best of {', '.join(CANDIDATES)} against ce: {best}", flush=True)
        for r in pool.map(one_run, jobs([f"{best}+london"])):
            record(r)
    render([record.path], args.out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--teacher-epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.002, help="the students' peak lr")
    ap.add_argument("--teacher-lr", type=float, default=0.0005, help="the teacher's fine-tuning lr (from its pretrained backbone)")
    ap.add_argument("--teacher", default="det:FCOS:resnet18")
    ap.add_argument("--teacher-run", help="a finished teacher run folder to reuse (trained on the same scenes)")
    ap.add_argument("--student-init", help="the students' pretrained backbone to reuse (a run folder, as `make demo-det`'s student-backbone)")
    ap.add_argument("--student", default="det:FCOS:mobilenet_v3_small")
    ap.add_argument("--head-convs", type=int, default=2, help="convs in each FCOS head tower, teacher and students (torchvision's: 4)")
    ap.add_argument("--methods", nargs="+", default=FIRST, help="which of the first-pass methods to run")
    run_options(ap, "benchmarks/results/det_methods.md")
    args = ap.parse_args()
    args.argv = sys.argv[1:]
    run_or_render(args, compare, render, "lcd-det-bench-")

if __name__ == "__main__":
    main()
