"""Where post-training int8 loses, and whether quantization-aware distillation wins it back; and whether the
Lipschitz term makes a student hold up under post-training quantization (issue 29, items 4 and 5).

Per seed, with a demo's teacher and settings (--setting digits: `make demo`'s, mobilenetv2_050 students of
the resnet18, 15 epochs, lr 0.02, 32 px; --setting scenes: `make demo-seg`'s, smp FPN mobilenetv3_small
students of the FPN resnet18, 5 epochs, lr 0.04, 64 px; --setting boxes: `make demo-det`'s, FCOS
mobilenet_v3_small students with two-conv heads of the FCOS resnet18, 5 epochs, lr 0.002, 64 px, their trunk
from --init, the demo's student-backbone):
  1. students distilled in float: kd and kd+london (`london`) on the digits, the task's default (cwd) on scenes and boxes;
  2. each exported and quantized after training by onnxruntime: int8 weights (the default export) and int4
     weights (`--weight-bits 4`), uint8 activations in both;
  3. the last of them fine-tuned quantization-aware for each width (`--student RUN --quantize int8
     [--set qat.weight_bits=4]`: 3 epochs at a tenth of the lr, the teacher guiding with the same method) and
     exported from what it learnt;
  4. with --control, the same fine-tune in float (its recipe, quantization off): what the extra epochs of
     distillation give without quantization.
Every number is the val metric (top-1, mIoU, mAP) of an ONNX file run by onnxruntime (the fp32 file too), so float
and integer are scored by the same runtime. Paired over seeds: each quantized file against its own fp32 file,
and (digits) the post-training drop of the kd student against the kd+london student's.

    python benchmarks/qat.py --teacher runs/demo/teacher --data runs/demo/digits --seeds 0 1 2 3 --jobs 2
    python benchmarks/qat.py --setting scenes --teacher runs/demo-seg/teacher --data runs/demo-seg/scenes --seeds 0 1 2
    python benchmarks/qat.py --setting boxes --teacher runs/demo-det/teacher --data runs/demo-det/scenes \
        --init runs/demo-det/student-backbone --bits 4 --control --seeds 0 1 2

--keep DIR keeps each seed's runs and reuses the float students found there on a later call (a change to the
quantization-aware step measured on the same students).

Writes the raw numbers after every seed (--out with .json) and the tables to --out (markdown), and prints them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from methods import Record, mean_std, paired  # benchmarks/methods.py: scripts run from this folder

SETTINGS = {
    "digits": {"student": "mobilenetv2_050", "epochs": 15, "lr": 0.02, "methods": ["kd", "london"], "metric": "top1",
               "flags": ["--input-size", "32", "--batch-size", "64", "--set", "data.hflip=0", "--set", "data.scale=[0.6,1.0]",
                         "--set", "data.crop_pct=1.0", "--set", "schedule.warmup_epochs=2"]},
    "scenes": {"student": "smp:FPN:tu-mobilenetv3_small_100", "epochs": 5, "lr": 0.04, "methods": ["cwd"], "metric": "miou",
               "flags": ["--input-size", "64"]},
    # `make demo-det`'s student: FCOS mobilenet_v3_small, two convs per head tower, its trunk from --init (the demo's student-backbone)
    "boxes": {"student": "det:FCOS:mobilenet_v3_small", "epochs": 5, "lr": 0.002, "methods": ["cwd"], "metric": "map",
              "flags": ["--input-size", "64", "--set", "student.kwargs.head_convs=2"]},
}
RUNTIME = ["--workers", "0", "--device", "cpu"]
FILES = {"fp32": "student.onnx", "ptq8": "student.int8.onnx", "ptq4": "student.w4a8.onnx"}


def lcdistill(*args) -> None:
    """One CLI call in a fresh interpreter (its own thread count, as a user runs it); its output kept only on failure."""
    proc = subprocess.run([sys.executable, "-m", "lcdistill", *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"lcdistill {' '.join(map(str, args))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def score(path: Path, data: str, key: str) -> float:
    """The val metric of an exported file, run as `lcdistill eval` runs it (onnxruntime on the CPU)."""
    import torch

    from lcdistill import artifacts, measure
    from lcdistill.data import eval_loader

    a = artifacts.identify(str(path))
    loader = eval_loader(a.task.eval_dataset(a.task.scan(data, check=False).val, a.meta), 128, 0)
    with torch.no_grad():
        return measure.score(a.predict, loader, torch.device("cpu"), a.meta["mean"], a.meta["std"], a.task.metric(len(a.meta["classes"])), a.task)[key]


def one_seed(job: dict) -> dict:
    os.environ["OMP_NUM_THREADS"] = str(job["threads"])
    import torch

    torch.set_num_threads(job["threads"])
    start, seed, data, teacher, setting = time.time(), job["seed"], job["data"], job["teacher"], SETTINGS[job["setting"]]
    key = setting["metric"]
    row: dict = {"seed": seed}
    with tempfile.TemporaryDirectory(prefix=f"qat-bench-{seed}-") as tmp:
        work = Path(job["keep"]) / f"seed{seed}" if job["keep"] else Path(tmp)
        for method in job["methods"] or setting["methods"]:
            run = work / method
            if not (run / "w4" / FILES["ptq4"]).is_file():  # a float student kept by an earlier --keep run is reused
                train_float(job, setting, method, run)
            row[method] = {"fp32": score(run / FILES["fp32"], data, key), "ptq8": score(run / FILES["ptq8"], data, key),
                           "ptq4": score(run / "w4" / FILES["ptq4"], data, key)}
        last = (job["methods"] or setting["methods"])[-1]
        for bits in job["bits"]:
            run = work / f"qat{bits}"
            shutil.rmtree(run, ignore_errors=True)  # a kept one from an earlier run: fine-tuned again
            lcdistill("compress", "--teacher", teacher, "--student", work / last, "--data", data, "--quantize", "int8", "--set",
                      f"qat.weight_bits={bits}", "--seed", seed, *RUNTIME, *(["--epochs", job["qat_epochs"]] if job["qat_epochs"] else []),
                      *[a for kv in job["qat_set"] for a in ("--set", kv)], "--out", run)
            lcdistill("export", run, "--format", "onnx", "--quantize", "int8")
            row[last][f"qat{bits}"] = score(run / FILES[f"ptq{bits}"], data, key)
            if job["control"] and "float_ft" not in row[last]:
                # the same fine-tune in float (its recipe, quantization off): what the extra epochs of distillation give alone
                ft = work / "float-ft"
                shutil.rmtree(ft, ignore_errors=True)
                lcdistill("compress", "--recipe", run / "recipe.yaml", "--teacher", teacher, "--data", data, "--set", "qat.mode=none", *RUNTIME, "--out", ft)
                lcdistill("export", ft, "--format", "onnx")
                row[last]["float_ft"] = score(ft / FILES["fp32"], data, key)
    row["seconds"] = time.time() - start
    return row


def train_float(job: dict, setting: dict, method: str, run: Path) -> None:
    """A float student distilled with method, exported in fp32 with post-training int8 and int4 beside it."""
    if run.exists():  # a kept run that did not finish
        shutil.rmtree(run)
    lcdistill("compress", "--teacher", job["teacher"], "--student", job["student"], "--data", job["data"], "--method", method, "--epochs", job["epochs"],
              "--lr", job["lr"], "--seed", job["seed"], *setting["flags"], *(["--init", job["init"]] if job["init"] else []), *RUNTIME, "--out", run)
    lcdistill("export", run, "--format", "onnx", "--quantize", "int8")
    lcdistill("export", run, "--format", "onnx", "--quantize", "int8", "--weight-bits", "4", "--out", run / "w4")


def tables(rows: list[dict], head: dict) -> str:
    setting = SETTINGS[head.get("setting", "digits")]
    last, metric = (head.get("methods") or setting["methods"])[-1], {"top1": "top-1", "miou": "mIoU", "map": "mAP"}[setting["metric"]]
    kinds = [("fp32", "fp32 (ONNX)"), ("ptq8", "post-training int8"), ("ptq4", "post-training int4 weights"),
             ("qat8", "quantization-aware int8"), ("qat4", "quantization-aware int4 weights"), ("float_ft", "float fine-tune, the same schedule (fp32)")]
    out = [f"# Quantization-aware distillation against post-training int8 ({len(rows)} seeds: {', '.join(str(r['seed']) for r in rows)})", "",
           f"{head['student']} students of the teacher {head['teacher']} on {head['data']}, {head['epochs']} epochs, "
           f"lr {head['lr']}; quantization-aware runs: {head.get('qat_epochs') or 3}-epoch fine-tunes of the {last} student. Val {metric} (%) of each ONNX file in "
           "onnxruntime; paired: the seed-by-seed difference to the same student's fp32 file, mean (standard error), seeds up / down.", "",
           f"## The {last} student: post-training against quantization-aware", "", f"| file | {metric} | vs fp32 |", "|---|---|---|"]
    lon = [{"seed": r["seed"], **r[last]} for r in rows]
    fp32 = [{"seed": r["seed"], "top1": r["fp32"]} for r in lon]
    for key, name in kinds:
        have = [{"seed": r["seed"], "top1": r[key]} for r in lon if key in r]
        if have:
            out.append(f"| {name} | {mean_std([r['top1'] for r in have])} | "
                       + ("" if key == "fp32" else paired(have, fp32, lambda r: r["top1"], counts=True)) + " |")
    if any("float_ft" in r for r in lon):  # the quantization-aware files against the same extra epochs in float
        ft = [{"seed": r["seed"], "top1": r["float_ft"]} for r in lon if "float_ft" in r]
        out += ["", "Against the float fine-tune of the same schedule (what quantization-aware training costs once its extra epochs are "
                "given to float too):", "", "| file | vs float fine-tune |", "|---|---|"]
        for key, name in kinds[3:5]:
            have = [{"seed": r["seed"], "top1": r[key]} for r in lon if key in r]
            if have:
                out.append(f"| {name} | {paired(have, ft, lambda r: r['top1'], counts=True)} |")
    if "kd" not in rows[0]:
        return "\n".join(out + ["", f"{statistics.mean(r['seconds'] for r in rows) / 60:.1f} min a seed."]) + "\n"
    out += ["", "## Does the Lipschitz term make a student hold up under post-training quantization?", "",
            "Drop = fp32 top-1 minus the quantized file's top-1, per seed; paired: london's drop minus kd's (negative: london loses less).", "",
            "| width | kd drop | kd+london drop | london - kd |", "|---|---|---|---|"]
    for key, name in (("ptq8", "int8 weights"), ("ptq4", "int4 weights")):
        kd = [{"seed": r["seed"], "drop": r["kd"]["fp32"] - r["kd"][key]} for r in rows]
        ln = [{"seed": r["seed"], "drop": r["london"]["fp32"] - r["london"][key]} for r in rows]
        out.append(f"| {name} | {mean_std([r['drop'] for r in kd])} | {mean_std([r['drop'] for r in ln])} | {paired(ln, kd, lambda r: r['drop'], counts=True)} |")
    out += ["", "fp32 top-1: kd " + mean_std([r["kd"]["fp32"] for r in rows]) + ", kd+london " + mean_std([r["london"]["fp32"] for r in rows])
            + f"; {statistics.mean(r['seconds'] for r in rows) / 60:.1f} min a seed."]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="a digits teacher run folder (make demo's runs/demo/teacher)")
    ap.add_argument("--data", required=True, help="the digits ImageFolder (make demo's runs/demo/digits)")
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="digits")
    ap.add_argument("--student", help="default: the setting's")
    ap.add_argument("--epochs", type=int, help="default: the setting's")
    ap.add_argument("--lr", type=float, help="default: the setting's")
    ap.add_argument("--bits", type=int, nargs="*", default=[4, 8], help="weight widths to fine-tune quantization-aware (none: float students only)")
    ap.add_argument("--qat-set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe settings of the quantization-aware fine-tunes (qat.weight_range=max)")
    ap.add_argument("--init", help="--init of the float students (boxes: the demo's student-backbone run)")
    ap.add_argument("--control", action="store_true", help="also run each quantization-aware fine-tune's schedule in float")
    ap.add_argument("--keep", help="keep each seed's runs in KEEP/seedN, and reuse the float students found there")
    ap.add_argument("--qat-epochs", type=int, help="the quantization-aware fine-tune's epochs (default: the fine-tune's own, 3)")
    ap.add_argument("--methods", nargs="+", help="the float students' methods (default: the setting's); the last is fine-tuned")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/qat.md")
    args = ap.parse_args()
    for k in ("student", "epochs", "lr"):
        if getattr(args, k) is None:
            setattr(args, k, SETTINGS[args.setting][k])
    head = {k: getattr(args, k) for k in ("setting", "teacher", "data", "student", "epochs", "lr", "bits", "qat_epochs", "qat_set", "methods", "init", "control", "keep")}
    record = Record(args.out, head, time.time())
    jobs = [{**head, "seed": s, "threads": args.threads} for s in args.seeds]
    with ProcessPoolExecutor(args.jobs) as pool:
        for row in pool.map(one_seed, jobs):
            record(row)
    text = tables(sorted(record.runs, key=lambda r: r["seed"]), head)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
