"""One student, four runtimes, side by side: PyTorch eager, TorchScript, ONNX Runtime fp32 and
ONNX Runtime int8, on the CPU with the same thread count. Latency at batch 1, throughput at
batch 64, and val top-1 for each; ratios against eager (and int8 against fp32).

The exports are made afresh in a temporary folder with lcdistill's own functions, so the numbers
describe the current code. Timings are interleaved (every runtime once per round, median over
rounds) so a change in machine load hits all four alike; the load average is recorded with them.

    python benchmarks/export_latency.py RUN --data DIR [--threads 1] [--rounds 15]

Appends a markdown table to benchmarks/results/export.md and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch

from lcdistill import __version__, artifacts, exporters, measure
from lcdistill.quantize import ptq as quantize
from lcdistill.data import eval_loader
from lcdistill.runfolder import RunFolder
from publish import publish  # benchmarks/publish.py: scripts run from this folder


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def predictors(run: Path, data: str, work: Path, calibration: int) -> dict:
    """name -> (predict(normalised batch) -> logits, file or None)."""
    target = artifacts.identify(run, accept=("run",))
    model, meta, task = target.loaded.model.eval(), target.meta, target.task
    onnx_file = exporters.to_onnx(model, meta, work / "student.onnx", task.export)
    ts_file = exporters.to_torchscript(model, meta, work / "student.pt")
    int8_file = quantize.quantize(onnx_file, quantize.int8_path(onnx_file), quantize.calibration_batches(task, data, meta, calibration), data)
    with exporters.quiet_jit():
        scripted = torch.jit.load(str(ts_file)).eval()
    fp32_session, int8_session = exporters.onnx_session(onnx_file), exporters.onnx_session(int8_file)
    return {
        "pytorch eager": (model, RunFolder(run).student),
        "torchscript": (scripted, ts_file),
        "onnxruntime fp32": (lambda x: exporters.run_onnx(fp32_session, x), onnx_file),
        "onnxruntime int8": (lambda x: exporters.run_onnx(int8_session, x), int8_file),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run folder (lcdistill train / compress --out)")
    ap.add_argument("--data", help="data folder (default: the run's own, from run.json)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for every runtime")
    ap.add_argument("--batch", type=int, default=64, help="batch size for throughput")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (median taken)")
    ap.add_argument("--calibration-images", type=int, default=quantize.CALIBRATION_IMAGES)
    ap.add_argument("--out", default="benchmarks/results/export.md")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)  # exporters.onnx_session gives ONNX Runtime the same count
    run = Path(args.run)
    data = args.data or json.loads(RunFolder(run).inputs.read_text())["data"]
    target = artifacts.identify(run, accept=("run",))
    meta, task = target.meta, target.task
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="lcd-export-bench-") as tmp, torch.no_grad():
        runtimes = predictors(run, data, Path(tmp), args.calibration_images)
        val = task.scan(data, check=False).val
        loader = eval_loader(task.eval_dataset(val, meta), 128, 0)
        top1 = {name: measure.score(p, loader, torch.device("cpu"), meta["mean"], meta["std"], task.metric(len(meta["classes"])), task)["top1"]
                for name, (p, _) in runtimes.items()}
        sizes = {name: measure.file_size(str(f)) for name, (_, f) in runtimes.items()}
        inputs = {b: torch.randn(b, *meta["input_size"], generator=torch.Generator().manual_seed(b)) for b in (1, args.batch)}
        times: dict[tuple[str, int], list[float]] = {(n, b): [] for n in runtimes for b in inputs}
        for _ in range(args.rounds):
            for name, (predict, _) in runtimes.items():
                for b, x in inputs.items():
                    times[(name, b)].append(measure.time_call(lambda: predict(x), warmup=2, repeats=10 if b == 1 else 3))
    load_after = os.getloadavg()
    ms = {key: statistics.median(v) for key, v in times.items()}

    eager1, eagerB = ms[("pytorch eager", 1)], ms[("pytorch eager", args.batch)]
    lines = [
        f"## {meta['arch']['source']}:{meta['arch']['name']} {'x'.join(map(str, meta['input_size']))}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"CPU: {cpu_name()}, {os.cpu_count()} cores, {args.threads} thread(s) per runtime; load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after (a shared machine: compare rows, not runs). "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, lcdistill {__version__}, ONNX opset {exporters.OPSET}. "
        f"Val: {len(val.samples)} images of {data}. Latency: median over {args.rounds} interleaved rounds of a median of 10 calls; "
        f"int8: static QDQ, per-channel weights, {args.calibration_images} train images for calibration.",
        "",
        f"| runtime | top-1 % | file MB | ms @1 | x eager @1 | ms @{args.batch} | img/s @{args.batch} | x eager img/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in runtimes:
        b1, bB = ms[(name, 1)], ms[(name, args.batch)]
        size = f"{sizes[name] / 1e6:.2f}" if sizes[name] else "-"
        lines.append(f"| {name} | {top1[name]:.2f} | {size} | {b1:.3f} | {b1 / eager1:.2f} | {bB:.2f} | "
                     f"{args.batch / bB * 1000:,.0f} | {eagerB / bB:.2f} |")
    fp32, int8 = "onnxruntime fp32", "onnxruntime int8"
    lines += [
        "",
        f"ONNX Runtime fp32 latency / eager at batch 1: **{ms[(fp32, 1)] / eager1:.2f}x** (target <= 0.7x). "
        f"int8 vs fp32: top-1 {top1[int8] - top1[fp32]:+.2f} points (target within 1), latency @1 {ms[(int8, 1)] / ms[(fp32, 1)]:.2f}x, "
        f"throughput @{args.batch} {ms[(fp32, args.batch)] / ms[(int8, args.batch)]:.2f}x, file {sizes[int8] / sizes[fp32]:.2f}x.",
        "",
    ]
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
