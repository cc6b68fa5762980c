"""Which distillation terms help, and what the Lipschitz term adds: ce, kd, dist, ofd (and dkd with
--methods), each with and without `+london`, several seeds, paired.

The default setting is the one nearest convergence that the 2-core CPU affords: the 1,797 plain digits
(`lcdistill data digits`), the whole train set (--fractions 1), 12 student epochs (students at 96-98%
top-1; the table's "last 3 epochs" column says how much they still moved: 0.1-0.6 points at 8 seeds on
2026-12-04), seeds 0-7, resnet18 teacher trained on the same train set. About 8 minutes a seed as two jobs
of one thread on an otherwise idle 2-core machine (8 rows), so 8 seeds take about an hour; the paired
standard errors were 0.37-0.63 points there.
--fractions 0.1 0.2 gives every student only that share of train (per class, one fixed subset per fraction).

--dataset crops: `lcdistill data digit-crops` (10,000 train / 2,000 val at 32 px, val from writers train
never sees): a set where one val image is 0.05 points, but a slow one to learn from scratch: after 3
epochs (30,000 images seen) a mobilenetv2_050 alone is at 12% top-1 and the resnet18 teacher at 18%
(benchmarks/RESULTS.md), so converged students there need many times this benchmark's CPU budget.

Every method runs on the same seeds; a `X+london` row is compared with its `X` row seed by seed: the
paired difference's mean with its standard error (std / sqrt(n)) and how many seeds went each way, for
clean val top-1 and for top-1 under Gaussian noise and one-step FGSM (lcdistill.robustness, the numbers
`lcdistill eval --robustness` prints). Writes the raw numbers after every run (methods.json beside --out)
and markdown tables to benchmarks/results/methods.md, and prints them. Seeds added later render with the
first ones (--render a.json b.json) when both runs used the same teacher: its scores must match, so keep a
teacher run folder and pass it as --teacher RUN to each (on one machine and torch, the default teacher
retrains to the same scores; on another machine with the same torch it gave 98.33 where the first gave 98.05).

    python benchmarks/methods.py --jobs 2 --threads 1
    python benchmarks/methods.py --fractions 0.1 0.2 --epochs 20 10 --seeds 0 1 2 3 4 --jobs 2

A spec is METHOD[@key=value@...]: `kd+london@london.student_side=raw` is kd+london on the student's
own maps; it is paired with `kd`, the spec's method without `+london`.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from rich.console import Console

from lcdistill import models, recipe as recipes, robustness, run as runs, tasks
from lcdistill.checkpoint import atomic_write_text
from lcdistill.data import scan, write_digits
from lcdistill.data.crops import write_digit_crops
from lcdistill import lipschitz_report
from publish import publish  # benchmarks/publish.py: scripts run from this folder

# dkd ramps in over 20 epochs, longer than the default run: name it with --methods and --epochs 30
METHODS = ["ce", "ce+london", "kd", "kd+london", "dist", "dist+london", "ofd", "ofd+london"]


def digits_data(size: int) -> dict:
    # digits are centred strokes: no flips, mild crops, no eval centre-crop
    return {"data": {"input_size": size, "hflip": 0.0, "scale": [0.6, 1.0], "crop_pct": 1.0, "workers": 0}, "train": {"device": "cpu"}}


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


def train(layers: list[dict], data: Path, teacher: str | None, out: Path) -> dict:
    prepared = runs.prepare(layers, str(data), teacher, None, str(out))
    return runs.run(prepared, Console(file=io.StringIO()))


class Record:
    """A benchmark's raw results file (the --out path with .json), rewritten after every run so a stopped
    benchmark keeps what it measured (--render reads it): `head` (args, teacher, ...), seconds, runs."""

    def __init__(self, out: str, head: dict, start: float):
        self.path, self.head, self.start, self.runs = Path(out).with_suffix(".json"), head, start, []
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, run: dict) -> None:
        self.runs.append(run)
        print(json.dumps(run), flush=True)
        # temp file, then rename: a benchmark stopped mid-write keeps the previous runs, not half a file
        atomic_write_text(self.path, json.dumps({**self.head, "seconds": time.time() - self.start, "runs": self.runs}, indent=1))


def student_run(job: dict, layers: list[dict], curve_key: str) -> tuple[dict, list[float], float]:
    """One student run of a methods benchmark in its worker process (its own thread count), its run folder
    removed after: (the summary's student metrics, the val metric after each epoch, seconds)."""
    torch.set_num_threads(job["threads"])
    start = time.time()
    out = Path(job["out"])
    summary = train(layers, Path(job["data"]), None if job["method"] == "ce" else job["teacher"], out)
    val_curve = curve(out, curve_key)
    shutil.rmtree(out, ignore_errors=True)
    return summary["student"], val_curve, time.time() - start


def by_method(results: list[dict], key: str = "method") -> tuple[dict[str, list[dict]], list[int]]:
    """Each method's runs sorted by seed, methods in the order they first ran; and the seeds that ran."""
    methods = dict.fromkeys(r[key] for r in results)
    rows = {m: sorted((r for r in results if r[key] == m), key=lambda r: r["seed"]) for m in methods}
    return rows, sorted({r["seed"] for r in results})


def base_of(spec: str) -> str | None:
    """The spec a `+london` spec is paired with: its method without the Lipschitz term."""
    method = spec.split("@")[0]
    if method == "london":
        return "kd"
    parts = method.split("+")
    return "+".join(p for p in parts if p != "london") if "london" in parts else None


def lip_gaps(run_dir: Path, data: Path, teacher_dir: Path) -> dict:
    """Mean |student - teacher| TM spectral norm over stage pairs on val: the student's own maps ("raw")
    and, for runs with Lipschitz connectors, through them ("connected", what the term matches)."""
    student, teacher = models.load_run(run_dir), models.load_run(teacher_dir)
    task = tasks.get("classification")
    val = task.scan(data, check=False).val
    rep = lipschitz_report.measure(student, teacher, val, task, torch.device("cpu"), batches=4, run_dir=run_dir, bound=False)
    gaps = {"raw": statistics.mean(abs(row["gap"]) for row in rep["stages"])}
    if "connected_gap" in rep["stages"][0]:
        gaps["connected"] = statistics.mean(abs(row["connected_gap"]) for row in rep["stages"] if row["connected_gap"] is not None)
    return gaps


def one_run(job: dict) -> dict:
    """A student run and its measurements, in a worker process with its own thread count."""
    torch.set_num_threads(job["threads"])
    method, *sets = job["spec"].split("@")
    layers = [recipes.resolve_student(job["student"], None), digits_data(job["size"]),
              {"method": method, "train": {"seed": job["seed"]},
               "schedule": {"epochs": job["epochs"], "batch_size": 32, "lr": job["lr"], "warmup_epochs": 2}}]
    layers += [recipes.parse_override(s) for s in [*job["sets"], *sets]]
    out, data, teacher = Path(job["out"]), Path(job["data"]), Path(job["teacher"])
    start = time.time()
    summary = train(layers, data, None if method == "ce" else str(teacher), out)
    result = {"spec": job["spec"], "fraction": job["fraction"], "seed": job["seed"], "top1": summary["student"]["top1"],
              "seconds": time.time() - start, "curve": curve(out, "val_top1"), "robustness": robustness.measure_run(out, data)["student"],
              "gap": lip_gaps(out, data, teacher)}
    shutil.rmtree(out, ignore_errors=True)
    return result


def curve(run_dir: Path, key: str) -> list[float]:
    """The run's val metric after each epoch (metrics.jsonl): whether the last epochs still moved it."""
    lines = (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip())
    return [row[key] for row in lines if "epoch_end" in row and key in row]


def epochs_at(args, fraction: float) -> int:
    epochs = list(args.epochs)
    return epochs[0] if len(epochs) == 1 else epochs[list(args.fractions).index(fraction)]


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} +- {std:.2f}"


def paired(rows: list[dict], base_rows: list[dict], key, counts: bool = False) -> str:
    """The seed-by-seed difference: `+0.42 (se 0.21)`, its standard error std / sqrt(n); with counts, how many
    seeds went up and down (`5 up, 3 down`)."""
    by_seed = {r["seed"]: key(r) for r in base_rows}
    diffs = [key(r) - by_seed[r["seed"]] for r in rows if r["seed"] in by_seed]
    if not diffs:
        return "-"
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    text = f"{statistics.mean(diffs):+.2f} (se {se:.2f})"
    if counts:
        text += f", {sum(d > 0 for d in diffs)} up, {sum(d < 0 for d in diffs)} down"
    return text


def late_change(rows: list[dict], key: str, last: int = 3) -> str:
    """Mean over seeds of the metric after the last epoch minus `last` epochs before it: '+0.12', or '-'
    for runs that kept no curve or had too few epochs."""
    moves = [r[key][-1] - r[key][-1 - last] for r in rows if len(r.get(key) or []) > last]
    return f"{statistics.mean(moves):+.2f}" if moves else "-"


def tables(fraction: float, n_train: int, results: list[dict], args, teacher_row: dict) -> str:
    specs = [s for s in args.methods if any(r["spec"] == s for r in results)]
    rows = {s: sorted((r for r in results if r["spec"] == s), key=lambda r: r["seed"]) for s in specs}
    levels = robustness.columns([teacher_row["robustness"]])  # (kind, key, header)
    lines = [f"### {fraction:.0%} of {args.dataset} train ({n_train} images), {epochs_at(args, fraction)} epochs, {args.student} at {args.size} px, seeds {sorted({r['seed'] for r in results})}", "",
             f"Clean val top-1 ({args.n_val} images). Paired: this row minus its row without `+london`, seed by seed, mean (standard error), "
             "seeds up and down. Gaps: mean over "
             "stage pairs of |student - teacher| transmitting-matrix sigma on val, the student's own maps (raw) and, for runs "
             "with Lipschitz connectors, through them (connected).", "",
             "Last 3 epochs: the val top-1 after the last epoch minus three epochs before, mean over seeds (still rising if "
             "it is as large as the differences between rows).", "",
             "| method | top-1 % | paired vs base | per seed | last 3 epochs | raw gap | connected gap |", "|---|---|---|---|---|---|---|"]
    for s in specs:
        base = base_of(s)
        diff = paired(rows[s], rows[base], lambda r: r["top1"], counts=True) if base in rows else ""
        tops = [r["top1"] for r in rows[s]]
        connected = [r["gap"]["connected"] for r in rows[s] if "connected" in r["gap"]]
        raw_gap = statistics.mean(r["gap"]["raw"] for r in rows[s])
        lines.append(f"| {s} | {mean_std(tops)} | {diff} | {', '.join(f'{v:.1f}' for v in tops)} | {late_change(rows[s], 'curve')} | {raw_gap:.1f} | "
                     + (f"{statistics.mean(connected):.1f} |" if connected else "- |"))
    lines += ["", "Top-1 % under additive Gaussian noise (sigma in [0, 1] pixel units) and one-step FGSM (epsilon, same units); "
              "in brackets the paired difference to the row without `+london`.", "",
              "| method | " + " | ".join(header for _, _, header in levels) + " |", "|---|" + "---|" * len(levels),
              "| teacher | " + " | ".join(f"{teacher_row['robustness'][kind][k]:.2f}" for kind, k, _ in levels) + " |"]
    for s in specs:
        base = base_of(s)
        cells = []
        for kind, k, _ in levels:
            key = lambda r, kind=kind, k=k: r["robustness"][kind][k]  # noqa: E731
            cell = f"{statistics.mean(key(r) for r in rows[s]):.2f}"
            if base in rows:
                cell += f" [{paired(rows[s], rows[base], key)}]"
            cells.append(cell)
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(args, work: Path) -> None:
    full = work / args.dataset
    if args.dataset == "crops":
        _, args.n_val = write_digit_crops(full, size=args.size, train=args.train, val=args.val)
    else:
        args.n_val = write_digits(full)[1]
    start = time.time()
    teacher = Path(args.teacher) if args.teacher else work / "teacher"
    if not args.teacher:
        train([{"student": {"source": "timm", "name": "resnet18"}, "method": "ce",
                "schedule": {"epochs": args.teacher_epochs, "batch_size": 64, "lr": args.teacher_lr, "warmup_epochs": 1}}, digits_data(args.size)],
              full, None, teacher)
    measured = robustness.measure_run(teacher, full)["student"]
    teacher_row = {"top1": measured["clean"], "robustness": measured}
    print(f"teacher resnet18 on all {len(scan(full, check=False)[0].samples)} {args.dataset} train images: {json.dumps(teacher_row)}", flush=True)

    sizes = {}
    for fraction in args.fractions:
        few = work / f"few-{fraction}"
        if fraction == 1:
            few.symlink_to(full, target_is_directory=True)
        else:
            subset(full, few, fraction)
        sizes[fraction] = len(scan(few, check=False)[0].samples)
    # seed by seed, so a benchmark stopped early still has every method on the seeds it finished
    jobs = [{"spec": spec, "seed": seed, "fraction": fraction, "data": str(work / f"few-{fraction}"), "teacher": str(teacher),
             "student": args.student, "size": args.size, "epochs": epochs_at(args, fraction), "lr": args.lr, "sets": args.sets,
             "threads": args.threads, "out": str(work / f"{spec}-{fraction}-{seed}")}
            for seed in args.seeds for fraction in args.fractions for spec in args.methods]
    record = Record(args.out, {"args": vars(args), "command": " ".join(sys.argv[1:]), "teacher": teacher_row, "sizes": sizes}, start)
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for r in pool.map(one_run, jobs):
            record(r)
    render([record.path], args.out)


# what may differ between raw files that render as one table: which seeds and methods ran, where and how fast, and
# whether the teacher was trained or reused, and from which folder (its own scores must match)
PER_INVOCATION = {"seeds", "methods", "jobs", "threads", "out", "render", "argv", "teacher_run", "teacher", "student_init"}


def load_raw(raws: list[Path]) -> dict:
    """One raw results file, or several of the same setting merged (more seeds run later, against the same
    teacher): runs concatenated, a run repeated in a later file replaced by it, seconds added up."""
    files = [json.loads(Path(raw).read_text()) for raw in raws]
    saved = files[0]
    keep = {k: v for k, v in saved["args"].items() if k not in PER_INVOCATION}
    for raw, more in zip(raws[1:], files[1:]):
        other = {k: v for k, v in more["args"].items() if k not in PER_INVOCATION}
        if other != keep or more["teacher"] != saved["teacher"]:
            changed = sorted(k for k in keep.keys() | other.keys() if keep.get(k) != other.get(k)) or ["teacher"]
            print(f"error: {raw} is another setting than {raws[0]} (differs in {', '.join(changed)}): render them apart", file=sys.stderr)
            raise SystemExit(2)  # bad input: one line, exit 2, as the CLI does
        ident = lambda r: tuple(v for k, v in sorted(r.items()) if k in ("spec", "method", "seed", "fraction"))  # noqa: E731
        replaced = {ident(r) for r in more["runs"]}
        saved["runs"] = [r for r in saved["runs"] if ident(r) not in replaced] + more["runs"]
        saved["seconds"] += more["seconds"]
        saved["command"] = " ; ".join(c for c in (saved.get("command"), more.get("command")) if c)
    if len(files) > 1:  # say which invocation stopped early (a later one usually runs the seeds it left)
        stops = [f"invocation {i + 1} {f['stopped']}" for i, f in enumerate(files) if "stopped" in f]
        saved.pop("stopped", None)  # saved is files[0]: read its own above first
        saved.update({"stopped": "; ".join(stops)} if stops else {})
    return saved


def render(raws: list[Path], out: str | None) -> None:
    """The markdown tables of raw results files (one setting)."""
    saved = load_raw(raws)
    args, teacher_row, results = argparse.Namespace(**{"dataset": "digits", "n_val": 359, **saved["args"]}), saved["teacher"], saved["runs"]
    sizes = {float(k): v for k, v in saved["sizes"].items()}
    done = sorted({r["seed"] for r in results})
    head = [f"## {args.student} from a resnet18 teacher, {args.dataset} at {args.size} px, seeds {done}", "",
            *([f"`python benchmarks/methods.py {c}`" for c in saved["command"].split(" ; ")] + [""] if "command" in saved else []),
            *([f"Not run to the end: {saved['stopped']}.", ""] if "stopped" in saved else []),
            f"Teacher: timm resnet18, {f'run {args.teacher}' if args.teacher else f'{args.teacher_epochs} epochs'} on all {args.dataset} train images, "
            f"val top-1 {teacher_row['top1']:.2f}. Every student: "
            f"batch 32, SGD lr {args.lr} with 2 warm-up epochs and cosine decay, each term's recipe defaults. "
            f"Extra overrides: {args.sets or 'none'}. Took {saved['seconds']:.0f} s, {args.jobs} jobs x {args.threads} CPU threads; "
            f"raw numbers in {', '.join(Path(r).name for r in raws)}.", ""]
    body = [tables(f, sizes[f], [r for r in results if r["fraction"] == f], args, teacher_row) for f in args.fractions
            if any(r["fraction"] == f for r in results)]
    publish("\n".join(head) + "\n" + "\n\n".join(body) + "\n", out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=("digits", "crops"), default="digits")
    ap.add_argument("--train", type=int, default=10000, help="crops: train images")
    ap.add_argument("--val", type=int, default=2000, help="crops: val images")
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    ap.add_argument("--epochs", type=int, nargs="+", default=[12],
                    help="student epochs, one for every fraction (or one for all)")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--teacher-epochs", type=int, default=10)
    ap.add_argument("--teacher-lr", type=float, default=0.1)
    ap.add_argument("--teacher", help="a finished teacher run folder to reuse (trained at --size on all digits)")
    ap.add_argument("--lr", type=float, default=0.02, help="peak lr of every student run")
    ap.add_argument("--student", default="mobilenetv2_050")
    ap.add_argument("--methods", nargs="+", default=METHODS, help="METHOD[@key=value...] specs")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra recipe override for every student run")
    run_options(ap, "benchmarks/results/methods.md")
    run_or_render(ap.parse_args(), compare, render, "lcd-bench-")


def run_options(ap: argparse.ArgumentParser, out: str) -> None:
    """--jobs, --threads, --out and --render, as every methods benchmark takes them."""
    ap.add_argument("--jobs", type=int, default=1, help="student runs at once (processes)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: all cores / jobs)")
    ap.add_argument("--out", default=out)
    ap.add_argument("--render", metavar="JSON", nargs="+", help="only print (and append to --out) the tables of raw results files "
                    "(several: one setting, more seeds run later against the same teacher)")


def run_or_render(args, compare, render, prefix: str) -> None:
    """render(--render, --out), or compare(args, a scratch folder removed afterwards)."""
    if args.render:
        render([Path(r) for r in args.render], args.out)
        return
    args.threads = args.threads or max(1, torch.get_num_threads() // args.jobs)
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        compare(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
