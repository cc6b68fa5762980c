"""ce vs kd vs london on digits with few labelled training images, several seeds.

Writes a markdown table (mean +- std top-1, mean |per-stage Lipschitz gap|) to
benchmarks/results/methods.md and prints it. The student sees only --fraction of the
training images (per class), so distillation has room to show; the teacher is
trained on all of them.

    python benchmarks/methods.py --fraction 0.2 --seeds 0 1 2 --epochs 40 --lr 0.02
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from lcdistill import models, recipe as recipes, run as runs, tasks
from lcdistill.data import scan, write_digits
from lcdistill.lipschitz import report as lipschitz_report
from publish import publish  # benchmarks/publish.py: scripts run from this folder

DIGITS = {"data": {"input_size": 32, "hflip": 0.0, "scale": [0.6, 1.0], "crop_pct": 1.0, "workers": 0}}


def subset(src: Path, dst: Path, fraction: float, seed: int = 0) -> None:
    """dst/train keeps `fraction` of each class (seeded); dst/val is all of src/val."""
    g = torch.Generator().manual_seed(seed)
    for class_dir in sorted((src / "train").iterdir()):
        files = sorted(class_dir.iterdir())
        keep = max(1, round(len(files) * fraction))
        (dst / "train" / class_dir.name).mkdir(parents=True)
        for i in torch.randperm(len(files), generator=g)[:keep].tolist():
            shutil.copy(files[i], dst / "train" / class_dir.name / files[i].name)
    shutil.copytree(src / "val", dst / "val")


def run(layers: list[dict], data: Path, teacher: str | None, out: Path) -> dict:
    recipe = recipes.build(layers)
    prepared = runs.prepare(recipe, str(data), teacher, None, str(out))
    return runs.run(prepared, Console(file=io.StringIO()))


def lip_gaps(run_dir: Path, data: Path, teacher_dir: Path) -> dict:
    """Per-stage |student - teacher| TM spectral norm on val: on the student's own maps ("raw")
    and, for london runs, through the run's connectors ("connected", what the term matches)."""
    student = models.load_run(run_dir)
    teacher = models.load_run(teacher_dir)
    task = tasks.get("classification")
    val = task.scan(data, check=False).val
    own = student.meta.get("teacher") is not None
    rep = lipschitz_report.measure(student, teacher, val, task, torch.device("cpu"), batches=6, run_dir=run_dir if own else None, bound=False)
    gaps = {"raw": [abs(row["gap"]) for row in rep["stages"]]}
    if "connected" in rep["stages"][0]:
        gaps["connected"] = [abs(row["connected_gap"]) for row in rep["stages"]]
    return gaps


def variant(spec: str) -> tuple[str, list[dict]]:
    """METHOD[@key=value@...], e.g. london@london.alpha=0: the method and its recipe overrides."""
    method, *sets = spec.split("@")
    return method, [recipes.parse_override(s) for s in sets]


def compare(args, work: Path) -> None:
    full, few = work / "digits", work / "few"
    write_digits(full)
    subset(full, few, args.fraction)
    start = time.time()
    teacher_layers = [{"student": {"source": "timm", "name": "resnet18"}, "method": "ce",
                       "schedule": {"epochs": args.teacher_epochs, "batch_size": 64, "lr": 0.1, "warmup_epochs": 1}}, DIGITS]
    t = run(teacher_layers, full, None, work / "teacher")
    print(f"teacher resnet18 on all {len(scan(full, check=False)[0].samples)} train images: top-1 {t['student']['top1']:.2f}", flush=True)

    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        for spec in args.methods:
            method, sets = variant(spec)
            layers = [recipes.resolve_student(args.student, None), DIGITS,
                      {"method": method, "train": {"seed": seed}, "schedule": {"epochs": args.epochs, "batch_size": 32, "lr": args.lr, "warmup_epochs": 2}}]
            layers += [recipes.parse_override(s) for s in args.sets] + sets
            out = work / f"{spec}-{seed}"
            s = run(layers, few, str(work / "teacher") if method != "ce" else None, out)
            entry = {"top1": s["student"]["top1"], "gap": lip_gaps(out, few, work / "teacher")}
            results[spec].append(entry)
            print(spec, seed, json.dumps(entry), flush=True)

    n_train = len(scan(few, check=False)[0].samples)
    lines = [
        f"## {args.student} student, {n_train} training images ({args.fraction:.0%} of digits train), {args.epochs} epochs, seeds {args.seeds}",
        "",
        f"Teacher: timm resnet18 trained on all digits train images, val top-1 {t['student']['top1']:.2f}. "
        f"Every student: {args.epochs} epochs, batch 32, SGD lr {args.lr} with 2 warm-up epochs and cosine decay, the recipe's other defaults "
        "(kd and london: KD weight 1, T 4; london: alpha 1, warm-up 3 epochs, log-space distance). "
        "Val: all 359 digits val images. Gaps: |student - teacher| transmitting-matrix spectral norm per stage pair, "
        "mean over 6 random val batches of 64, averaged over seeds; raw: the student's own stage maps (a ce student is measured "
        "against the same teacher); connected: through the run's 1x1 conv + BN connectors, the quantity the Lipschitz term matches.",
        "",
        "| method | top-1 % (mean +- std) | per-seed top-1 | raw gap per stage pair | connected gap per stage pair |",
        "|---|---|---|---|---|",
    ]
    for spec, rows in results.items():
        tops = [r["top1"] for r in rows]
        std = statistics.stdev(tops) if len(tops) > 1 else 0.0
        gaps = []
        for kind in ("raw", "connected"):
            if rows and kind in rows[0]["gap"]:
                per_stage = [statistics.mean(r["gap"][kind][i] for r in rows) for i in range(len(rows[0]["gap"][kind]))]
                gaps.append(" / ".join(f"{g:.1f}" for g in per_stage) + f" (mean {statistics.mean(per_stage):.1f})")
            else:
                gaps.append("-")
        lines.append(f"| {spec} | {statistics.mean(tops):.2f} +- {std:.2f} | {', '.join(f'{v:.1f}' for v in tops)} | {' | '.join(gaps)} |")
    lines += ["", f"Extra overrides: {args.sets or 'none'}. Took {time.time() - start:.0f} s on {torch.get_num_threads()} CPU threads.", ""]
    publish("\n".join(lines), args.out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--teacher-epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.02, help="peak lr of every student run")
    ap.add_argument("--student", default="mobilenetv2_050")
    ap.add_argument("--methods", nargs="+", default=["ce", "kd", "london@london.alpha=0", "london"],
                    help="METHOD[@key=value...]; london@london.alpha=0 is kd plus connectors that nothing trains: the same "
                         "student as kd, with a connected gap to compare london's with")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra recipe override for every student run")
    ap.add_argument("--out", default="benchmarks/results/methods.md")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lcd-bench-"))
    try:
        compare(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
