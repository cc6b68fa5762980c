"""A student cut from the teacher against a named student of the same FLOPs, distilled the same way (issue 30).

Per seed, with a demo's teacher and settings (--setting digits: `make demo`'s resnet18 teacher, 15 epochs, lr
0.02, 32 px; --setting scenes: `make demo-seg`'s smp FPN resnet18 teacher, 5 epochs, lr 0.04, 64 px), each pair
of students is distilled with the task's default method (no --method: london on digits, cwd on scenes):
`prune:R` (the teacher cut to at most R of its FLOPs, starting from its weights) and a named student whose
FLOPs are at or just above the cut's, trained from scratch. Every accuracy is the val metric of the student's
fp32 ONNX file in onnxruntime; paired over seeds: the cut minus its named partner.
After the seeds, the seed-0 files of every student are timed side by side in onnxruntime (batch 1 and 64,
interleaved rounds, so machine load falls on all alike): FLOPs are not latency.

    python benchmarks/prune.py --teacher runs/demo/teacher --data runs/demo/digits --seeds 0 1 2 --jobs 2
    python benchmarks/prune.py --setting scenes --teacher runs/demo-seg/teacher --data runs/demo-seg/scenes --seeds 0 1 2

Writes the raw numbers after every seed (--out with .json) and the tables to --out (markdown), and prints them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from lcdistill.checkpoint import atomic_write_text
from methods import Record, mean_std, paired  # benchmarks/methods.py: scripts run from this folder
from qat import RUNTIME, SETTINGS as DEMOS, lcdistill, score

# (cut, named partner at about its FLOPs); resnet18 at 32 px is 74.0 MFLOPs: regnetx_008 32.6, efficientnet_b0 16.9,
# mobilenetv2_050 3.9 (R 0.053: the "the FLOPs of a named student").
SETTINGS = {
    "digits": {**DEMOS["digits"], "pairs": [("prune:0.5", "regnetx_008"), ("prune:0.25", "efficientnet_b0"), ("prune:0.053", "mobilenetv2_050")]},
    "scenes": {**DEMOS["scenes"], "pairs": [("prune:0.3", "smp:FPN:tu-mobilenetv3_small_100")]},
}


def one_seed(job: dict) -> dict:
    os.environ["OMP_NUM_THREADS"] = str(job["threads"])
    import torch

    torch.set_num_threads(job["threads"])
    start, seed, setting = time.time(), job["seed"], SETTINGS[job["setting"]]
    row: dict = {"seed": seed}
    for student in [s for pair in setting["pairs"] for s in pair]:
        run = Path(job["work"]) / f"{seed}-{student.replace(':', '-')}"
        shutil.rmtree(run, ignore_errors=True)
        lcdistill("compress", "--teacher", job["teacher"], "--student", student, "--data", job["data"], "--epochs", job["epochs"],
                  "--lr", job["lr"], "--seed", seed, *setting["flags"], *RUNTIME, "--out", run)
        lcdistill("export", run, "--format", "onnx")
        row[student] = score(run / "student.onnx", job["data"], setting["metric"])
        if seed != job["timed_seed"]:
            shutil.rmtree(run)
    row["seconds"] = time.time() - start
    return row


def costs(work: Path, seed: int, students: list[str], data: str, repeats: int) -> dict:
    """Params, FLOPs (at the run's input size) and onnxruntime latency at batch 1 and 64 of each student's file,
    timed in interleaved rounds."""
    import torch

    from lcdistill import artifacts, exporters, models, students as survey
    from lcdistill.measure import flops

    out, calls = {}, {}
    for student in students:
        run = work / f"{seed}-{student.replace(':', '-')}"
        a, loaded = artifacts.identify(str(run / "student.onnx")), models.load_run(run)
        example = a.task.export.example(a.meta, 1)
        out[student] = {"params": loaded.params, "flops": flops(loaded.model, example)}
        session = exporters.onnx_session(str(run / "student.onnx"))
        for batch in (1, 64):
            x = a.task.export.example(a.meta, batch)
            calls[(student, batch)] = lambda s=session, x=x: exporters.run_onnx(s, x)
    times = survey.interleaved(list(calls.values()), repeats=repeats)
    for (student, batch), ms in zip(calls, times):
        out[student][f"ms{batch}"] = ms
    out["threads"] = torch.get_num_threads()
    return out


def tables(rows: list[dict], head: dict) -> str:
    setting = SETTINGS[head["setting"]]
    metric = {"top1": "top-1", "miou": "mIoU"}[setting["metric"]]
    cost = head.get("costs") or {}
    out = [f"# A student cut from the teacher against a named student of its FLOPs ({len(rows)} seeds: {', '.join(str(r['seed']) for r in rows)})", "",
           f"Teacher {head['teacher']} on {head['data']}; every student distilled with the task's default method, {head['epochs']} epochs, "
           f"lr {head['lr']}. Val {metric} (%) of each student's fp32 ONNX file in onnxruntime, mean +- std over seeds; paired: the cut "
           "minus its named partner seed by seed, mean (standard error), seeds up / down. Latency: onnxruntime on this machine's CPU "
           f"({cost.get('threads', '?')} threads), median ms per call, both students' files timed in the same interleaved rounds.", "",
           f"| student | {metric} | cut - named | params | MFLOPs | ms @1 | ms @64 |", "|---|---|---|---|---|---|---|"]
    for cut, named in setting["pairs"]:
        for student in (cut, named):
            have = [{"seed": r["seed"], "v": r[student]} for r in rows if student in r]
            base = [{"seed": r["seed"], "v": r[named]} for r in rows if named in r]
            c = cost.get(student, {})
            out.append(f"| {student} | {mean_std([h['v'] for h in have])} | " + (paired(have, base, lambda r: r["v"], counts=True) if student == cut else "")
                       + f" | {c.get('params', 0) / 1e6:.2f}M | {c.get('flops', 0) / 1e6:.1f} | {c.get('ms1', float('nan')):.2f} | {c.get('ms64', float('nan')):.2f} |")
    out += ["", f"{statistics.mean(r['seconds'] for r in rows) / 60:.1f} min a seed."]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="the demo's teacher run folder")
    ap.add_argument("--data", required=True, help="the demo's data")
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="digits")
    ap.add_argument("--epochs", type=int, help="default: the setting's")
    ap.add_argument("--lr", type=float, help="default: the setting's")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30, help="timed calls per file and batch size")
    ap.add_argument("--work", default="runs/prune-bench", help="where the runs go (the timed seed's are kept)")
    ap.add_argument("--out", default="results/prune.md")
    args = ap.parse_args()
    for k in ("epochs", "lr"):
        if getattr(args, k) is None:
            setattr(args, k, SETTINGS[args.setting][k])
    head = {k: getattr(args, k) for k in ("setting", "teacher", "data", "epochs", "lr")}
    record = Record(args.out, head, time.time())
    jobs = [{**head, "seed": s, "threads": args.threads, "work": args.work, "timed_seed": args.seeds[0]} for s in args.seeds]
    with ProcessPoolExecutor(args.jobs) as pool:
        for row in pool.map(one_seed, jobs):
            record(row)
    students = [s for pair in SETTINGS[args.setting]["pairs"] for s in pair]
    record.head["costs"] = costs(Path(args.work), args.seeds[0], students, args.data, args.repeats)
    atomic_write_text(record.path, json.dumps({**record.head, "seconds": time.time() - record.start, "runs": record.runs}, indent=1))
    text = tables(sorted(record.runs, key=lambda r: r["seed"]), record.head)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
