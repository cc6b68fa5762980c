"""lcdistill's commands as Python functions: `compress`, `train`, `evaluate`, `export`, `load`.

The CLI parses its flags into these keyword arguments, calls the function and renders what it returns; nothing
is done twice. Each returns a result object, raises lcdistill.UserError (`.message`: the problem, `.fix`: what to
do) for input a user can fix, and never prints a traceback or exits. A message names options as the CLI spells
them: `--batch-size` is the keyword `batch_size`, `--set KEY=VALUE` is `overrides={"KEY": VALUE}`.

    run = lcdistill.compress("runs/teacher", "mobilenetv2_050", "data/digits", method="kd+london", epochs=15, input_size=32)
    run.metrics                                  # {"top1": 97.8, "top5": 100.0}
    lcdistill.evaluate(run.path, data="data/digits").rows["student"]["latency_ms_b1"]
    lcdistill.export(run.path, format="onnx").files["onnx"]
    model = lcdistill.load(run.path)             # nn.Module + model.preprocessing (mean, std, input size, classes)

Heavy modules (torch, timm, onnx) are imported inside the functions, so `lcdistill --help` stays fast.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from lcdistill.defaults import CALIBRATION_IMAGES, FGSM_EPSILONS, NOISE_SIGMAS, OPSET
from lcdistill.errors import ParityError, UserError
from lcdistill.options import TRAINING, given, nested

FORMATS = ("onnx", "torchscript", "pt2", "hub", "all")


# ---- results ------------------------------------------------------------------------------------
@dataclass
class Run:
    """A finished compress or train run."""

    path: Path  # the run folder (student.safetensors, student.json, recipe.yaml, summary.csv, checkpoints/)
    metrics: dict[str, float]  # the shipped student's val metric values (top1/top5, miou/pixel_acc, map/map_50/...)
    params: int | None  # the student's parameters
    teacher: dict | None  # the teacher's metric values and params (None without a teacher)
    summary: dict = field(default_factory=dict)  # what `--json` prints (empty on a torchrun process other than rank 0)

    @property
    def student(self) -> Path:
        """The shippable student weights (lcdistill metadata inside): what evaluate, export and load take."""
        from lcdistill.runfolder import RunFolder

        return RunFolder(self.path).student


@dataclass
class Evaluation:
    """What evaluate measured: one row per model or file ("teacher", "student", "onnx", "onnx-int8", ...)."""

    rows: dict[str, dict]  # role -> the metric values, params, flops, file_bytes, latency_ms_b1, latency_ms_batch, ...
    columns: tuple[tuple[str, str], ...]  # (table header, value name) of the task's metric
    best: str  # the metric value that ranks models (top1, miou, map)
    images: int  # val images measured
    notes: list[str] = field(default_factory=list)  # what was skipped, and why (a teacher that cannot be rebuilt offline)

    @property
    def best_header(self) -> str:
        """The table header of the ranking value, e.g. 'top-1 %'."""
        return dict((key, header) for header, key in self.columns)[self.best]


@dataclass
class Exported:
    """What export wrote: format -> file, and how far each is from PyTorch."""

    files: dict[str, Path]  # onnx, torchscript, pt2, hub (a folder), int8 (student.int8.onnx or .w4a8.onnx)
    parity: dict[str, float]  # format -> max |exported - PyTorch| (the task's measure) at the batch and batch 1
    sizes: dict[str, float] = field(default_factory=dict)  # format -> the same at a second batch and input size (dynamic height and width)
    lines: list[str] = field(default_factory=list)  # what the CLI prints


# ---- helpers ------------------------------------------------------------------------------------
def _console(quiet: bool, console):
    if console is not None:
        return console
    from rich.console import Console

    return Console(quiet=quiet, highlight=False)


def _say(console, line: str) -> None:
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def _need(value, what: str, fix: str):
    if value is None:
        raise UserError(f"{what} is missing", fix)
    return value


def need_data(data) -> str:
    """The data folder, or the UserError that says it is missing."""
    return str(_need(data, "--data", "pass --data DIR holding train/ and val/ (e.g. `lcdistill data digits data/digits`)"))


def _checked(values: dict[str, Any]) -> dict[str, Any]:
    """The training options given, each of its type (an int where a float goes)."""
    for name, value in values.items():
        kind = TRAINING[name].kind
        number = (int, float) if kind is float else (kind,)
        if value is not None and (not isinstance(value, number) or (kind is not bool and isinstance(value, bool))):
            raise UserError(f"{name} must be {kind.__name__}, got {value!r}", f"pass {name}=<{kind.__name__}> ({TRAINING[name].help})")
    return values


def layers_of(values: dict[str, Any], overrides, extra: dict | None = None) -> list[dict]:
    """Recipe layers: the training options given (and extra recipe keys), then each override.

    overrides: {"kd.temperature": 2, ...} or ["kd.temperature=2", ...] (the CLI's --set)."""
    from lcdistill.recipe import parse_override

    flat = {TRAINING[name].key: value for name, value in _checked(values).items()}
    layers = [nested({**flat, **(extra or {})})]
    if overrides is None:
        return layers
    if isinstance(overrides, dict):
        return layers + [nested({key: value}) if value is not None else parse_override(f"{key}=") for key, value in overrides.items()]
    if isinstance(overrides, (list, tuple)) and all(isinstance(s, str) for s in overrides):
        return layers + [parse_override(s) for s in overrides]
    raise UserError(f"overrides must be a dict or a list of 'KEY=VALUE' strings, got {type(overrides).__name__}",
                    "pass overrides={'kd.temperature': 2} (or ['kd.temperature=2'], as --set takes them)")


def _training(layers: list[dict], data: str, teacher, teacher_weights, out, console, resume: bool = False) -> Run:
    from lcdistill import run

    prepared = run.prepare(layers, data, teacher, teacher_weights, out, resume=resume)
    summary = run.run(prepared, console, resume=resume)
    student = summary.get("student") or {}
    return Run(prepared.folder.path, {k: v for k, v in student.items() if k != "params"}, student.get("params"), summary.get("teacher"), summary)


# ---- commands -----------------------------------------------------------------------------------
def compress(teacher: str | None = None, student: str | None = None, data: str | None = None, *, method: str | None = None,
             recipe: str | None = None, teacher_weights: str | None = None, resume: str | None = None, out: str | None = None,
             epochs: int | None = None, batch_size: int | None = None, lr: float | None = None, device: str | None = None,
             seed: int | None = None, input_size: int | None = None, amp_dtype: str | None = None, channels_last: bool | None = None,
             torchcompile: bool | None = None, model_ema: bool | None = None, workers: int | None = None, checkpoint_every: int | None = None,
             max_grad_norm: float | None = None, skip_bad_images: bool | None = None, init: str | None = None, quantize: str | None = None,
             task: str | None = None, overrides: dict | Sequence[str] | None = None, quiet: bool = False, console=None) -> Run:
    """Distil a teacher into a smaller student (`lcdistill compress`); returns the finished Run.

    teacher: a model name, a run folder, or a name + teacher_weights. student: a recipe name, a recipe file, a model
    name or a finished run (fine-tuned further). method: the task's default, or "kd", "london", terms joined by '+'.
    The options left None take the recipe's (or the task's) defaults. resume=RUN continues a stopped run and takes
    nothing else. Progress goes to `console` (a rich Console; quiet=True for none)."""
    values = {name: value for name, value in locals().items() if name in TRAINING}
    console = _console(quiet, console)
    if resume:
        from lcdistill import run

        # every setting a resumed run would ignore (it follows its own recipe)
        own = {"--teacher": teacher, "--student": student, "--data": data, "--recipe": recipe, "--method": method,
               "--teacher-weights": teacher_weights, "--out": out}
        named = [flag for flag, value in own.items() if value is not None] + given(values) + (["--set"] if overrides else [])
        if named:
            raise UserError(f"--resume continues a run with its own recipe and takes no other settings (got {', '.join(named)})",
                            "drop them, or start a new run to change settings")
        saved, inputs = run.load_resume(resume)
        return _training([saved], inputs["data"], inputs["teacher"], inputs["teacher_weights"], resume, console, resume=True)
    from lcdistill import recipe as recipes

    data = need_data(data)
    layers = [recipes.resolve_student(student, recipe)] + layers_of(values, overrides, {"method": method})
    return _training(layers, data, teacher, teacher_weights, out, console)


def train(model: str | None = None, data: str | None = None, *, pretrained: bool = False, weights: str | None = None,
          recipe: str | None = None, out: str | None = None, epochs: int | None = None, batch_size: int | None = None,
          lr: float | None = None, device: str | None = None, seed: int | None = None, input_size: int | None = None,
          amp_dtype: str | None = None, channels_last: bool | None = None, torchcompile: bool | None = None, model_ema: bool | None = None,
          workers: int | None = None, checkpoint_every: int | None = None, max_grad_norm: float | None = None,
          skip_bad_images: bool | None = None, init: str | None = None, quantize: str | None = None, task: str | None = None,
          overrides: dict | Sequence[str] | None = None, quiet: bool = False, console=None) -> Run:
    """Train or fine-tune a model of any task on data (`lcdistill train`); the Run's folder can then be a teacher.

    pretrained: start from hub weights; weights: from a local .safetensors / .pth; init: from what fits of another
    run or file. Other options as in compress."""
    values = {name: value for name, value in locals().items() if name in TRAINING}
    from lcdistill import recipe as recipes
    from lcdistill.specs import split_source

    model = _need(model, "--model", "pass --model NAME (a timm or torchvision classifier, tv:/smp:/det: model; see `lcdistill students`)")
    data = need_data(data)
    if recipe and not Path(recipe).is_file():
        raise UserError(f"recipe file {recipe} not found", "pass an existing .yaml file")
    source, name = split_source(model)
    base = [recipes.read_yaml(Path(recipe))] if recipe else []
    student = {"method": "ce", "student.source": source, "student.name": name, "student.pretrained": pretrained, "student.weights": weights}
    return _training(base + layers_of(values, overrides, student), data, None, None, out, _console(quiet, console))


def robustness_levels(robust: bool, noise, fgsm) -> tuple | None:
    """(sigmas, epsilons) to measure, or None without robustness (noise or fgsm given imply it). Each is a
    comma-separated string as the CLI takes it ('' for none) or a sequence of numbers in [0, 1] pixel units."""
    from lcdistill.robustness import parse_levels

    if not robust and noise is None and fgsm is None:
        return None
    text = lambda v: v if isinstance(v, str) else ",".join(str(x) for x in v)  # noqa: E731
    sigmas = parse_levels(text(noise), "--noise") if noise is not None else NOISE_SIGMAS
    epsilons = parse_levels(text(fgsm), "--fgsm") if fgsm is not None else FGSM_EPSILONS
    return sigmas, epsilons


def evaluate(target: str, *others: str, data: str | None = None, device: str = "auto", batch_size: int = 64, workers: int = 2,
             teacher: bool = True, exports: str | None = None, robustness: bool = False, noise: str | Sequence[float] | None = None,
             fgsm: str | Sequence[float] | None = None, save: str | None = None) -> Evaluation:
    """The task's metric, params, FLOPs, file size and latency (`lcdistill eval`) of target (a run folder, student
    .safetensors, .onnx, TorchScript or .pt2 file), its teacher beside it, and beside them the exported files of the
    run folder (or of `exports`) or the `others` named. robustness (or noise / fgsm levels): the metric under input
    noise and FGSM too. save: also write the rows as JSON (what `lcdistill report` reads)."""
    from lcdistill import artifacts, measure, robustness as robust
    from lcdistill.data import eval_loader
    from lcdistill.training import eval_runtime

    data = need_data(data)
    target, others = str(target), [str(f) for f in others]  # the rows name them (JSON)
    levels = robustness_levels(robustness, noise, fgsm)  # bad numbers fail before any work
    runtime = eval_runtime(device)
    student = artifacts.identify(target)
    meta, task = student.meta, student.task
    if exports is not None and not Path(exports).is_dir():
        raise UserError(f"--exports {exports} is not a folder", "pass the --out folder of `lcdistill export`")
    extras = [artifacts.identify(f) for f in others]
    named = {a.path.resolve() for a in extras}
    extras += [a for a in artifacts.exports_beside(student, exports) if a.path.resolve() not in named]
    base = artifacts.base_run(student)  # a quantization-aware run: its starting run's fp32 and post-training int8 files beside
    based = [a for a in artifacts.exports_beside(base, None) if a.path.resolve() not in named] if base else []
    splits = task.scan(data)
    for t in [student] + extras + based:
        artifacts.check_classes(t, splits.classes)
    metric = task.metric(len(meta["classes"]))
    loader = eval_loader(task.eval_dataset(splits.val, meta), batch_size, workers)

    def measured(model, model_loader, name) -> dict:  # each model fed with its own mean/std
        result = {**measure.measure(model, model_loader, runtime.device, batch_size, model.meta["mean"], model.meta["std"]), "model": name}
        if levels is not None:
            result["robustness"] = robust.measure(model, model_loader, runtime.device, *levels, clean=result[metric.best])
        return result

    rows, notes = {"student": measured(student, loader, target)}, []
    if teacher:
        try:
            t = artifacts.teacher_of(student)
        except UserError as e:
            notes.append(f"teacher skipped: {e.line()}")
        else:
            if t is not None:
                rows["teacher"] = measured(t, loader, t.origin)
    for extra in extras + based:  # each file fed by its own metadata, as a deployment would
        own_loader = eval_loader(task.eval_dataset(splits.val, extra.meta), batch_size, workers)
        key = f"base {extra.role}" if extra in based else extra.role
        key = key if key not in rows else f"{key} {extra.path.name}"
        rows[key] = measured(extra, own_loader, str(extra.file))
    if save:
        from lcdistill.checkpoint import atomic_write_json

        atomic_write_json(Path(save), rows)
    return Evaluation(rows, metric.columns, metric.best, rows["student"]["images"], notes)


def _run_data(folder: Path) -> str | None:
    from lcdistill.runfolder import RunFolder

    run_file = RunFolder(folder).inputs
    if run_file.is_file():
        data_dir = json.loads(run_file.read_text()).get("data")
        if data_dir and Path(data_dir).is_dir():
            return data_dir
    return None


def export(target: str, format: str = "all", *, out: str | None = None, data: str | None = None, opset: int = OPSET,
           tolerance: float = 1e-3, quantize: str = "none", calibration_images: int = CALIBRATION_IMAGES, weight_bits: int | None = None,
           eval_file: str | None = None, quiet: bool = False, console=None) -> Exported:
    """Export a run folder or student .safetensors (`lcdistill export`): student.onnx, student.pt (TorchScript),
    student.pt2 (torch.export) and hub/ (format "all", or one of them), each checked against PyTorch on real val
    images (data, default the run's own); quantize="int8" adds student.int8.onnx (weight_bits=4: student.w4a8.onnx).
    An export further from PyTorch than tolerance raises ParityError (a UserError). Lines go to `console`."""
    from lcdistill import artifacts, exporters
    from lcdistill.data import eval_loader
    from lcdistill.runfolder import RunFolder

    console = _console(quiet, console)
    if format not in FORMATS:
        raise UserError(f"unknown --format '{format}'", "choose onnx, torchscript, pt2, hub or all")
    if quantize not in ("none", "int8"):
        raise UserError(f"unknown --quantize '{quantize}'", "choose none or int8")
    if quantize == "int8" and format not in ("onnx", "all"):
        raise UserError("--quantize int8 quantizes the ONNX file", "use --format onnx or --format all")
    if weight_bits is not None and (quantize != "int8" or weight_bits not in (8, 4)):
        raise UserError(f"--weight-bits {weight_bits} needs --quantize int8 and a width of 8 or 4", "pass --quantize int8 --weight-bits 8 (or 4)")
    source_file = artifacts.identify(target, accept=("run", "weights"))
    loaded, task = source_file.loaded, source_file.task
    meta = loaded.meta
    trained_bits = meta["qat"].get("weight_bits", 8) if meta.get("qat") else None
    if trained_bits is not None and weight_bits not in (None, trained_bits):
        raise UserError(f"{target} was trained quantization-aware for {trained_bits}-bit weights, not --weight-bits {weight_bits}",
                        f"drop --weight-bits (or pass {trained_bits}); post-training int8 of another width starts from a float run")
    weight_bits = trained_bits or weight_bits or 8
    model = task.exportable(loaded.model)
    folder = RunFolder(Path(out) if out else source_file.folder)
    data_dir = data or _run_data(source_file.folder)
    if quantize == "int8" and not data_dir:
        raise UserError("--quantize int8 needs training images to calibrate with", "pass --data DIR (the run's own data is not found)")
    if data_dir:
        splits = task.scan(data_dir, check=False)
        item = task.batch(next(iter(eval_loader(task.eval_dataset(splits.val, meta), 8, 0))))
        batch, source = task.inputs(item, meta["mean"], meta["std"]), f"{len(item)} val images from {data_dir}"
    else:
        batch, source = task.export.example(meta, 8), "8 random inputs (pass --data for real images)"
    result = Exported({}, {})

    def say(line: str) -> None:
        result.lines.append(line)
        _say(console, line)

    files = result.files
    if format in ("onnx", "all"):
        files["onnx"] = exporters.to_onnx(model, meta, folder.export("onnx"), task.export, opset)
    if format in ("torchscript", "all"):
        files["torchscript"] = exporters.to_torchscript(model, meta, folder.export("torchscript"))
    if format in ("pt2", "all"):
        try:
            files["pt2"] = exporters.to_pt2(model, meta, folder.export("pt2"), task.export)
        except UserError as e:
            if format == "pt2":
                raise
            say(f"pt2: skipped: {e.line()}")
    if format in ("hub", "all"):
        from lcdistill import hubfolder

        files["hub"] = hubfolder.from_artifact(source_file, folder.hub, eval_file)
    result.parity.update(exporters.parity(model, files, batch, task.export))
    for fmt, diff in result.parity.items():
        say(f"{fmt}: {files[fmt]}  max |diff| vs PyTorch {diff:.2e} ({task.export.diff_text}) on {source} and batch 1")
    worst = max(result.parity.values(), default=0.0)
    if worst > tolerance:
        raise ParityError(f"export differs from PyTorch by {worst:.2e} > tolerance {tolerance:g}",
                          "report it with the model name; pass a larger tolerance only if the difference is acceptable")
    from lcdistill import export_sizes  # a dynamic height and width: parity at a second size and batch too

    shape, result.sizes = export_sizes.check(model, files, task.export, meta)
    for fmt, diff in result.sizes.items():
        say(f"{fmt}: max |diff| vs PyTorch {diff:.2e} ({task.export.diff_text}) at batch {shape[0]}, {shape[2]}x{shape[3]} (dynamic height and width)")
    if result.sizes and max(result.sizes.values()) > tolerance:
        raise ParityError(f"export differs from PyTorch by {max(result.sizes.values()):.2e} > tolerance {tolerance:g} at input {shape[2]}x{shape[3]}",
                          "report it with the model name; pass a larger tolerance only if the difference is acceptable")
    if quantize == "int8":
        from lcdistill.quantize import int8_export, ptq

        if meta.get("qat"):
            lines = int8_export.from_qat(loaded, task, meta, files["onnx"], data_dir, calibration_images, opset, batch)
        else:
            lines = int8_export.post_training(model, task, meta, files["onnx"], data_dir, calibration_images, batch, source, weight_bits)
        files["int8"] = ptq.int8_path(files["onnx"], trained_bits or weight_bits)
        for line in lines:
            say(line)
    return result


def load(target: str, device: str = "cpu"):
    """A student ready for inference, from a run folder, a student .safetensors, or an exported .onnx, .pt
    (TorchScript) or .pt2 file: an lcdistill.Model (an nn.Module in eval mode) whose `preprocessing` says what it
    expects (mean, std, input size, classes, task) and whose `predict(images)` takes PIL images or [0, 1] tensors."""
    from lcdistill import inference

    return inference.load(target, device)
