"""The lcdistill command line. Parses flags, turns user errors into one line + exit 2, calls the rest."""

from __future__ import annotations

import functools
import json
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from lcdistill.errors import UserError

app = typer.Typer(
    help="Compress pretrained image classifiers with Lipschitz-continuity-guided knowledge distillation (LONDON).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Write bundled example data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def user_errors(command):
    """One clear line on stderr and exit 2 (or the run's own code) instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as e:
            fail(e.line(), getattr(e, "exit_code", 2))
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper


def need_data(data: str | None) -> str:
    if data is None:
        raise UserError("--data is missing", "pass --data DIR holding train/ and val/ (e.g. `lcdistill data digits data/digits`)")
    return data


def overrides(flags: dict, sets: list[str] | None) -> list[dict]:
    """Recipe layers from CLI flags (only those given) and --set KEY=VALUE pairs."""
    from lcdistill.recipe import parse_override

    layer: dict = {}
    for dotted, value in flags.items():
        if value is None:
            continue
        node = layer
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return [layer] + [parse_override(s) for s in sets or []]


def console_for(json_out: bool = False) -> Console:
    # Logs and pipes get 120 columns instead of rich's 80, so tables keep whole names.
    stream = sys.stderr if json_out else sys.stdout
    return Console(stderr=json_out, highlight=False, width=None if stream.isatty() else 120)


# ---- shared training options ------------------------------------------------------------
DataOpt = typer.Option(None, "--data", help="Folder with train/ and val/ ImageFolders.")
EpochsOpt = typer.Option(None, "--epochs", help="Training epochs (schedule.epochs).")
BatchOpt = typer.Option(None, "--batch-size", "-b", help="Global batch size, split over torchrun processes.")
LrOpt = typer.Option(None, "--lr", help="Peak learning rate for the global batch.")
OutOpt = typer.Option(None, "--out", help="Run folder (default runs/<student>-<method>-<time>).")
DeviceOpt = typer.Option(None, "--device", help="auto | cpu | cuda")
SeedOpt = typer.Option(None, "--seed")
SetOpt = typer.Option(None, "--set", help="Override any recipe key: --set kd.temperature=2 (repeatable).")
InputSizeOpt = typer.Option(None, "--input-size", help="Square input side in pixels (data.input_size).")
AmpOpt = typer.Option(None, "--amp-dtype", help="auto | bfloat16 | float16 | float32")
ChannelsLastOpt = typer.Option(None, "--channels-last/--no-channels-last", help="NHWC memory format (default on CUDA).")
CompileOpt = typer.Option(None, "--torchcompile/--no-torchcompile", help="torch.compile student and teacher.")
EmaOpt = typer.Option(None, "--model-ema/--no-model-ema", help="Keep an EMA of the student and ship it.")
WorkersOpt = typer.Option(None, "--workers", "-j", help="Data loader processes per training process.")
CkptOpt = typer.Option(None, "--checkpoint-every", help="Also checkpoint every N steps.")
ClipOpt = typer.Option(None, "--max-grad-norm", help="Clip the gradient norm.")
SkipBadOpt = typer.Option(None, "--skip-bad-images/--no-skip-bad-images", help="Skip unreadable images instead of stopping.")


def _train(recipe_layers: list[dict], data: str, teacher: str | None, teacher_weights: str | None, out: str | None, json_out: bool = False) -> None:
    from lcdistill import pipeline, recipe as recipes

    recipe = recipes.build(recipe_layers)
    _run(pipeline.prepare(recipe, data, teacher, teacher_weights, out), json_out)


def _run(prepared, json_out: bool, resume: bool = False) -> None:
    from lcdistill import pipeline

    summary = pipeline.run(prepared, console_for(json_out), resume=resume)
    if json_out and prepared.runtime.main:
        print(json.dumps(summary))


def _common_flags(epochs, batch_size, lr, device, seed, input_size, amp_dtype, channels_last, torchcompile, model_ema, workers, checkpoint_every, max_grad_norm, skip_bad_images) -> dict:
    return {
        "schedule.epochs": epochs, "schedule.batch_size": batch_size, "schedule.lr": lr, "schedule.max_grad_norm": max_grad_norm,
        "train.device": device, "train.seed": seed, "train.amp_dtype": amp_dtype, "train.channels_last": channels_last,
        "train.compile": torchcompile, "train.ema": model_ema, "train.checkpoint_every": checkpoint_every,
        "data.input_size": input_size, "data.workers": workers, "data.skip_bad_images": skip_bad_images,
    }


@app.command()
@user_errors
def compress(
    teacher: Optional[str] = typer.Option(None, "--teacher", help="timm/torchvision name (timm: / tv: prefix), run folder, or name + --teacher-weights."),
    student: Optional[str] = typer.Option(None, "--student", help="Recipe name (see `lcdistill recipes`), recipe file, or model name."),
    data: Optional[str] = typer.Option(None, "--data", help="Folder with train/ and val/ ImageFolders."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Recipe YAML file."),
    method: Optional[str] = typer.Option(None, "--method", help="london | kd | ce"),
    teacher_weights: Optional[str] = typer.Option(None, "--teacher-weights", help="Teacher weights file (.safetensors or .pth)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue a run folder from its last checkpoint."),
    epochs: Optional[int] = EpochsOpt, batch_size: Optional[int] = BatchOpt, lr: Optional[float] = LrOpt,
    out: Optional[str] = OutOpt, device: Optional[str] = DeviceOpt, seed: Optional[int] = SeedOpt,
    input_size: Optional[int] = InputSizeOpt, amp_dtype: Optional[str] = AmpOpt, channels_last: Optional[bool] = ChannelsLastOpt,
    torchcompile: Optional[bool] = CompileOpt, model_ema: Optional[bool] = EmaOpt, workers: Optional[int] = WorkersOpt,
    checkpoint_every: Optional[int] = CkptOpt, max_grad_norm: Optional[float] = ClipOpt, skip_bad_images: Optional[bool] = SkipBadOpt,
    set_: Optional[List[str]] = SetOpt,
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
):
    """Distil a teacher into a smaller student (LONDON by default)."""
    from lcdistill import pipeline, recipe as recipes

    if resume:
        given = [name for name, value in locals().items() if value not in (None, False, []) and name not in ("resume", "json_out", "pipeline", "recipes")]
        if given:
            raise UserError(f"--resume continues a run with its own recipe and takes no other settings (got {', '.join('--' + g.rstrip('_').replace('_', '-') for g in given)})",
                            "drop them, or start a new run to change settings")
        recipe_dict, inputs = pipeline.load_resume(resume)
        _run(pipeline.prepare(recipe_dict, inputs["data"], inputs["teacher"], inputs["teacher_weights"], resume, resume=True), json_out, resume=True)
        return
    need_data(data)
    flags = _common_flags(epochs, batch_size, lr, device, seed, input_size, amp_dtype, channels_last, torchcompile, model_ema, workers, checkpoint_every, max_grad_norm, skip_bad_images)
    flags["method"] = method
    layers = [recipes.resolve_student(student, recipe)] + overrides(flags, set_)
    _train(layers, data, teacher, teacher_weights, out, json_out)


@app.command()
@user_errors
def train(
    model: str = typer.Option(..., "--model", help="timm or torchvision model name (timm: / tv: prefix to choose)."),
    data: Optional[str] = DataOpt,
    pretrained: bool = typer.Option(False, "--pretrained/--scratch", help="Start from hub weights (fine-tune)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Start from a local .safetensors / .pth file."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Recipe YAML for the schedule."),
    epochs: Optional[int] = EpochsOpt, batch_size: Optional[int] = BatchOpt, lr: Optional[float] = LrOpt,
    out: Optional[str] = OutOpt, device: Optional[str] = DeviceOpt, seed: Optional[int] = SeedOpt,
    input_size: Optional[int] = InputSizeOpt, amp_dtype: Optional[str] = AmpOpt, channels_last: Optional[bool] = ChannelsLastOpt,
    torchcompile: Optional[bool] = CompileOpt, model_ema: Optional[bool] = EmaOpt, workers: Optional[int] = WorkersOpt,
    checkpoint_every: Optional[int] = CkptOpt, max_grad_norm: Optional[float] = ClipOpt, skip_bad_images: Optional[bool] = SkipBadOpt,
    set_: Optional[List[str]] = SetOpt,
):
    """Train or fine-tune any classifier on DIR (head sized to its classes); the run folder can be a teacher."""
    from lcdistill import recipe as recipes

    need_data(data)
    flags = _common_flags(epochs, batch_size, lr, device, seed, input_size, amp_dtype, channels_last, torchcompile, model_ema, workers, checkpoint_every, max_grad_norm, skip_bad_images)
    source, name = recipes.split_source(model)
    flags.update({"method": "ce", "student.source": source, "student.name": name, "student.pretrained": pretrained, "student.weights": weights})
    base = [recipes.read_yaml(Path(recipe))] if recipe else []
    if recipe and not Path(recipe).is_file():
        raise UserError(f"recipe file {recipe} not found", "pass an existing .yaml file")
    _train(base + overrides(flags, set_), data, None, None, out)


@data_app.command("digits")
@user_errors
def data_digits(out: str = typer.Argument(..., help="Folder to create with train/ and val/.")):
    """scikit-learn's 1,797 handwritten digits as 32x32 RGB PNG ImageFolders (seeded 80/20 split)."""
    from lcdistill.data import write_digits

    n_train, n_val = write_digits(out)
    typer.echo(f"wrote {n_train} train and {n_val} val images of 10 classes to {out}")


@app.command("eval")
@user_errors
def eval_(
    targets: List[str] = typer.Argument(..., help="Run folder, student .safetensors, or exported .onnx / .pt; further files are measured beside it."),
    data: Optional[str] = DataOpt,
    device: str = typer.Option("auto", "--device"),
    batch_size: int = typer.Option(64, "--batch-size", "-b"),
    workers: int = typer.Option(2, "--workers", "-j"),
    teacher: bool = typer.Option(True, "--teacher/--no-teacher", help="Also measure the run's teacher."),
    exports: Optional[str] = typer.Option(None, "--exports", help="Folder of `lcdistill export` files to measure beside the student (default: the run folder)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    save: Optional[str] = typer.Option(None, "--save", help="Also write that JSON object to this file."),
):
    """Top-1/top-5, params, FLOPs and latency; teacher beside student when the run knows its teacher, exported files beside both."""
    from lcdistill import evaluate, models
    from lcdistill.data import ImageDataset, eval_loader, eval_transform, scan
    from lcdistill.trainer import setup_runtime
    import torch

    need_data(data)
    target = targets[0]
    runtime = setup_runtime({"device": device, "amp_dtype": "float32", "channels_last": False, "deterministic": False})
    student = evaluate.load_target(target)
    meta = student["meta"]
    if exports is not None and not Path(exports).is_dir():
        raise UserError(f"--exports {exports} is not a folder", "pass the --out folder of `lcdistill export`")
    folder = exports if exports is not None else (target if Path(target).is_dir() else None)
    extra_files = list(dict.fromkeys(targets[1:] + (evaluate.exported_files(folder) if folder else [])))
    extras = [evaluate.load_target(f) for f in extra_files]
    train_split, val_split = scan(data)
    for t in [student] + extras:
        if val_split.classes != t["meta"]["classes"]:
            raise UserError(f"the data's classes {val_split.classes[:5]}... differ from {t['file']}'s {t['meta']['classes'][:5]}...", "evaluate on the data the model was trained for")
    loader = eval_loader(ImageDataset(val_split, eval_transform(meta)), batch_size, workers)
    results = {"student": evaluate.measure(student, loader, runtime.device, batch_size, meta["mean"], meta["std"])}
    teacher_entry = meta.get("teacher")
    if teacher and teacher_entry:
        try:
            t = models.rebuild(teacher_entry["spec"], meta["num_classes"])
        except UserError as e:
            console_for(True).print(f"[yellow]teacher skipped: {e.line()}[/]")
        else:
            t_target = {"kind": "pytorch", "predict": t.model.eval(), "meta": {**meta, **t.data_config, "input_size": meta["input_size"]}, "module": t.model.eval(), "file": None}
            results["teacher"] = evaluate.measure(t_target, loader, runtime.device, batch_size, t.data_config["mean"], t.data_config["std"])
            results["teacher"]["model"] = t.origin
    results["student"]["model"] = target
    for extra in extras:  # each file fed by its own metadata, as a deployment would
        m = extra["meta"]
        own_loader = eval_loader(ImageDataset(val_split, eval_transform(m)), batch_size, workers)
        name = evaluate.role(extra)
        key = name if name not in results else f"{name} {Path(extra['file']).name}"
        results[key] = {**evaluate.measure(extra, own_loader, runtime.device, batch_size, m["mean"], m["std"]), "model": extra["file"]}
    if save:
        from lcdistill.checkpoint import atomic_write_json

        atomic_write_json(Path(save), results)
    if json_out:
        print(json.dumps(results))
        return
    table = Table(title=f"{target} on {data}/val ({results['student']['images']} images)")
    for col in ("", "runs on", "top-1 %", "top-5 %", "params", "GFLOPs", "file MB", "ms @1", f"ms @{batch_size}", "img/s"):
        table.add_column(col, justify="left" if col in ("", "runs on") else "right")
    for role, r in results.items():
        fmt = lambda v, f: f.format(v) if v is not None else "-"  # noqa: E731
        runs_on = {"onnx": "onnxruntime"}.get(r["kind"], r["kind"])
        where = f"{runs_on} {r['device']}" + (f" x{r['threads']}" if r.get("threads") else "")
        table.add_row(role, where, f"{r['top1']:.2f}", f"{r['top5']:.2f}", fmt(r.get("params") and r["params"] / 1e6, "{:.2f}M"),
                      fmt(r.get("flops") and r["flops"] / 1e9, "{:.3f}"), fmt(r.get("file_bytes") and r["file_bytes"] / 1e6, "{:.2f}"),
                      f"{r['latency_ms_b1']:.2f}", f"{r['latency_ms_batch']:.2f}", f"{r['throughput_img_s']:,.0f}")
    console_for().print(table)
    console_for().print("latency: median of 10 timed calls after 3 warm-up calls, random input; 'xN': CPU threads")


@app.command()
@user_errors
def export(
    target: str = typer.Argument(..., help="Run folder or student .safetensors."),
    format: str = typer.Option("all", "--format", "-f", help="onnx | torchscript | all"),
    out: Optional[str] = typer.Option(None, "--out", help="Folder for the files (default: the run folder)."),
    data: Optional[str] = typer.Option(None, "--data", help="Data folder for the parity batch (default: the run's own data)."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset."),
    tolerance: float = typer.Option(1e-3, "--tolerance", help="Largest allowed |exported - PyTorch| on the logits."),
    quantize: str = typer.Option("none", "--quantize", help="none | int8: also write student.int8.onnx (static, calibrated on train images)."),
    calibration_images: int = typer.Option(300, "--calibration-images", help="Training images to calibrate int8 with."),
):
    """Write student.onnx / student.pt (dynamic batch, metadata) and check them against PyTorch on real images."""
    import torch

    from lcdistill import export as exporter, models
    from lcdistill.data import ImageDataset, eval_loader, eval_transform, scan

    if format not in ("onnx", "torchscript", "all"):
        raise UserError(f"unknown --format '{format}'", "choose onnx, torchscript or all")
    if quantize not in ("none", "int8"):
        raise UserError(f"unknown --quantize '{quantize}'", "choose none or int8")
    if quantize == "int8" and format == "torchscript":
        raise UserError("--quantize int8 quantizes the ONNX file", "use --format onnx or --format all")
    path = Path(target)
    if not (models.is_run(path) or (path.suffix == ".safetensors" and path.is_file())):
        raise UserError(f"{target} is not a run folder or student .safetensors", "pass the --out folder of `lcdistill compress` or `lcdistill train`")
    loaded = models.load_run(path)
    meta = loaded.meta
    out_dir = Path(out) if out else (path if path.is_dir() else path.parent)
    data_dir = data or _run_data(path)
    if quantize == "int8" and not data_dir:
        raise UserError("--quantize int8 needs training images to calibrate with", "pass --data DIR (the run's own data is not found)")
    if data_dir:
        _, val = scan(data_dir, check=False)
        images = next(iter(eval_loader(ImageDataset(val, eval_transform(meta)), 8, 0)))[0]
        from lcdistill.data import normalize

        batch, source = normalize(images, meta["mean"], meta["std"]), f"{len(images)} val images from {data_dir}"
    else:
        batch, source = torch.randn(8, *meta["input_size"]), "8 random inputs (pass --data for real images)"
    files = {}
    if format in ("onnx", "all"):
        files["onnx"] = exporter.to_onnx(loaded.model, meta, out_dir / "student.onnx", opset)
    if format in ("torchscript", "all"):
        files["torchscript"] = exporter.to_torchscript(loaded.model, meta, out_dir / "student.pt")
    diffs = exporter.parity(loaded.model, files, batch)
    worst = 0.0
    for fmt, diff in diffs.items():
        worst = max(worst, diff)
        typer.echo(f"{fmt}: {files[fmt]}  max |diff| vs PyTorch {diff:.2e} on {source} and batch 1")
    if worst > tolerance:
        fail(f"export differs from PyTorch by {worst:.2e} > tolerance {tolerance:g}", 1)
    if quantize == "int8":
        _export_int8(loaded.model, meta, files["onnx"], data_dir, calibration_images, batch, source)


def _export_int8(model, meta: dict, fp32: Path, data_dir: str, images: int, batch, source: str) -> None:
    """student.int8.onnx beside the fp32 file; int8 is judged by agreement, not by a tolerance."""
    import torch

    from lcdistill import export as exporter, quantize as quant

    batches = quant.calibration_batches(data_dir, meta, images)
    int8 = quant.quantize(fp32, quant.int8_path(fp32), batches, str(Path(data_dir).resolve()))
    with torch.no_grad():
        reference = model.eval()(batch).argmax(1)
        got = exporter.run_onnx(exporter.onnx_session(int8), batch).argmax(1)
    agree = int((got == reference).sum())
    mb = lambda p: p.stat().st_size / 1e6  # noqa: E731
    typer.echo(f"int8: {int8}  {mb(int8):.2f} MB (fp32 {mb(fp32):.2f} MB), calibrated on {sum(len(b) for b in batches)} train images;"
               f" top-1 class agrees with PyTorch on {agree}/{len(batch)} of {source}; measure accuracy with `lcdistill eval`")


def _run_data(path: Path) -> str | None:
    run_file = (path if path.is_dir() else path.parent) / "run.json"
    if run_file.is_file():
        data_dir = json.loads(run_file.read_text()).get("data")
        if data_dir and Path(data_dir).is_dir():
            return data_dir
    return None


@app.command("recipes")
@user_errors
def list_recipes():
    """List the shipped student recipes."""
    from lcdistill import models, recipe as recipes
    from lcdistill.evaluate import params

    table = Table(title="shipped recipes (use --student NAME)")
    for col in ("name", "model", "method", "epochs", "params (1000 classes)"):
        table.add_column(col, no_wrap=col in ("name", "model"))
    for name, path in recipes.list_recipes().items():
        r = recipes.build([recipes.read_yaml(path)])
        s = r["student"]
        arch = {"source": models.resolve_source(s["source"], s["name"]), "name": s["name"], "kwargs": s["kwargs"]}
        n = params(models.build(arch, 1000))
        table.add_row(name, f"{arch['source']}:{s['name']}", r["method"], str(r["schedule"]["epochs"]), f"{n / 1e6:.2f}M")
    console_for().print(table)


@app.command()
@user_errors
def lipschitz(
    target: str = typer.Argument(..., help="Run folder, student .safetensors, or model name."),
    data: Optional[str] = DataOpt,
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher to compare with (default: the run's own teacher)."),
    teacher_weights: Optional[str] = typer.Option(None, "--teacher-weights"),
    no_teacher: bool = typer.Option(False, "--no-teacher", help="Report the model alone."),
    batches: int = typer.Option(4, "--batches", help="Val batches to average over."),
    batch_size: int = typer.Option(64, "--batch-size", "-b"),
    min_stride: int = typer.Option(4, "--min-stride"),
    device: str = typer.Option("auto", "--device"),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
):
    """Per-stage transmitting-matrix spectral norms (model, teacher, gap) and the per-layer upper bound."""
    from lcdistill import lipschitz_report, models
    from lcdistill.data import scan
    from lcdistill.trainer import setup_runtime

    need_data(data)
    runtime = setup_runtime({"device": device, "amp_dtype": "float32", "channels_last": False, "deterministic": False})
    _, val = scan(data)
    n = len(val.classes)
    model = models.load_run(Path(target)) if Path(target).exists() else models.resolve(target, n, pretrained=False)
    t, own = None, False
    if not no_teacher:
        if teacher:
            t = models.resolve(teacher, n, weights=teacher_weights)
        elif model.meta.get("teacher"):
            t, own = models.rebuild(model.meta["teacher"]["spec"], n), True
    try:
        # the run's own connectors fit only its own teacher
        result = lipschitz_report.measure(model, t, val, runtime.device, batches, batch_size, min_stride,
                                          run_dir=Path(target) if own and Path(target).is_dir() else None)
    except ValueError as e:
        raise UserError(f"lipschitz: {e}", "pass --min-stride 2, or a CNN with stride-separated stages") from None
    connected = "connected" in result["stages"][0]
    if json_out:
        print(json.dumps(result))
        return
    table = Table(title=f"transmitting-matrix spectral norms on {batches} random batches of {data}/val")
    columns = ("stages", "model", "teacher", "gap") + (("connected", "connected gap") if connected else ())
    for col in columns:
        table.add_column(col, justify="left" if col == "stages" else "right")
    for row in result["stages"]:
        f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        cells = [f(row["model"]), f(row["teacher"]), f(row["gap"])] + ([f(row["connected"]), f(row["connected_gap"])] if connected else [])
        table.add_row(f"{row['name']}  ({' -> '.join(row['model_stages'])})", *cells)
    console = console_for()
    console.print(table)
    if connected:
        console.print("connected: the student's maps through the run's 1x1 conv + BN connectors, the quantity the Lipschitz term matches")
    ub = result["upper_bound"]
    console.print(f"per-layer upper bound (product of exact layer norms, BN folded): {ub:.3e}" if ub else "per-layer upper bound: 0 or overflow")


@app.command()
@user_errors
def report(
    run: str = typer.Argument(..., help="Run folder."),
    data: Optional[str] = typer.Option(None, "--data", help="Compute the Lipschitz chart on DIR/val when RUN/lipschitz.json is missing (saved there)."),
    eval_file: Optional[str] = typer.Option(None, "--eval", help="`lcdistill eval --save` output for the table (default: RUN/eval.json)."),
    device: str = typer.Option("auto", "--device"),
):
    """RUN/report.html (self-contained) and RUN/plots/*.png: training curves, teacher/student/export table, Lipschitz chart.

    The table comes from RUN/eval.json (`lcdistill eval RUN --data DIR --save RUN/eval.json`) when present."""
    from lcdistill import report as reports

    reports.pyplot()  # fail before any work when matplotlib is missing
    path = Path(run)
    if eval_file is not None and not Path(eval_file).is_file():
        raise UserError(f"--eval {eval_file} not found", "write it with `lcdistill eval RUN --data DIR --save FILE`")
    lip = None
    if data and not (path / "lipschitz.json").is_file() and (path / "student.json").is_file():
        from lcdistill.checkpoint import atomic_write_json
        from lcdistill.trainer import setup_runtime

        runtime = setup_runtime({"device": device, "amp_dtype": "float32", "channels_last": False, "deterministic": False})
        lip = reports.compute_lipschitz(path, data, runtime.device)
        atomic_write_json(path / "lipschitz.json", lip)
    evaluation = reports.read_json(Path(eval_file)) if eval_file else None
    written = reports.write(path, evaluation=evaluation, lipschitz=lip)
    typer.echo(f"report: {written['html']}")
    for plot in written["plots"]:
        typer.echo(f"plot: {plot}")


class Terminated(BaseException):
    """SIGTERM outside training (the trainer checkpoints on its own): unwinds like Ctrl-C, so
    half-made run folders are removed on the way out."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main() -> None:
    """Entry point: usage errors too become one line on stderr and exit 2."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        code = app(standalone_mode=False)
    except Terminated:
        typer.echo("error: terminated by SIGTERM (nothing half-written is left behind); run the command again", err=True)
        sys.exit(143)
    except Exception as e:  # click's and typer's own (vendored) usage errors share no importable base
        kind = type(e).__name__
        if kind == "NoArgsIsHelpError":
            e.show()
            sys.exit(0)
        if kind == "Abort":
            fail("interrupted", 130)
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
            raise
        ctx = getattr(e, "ctx", None)
        where = f"lcdistill {ctx.info_name}" if ctx is not None and ctx.parent is not None else "lcdistill"
        typer.echo(f"error: {e.format_message()} (see `{where} --help`)", err=True)
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
