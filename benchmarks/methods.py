"""ce vs kd vs london on digits with few labelled training images, several seeds.

Writes a markdown table (mean +- std top-1, mean |per-stage Lipschitz gap|) to
benchmarks/results/methods.md and prints it. The student sees only --fraction of the
training images (per class), so distillation has room to show; the teacher is
trained on all of them.

    python benchmarks/methods.py --fraction 0.1 --seeds 0 1 2 --epochs 30
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

from lcdistill import lipschitz_report, models, pipeline, recipe as recipes
from lcdistill.data import ImageDataset, eval_loader, eval_transform, scan, write_digits

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
    prepared = pipeline.prepare(recipe, str(data), teacher, None, str(out))
    return pipeline.run(prepared, Console(file=io.StringIO()))


def lip_gap(run_dir: Path, data: Path) -> list[float]:
    """Per-stage |student - teacher| TM spectral norm on val (raw features, no connectors)."""
    student = models.load_run(run_dir)
    teacher = models.rebuild(student.meta["teacher"]["spec"], student.num_classes)
    _, val = scan(data, check=False)
    loader = eval_loader(ImageDataset(val, eval_transform(student.meta)), 128, 0)
    rep = lipschitz_report.report(student.model, student.data_config, teacher.model, teacher.data_config, loader,
                                  torch.device("cpu"), student.meta["input_size"], batches=3)
    rep["upper_bound"] = None  # not needed here
    return [abs(row["gap"]) for row in rep["stages"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--teacher-epochs", type=int, default=10)
    ap.add_argument("--student", default="mobilenetv2_050")
    ap.add_argument("--methods", nargs="+", default=["ce", "kd", "london"])
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra recipe override for every student run")
    ap.add_argument("--out", default="benchmarks/results/methods.md")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lcd-bench-"))
    full, few = work / "digits", work / "few"
    write_digits(full)
    subset(full, few, args.fraction)
    start = time.time()
    teacher_layers = [{"student": {"source": "timm", "name": "resnet18"}, "method": "ce",
                       "schedule": {"epochs": args.teacher_epochs, "batch_size": 64, "lr": 0.1, "warmup_epochs": 1}}, DIGITS]
    t = run(teacher_layers, full, None, work / "teacher")
    print(f"teacher resnet18 on all {len(scan(full, check=False)[0].samples)} train images: top-1 {t['student']['top1']:.2f}")

    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            layers = [recipes.resolve_student(args.student, None), DIGITS,
                      {"method": method, "train": {"seed": seed}, "schedule": {"epochs": args.epochs, "batch_size": 32, "lr": 0.05, "warmup_epochs": 2}}]
            layers += [recipes.parse_override(s) for s in args.sets]
            out = work / f"{method}-{seed}"
            s = run(layers, few, str(work / "teacher") if method != "ce" else None, out)
            entry = {"top1": s["student"]["top1"]}
            if method != "ce":
                entry["gap"] = lip_gap(out, few)
            results[method].append(entry)
            print(method, seed, json.dumps(entry))

    n_train = len(scan(few, check=False)[0].samples)
    lines = [
        f"## {args.student} student, {n_train} training images ({args.fraction:.0%} of digits train), {args.epochs} epochs, seeds {args.seeds}",
        "",
        f"Teacher: timm resnet18 trained on all digits train images, val top-1 {t['student']['top1']:.2f}. "
        "Val: all 359 digits val images. Gap: mean over val of |student - teacher| transmitting-matrix spectral norm per stage pair (raw features).",
        "",
        "| method | top-1 % (mean +- std) | per-seed top-1 | mean abs Lipschitz gap per stage pair |",
        "|---|---|---|---|",
    ]
    for method, rows in results.items():
        tops = [r["top1"] for r in rows]
        std = statistics.stdev(tops) if len(tops) > 1 else 0.0
        gaps = ""
        if rows and "gap" in rows[0]:
            per_stage = [statistics.mean(r["gap"][i] for r in rows) for i in range(len(rows[0]["gap"]))]
            gaps = " / ".join(f"{g:.1f}" for g in per_stage)
        lines.append(f"| {method} | {statistics.mean(tops):.2f} +- {std:.2f} | {', '.join(f'{v:.1f}' for v in tops)} | {gaps} |")
    lines += ["", f"Extra overrides: {args.sets or 'none'}. Took {time.time() - start:.0f} s on {torch.get_num_threads()} CPU threads.", ""]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(text + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
