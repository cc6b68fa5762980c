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
    python benchmarks/prune.py --setting boxes --teacher runs/demo-det/teacher --data runs/demo-det/scenes \
        --named-init runs/demo-det/student-backbone --seeds 0 1 2

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
# mobilenetv2_050 3.9 (R 0.053: the "the FLOPs of a named student"); smp FPN resnet18 at 64 px is 555.5,
# its mobilenetv3_small_100 student 258.0 (0.464).
SETTINGS = {
    "digits": {**DEMOS["digits"], "pairs": [("prune:0.5", "regnetx_008"), ("prune:0.25", "efficientnet_b0"), ("prune:0.053", "mobilenetv2_050")]},
    "scenes": {**DEMOS["scenes"], "pairs": [("prune:0.46", "smp:FPN:tu-mobilenetv3_small_100")]},
    # `make demo-det`'s FCOS resnet18 teacher (816.6 MFLOPs at 64 px) and its FCOS mobilenet_v3_small student (521.2: 0.638,
    # two convs per head tower as the demo sets, its trunk from --named-init, the demo's student-backbone)
    "boxes": {"epochs": 5, "lr": 0.002, "metric": "map", "flags": ["--input-size", "64"],
              "pairs": [("prune:0.63", "det:FCOS:mobilenet_v3_small")], "named": ["--set", "student.kwargs.head_convs=2"]},
}


def one_run(job: dict) -> dict:
    """One student of one seed: distilled (a finished run folder from a stopped benchmark is reused), exported, scored."""
    os.environ["OMP_NUM_THREADS"] = str(job["threads"])
    import torch

    torch.set_num_threads(job["threads"])
    start, seed, student, setting = time.time(), job["seed"], job["student"], SETTINGS[job["setting"]]
    run = Path(job["work"]) / f"{seed}-{student.replace(':', '-').replace(' ', '-')}"
    if not (run / "student.json").is_file():
        shutil.rmtree(run, ignore_errors=True)
        spec, _, select = student.partition(" ")
        own = ["--set", "prune.connectors=select"] if select else [] if spec.startswith("prune:") else [
            *setting.get("named", []), *(["--init", job["named_init"]] if job["named_init"] else [])]
        lcdistill("compress", "--teacher", job["teacher"], "--student", spec, "--data", job["data"], "--epochs", job["epochs"],
                  "--lr", job["lr"], "--seed", seed, *setting["flags"], *RUNTIME, *own, "--out", run)
    lcdistill("export", run, "--format", "onnx")
    value = score(run / "student.onnx", job["data"], setting["metric"])
    if seed != job["timed_seed"]:
        shutil.rmtree(run)
    return {"seed": seed, "student": student, "value": value, "seconds": time.time() - start}


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
        fixed = isinstance(session.get_inputs()[0].shape[0], int)  # a detector's file takes one image
        for batch in (1,) if fixed else (1, 64):
            x = a.task.export.example(a.meta, batch)
            calls[(student, batch)] = lambda s=session, x=x: exporters.run_onnx(s, x)
    times = survey.interleaved(list(calls.values()), repeats=repeats)
    for (student, batch), ms in zip(calls, times):
        out[student][f"ms{batch}"] = ms
    out["threads"] = torch.get_num_threads()
    return out


def _ms(cost: dict, key: str) -> str:
    return f"{cost[key]:.2f}" if key in cost else "-"  # batch 64 is absent for a file that takes one image


def by_seed(runs: list[dict]) -> list[dict]:
    """One row per seed, {student: value}, from the one-run records."""
    rows: dict[int, dict] = {}
    for r in runs:
        row = rows.setdefault(r["seed"], {"seed": r["seed"], "seconds": 0.0})
        row[r["student"]] = r["value"]
        row["seconds"] += r["seconds"]
    return [rows[k] for k in sorted(rows)]


def tables(rows: list[dict], head: dict) -> str:
    setting = SETTINGS[head["setting"]]
    metric = {"top1": "top-1", "miou": "mIoU", "map": "mAP"}[setting["metric"]]
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
                       + f" | {c.get('params', 0) / 1e6:.2f}M | {c.get('flops', 0) / 1e6:.1f} | {_ms(c, 'ms1')} | {_ms(c, 'ms64')} |")
    for cut in head.get("select") or []:
        have = [{"seed": r["seed"], "v": r[f"{cut} select"]} for r in rows if f"{cut} select" in r]
        base = [{"seed": r["seed"], "v": r[cut]} for r in rows if cut in r]
        out += ["", f"Connectors started as the selection of the teacher's kept channels (`--set prune.connectors=select`) against "
                f"at random (the default), {cut}: {metric} {mean_std([h['v'] for h in have])}, select - random "
                f"{paired(have, base, lambda r: r['v'], counts=True)}."]
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
    ap.add_argument("--select", nargs="*", default=[], help="cuts (e.g. prune:0.25) also run with prune.connectors=select, paired against random")
    ap.add_argument("--named-init", help="--init for the named students (boxes: the demo's student-backbone run)")
    ap.add_argument("--costs-only", action="store_true", help="time the kept runs of --timed-seed again and rewrite the tables")
    ap.add_argument("--timed-seed", type=int, default=0, help="the seed whose runs are kept and timed")
    ap.add_argument("--repeats", type=int, default=30, help="timed calls per file and batch size")
    ap.add_argument("--work", default="runs/prune-bench", help="where the runs go (the timed seed's are kept)")
    ap.add_argument("--out", default="results/prune.md")
    args = ap.parse_args()
    for k in ("epochs", "lr"):
        if getattr(args, k) is None:
            setattr(args, k, SETTINGS[args.setting][k])
    head = {k: getattr(args, k) for k in ("setting", "teacher", "data", "epochs", "lr", "select", "named_init")}
    record = Record(args.out, head, time.time())
    students = [s for pair in SETTINGS[args.setting]["pairs"] for s in pair]
    if args.costs_only:  # the timed seed's runs are kept: time them again without training anything
        record.runs = json.loads(record.path.read_text())["runs"]
        args.seeds = []
    jobs = [{**head, "seed": seed, "student": student, "threads": args.threads, "work": args.work, "timed_seed": args.timed_seed}
            for seed in args.seeds for student in students + [f"{c} select" for c in args.select]]
    with ProcessPoolExecutor(args.jobs) as pool:
        for row in pool.map(one_run, jobs if not args.costs_only else []):
            record(row)
    record.head["costs"] = costs(Path(args.work), args.timed_seed, students, args.data, args.repeats)
    atomic_write_text(record.path, json.dumps({**record.head, "seconds": time.time() - record.start, "runs": record.runs}, indent=1))
    text = tables(by_seed(record.runs), record.head)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
