"""One training run, start to finish: check every input, then make the run folder and train.

Everything that can fail on user input is resolved in `prepare` before anything is
written, so bad input leaves no half-made run folder behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lcdistill import guardrails, methods, models, prune, recipe as recipes, tasks
from lcdistill.checkpoint import atomic_write_json, save_weights
from lcdistill.data.gpu import JpegDataset
from lcdistill.distributed import replica_check
from lcdistill.errors import TrainingStopped, UserError
from lcdistill.measure import flops
from lcdistill.models.transfer import init_from, init_line
from lcdistill.quantize import qat
from lcdistill.runfolder import RunFolder
from lcdistill.tasks import Splits, Task
from lcdistill.training import Runtime, Trainer, setup_runtime


@dataclass
class Prepared:
    recipe: dict
    inputs: dict  # data dir, teacher spec: what --resume needs besides the recipe
    task: Task
    splits: Splits
    student: models.Loaded
    teacher: models.Loaded | None
    input_size: int
    folder: RunFolder
    runtime: Runtime
    method_note: str = ""  # why this method, when no layer named one (the task's default)
    init: dict | None = None  # what --init loaded (models.transfer.InitReport.as_dict)
    qat: qat.Hook | None = None  # quantization-aware training's Trainer hooks (--quantize int8)
    kept: dict | None = None  # a cut student's surviving teacher channels per BatchNorm (fresh runs; prune.connectors=select)


def default_run_dir(recipe: dict) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    student = recipe["student"]
    named = f"prune-{student['name']}" if student["source"] == prune.SOURCE else student["name"]  # prune:R names no model
    name = f"{named}-{recipe['method']}".replace(":", "-").replace("/", "-")  # smp:Arch:encoder, a+b
    return Path("runs") / f"{name}-{stamp}"


def student_spec(student: dict) -> str:
    return student["name"] if student["source"] == "auto" else f"{student['source']}:{student['name']}"


def prepare(layers: list[dict], data_dir: str, teacher: str | None, teacher_weights: str | None, out: str | None, resume: bool = False) -> Prepared:
    """Every input checked, nothing written. layers: the recipe layers (a recipe file, the flags, --set);
    the task the data names lays its own defaults under them."""
    draft = recipes.build(layers)
    task = tasks.for_data(draft["task"], data_dir, (student_spec(draft["student"]), teacher))
    defaults = {key: dict(value) if isinstance(value, dict) else value for key, value in task.recipe_defaults.items()}
    for key, value in qat.finetune(draft).items():
        defaults[key] = {**defaults.get(key, {}), **value}
    recipe = recipes.build(layers, defaults)
    recipe["task"] = task.name  # the saved recipe names the task --task auto found
    runtime = setup_runtime(recipe["train"])
    if recipe["train"]["sync_bn"] and runtime.world > 1 and runtime.device.type != "cuda":  # torch's SyncBatchNorm only syncs GPU tensors
        raise UserError("train.sync_bn needs CUDA GPUs (SyncBatchNorm cannot sync CPU tensors)", "drop --set train.sync_bn=true on CPU; BN statistics are averaged over processes at each epoch end anyway")
    splits = task.scan(data_dir, skip_bad=recipe["data"]["skip_bad_images"])
    classes = splits.classes
    ratio = prune.ratio_of(recipe["student"])  # --student prune:R: the student is the teacher, cut
    loaded_teacher = None
    if methods.needs_teacher(recipe["method"]) or ratio is not None:
        if not teacher:
            what = f"--student prune:{ratio} cuts the teacher" if ratio is not None else f"method '{recipe['method']}' needs a teacher"
            raise UserError(what, "pass --teacher NAME_OR_RUN" + ("" if ratio is not None else ", or use --method ce"))
        loaded_teacher = task.resolve(teacher, len(classes), role="teacher", weights=teacher_weights, pretrained=True)
        if loaded_teacher.classes is not None and loaded_teacher.classes != classes:
            raise UserError(
                f"teacher {teacher} was trained on classes {loaded_teacher.classes[:5]}... which differ from the data's {classes[:5]}...",
                "fine-tune a teacher on this data first with `lcdistill train --model NAME --data DIR`",
            )
    torch.manual_seed(recipe["train"]["seed"])
    s = recipe["student"]
    init, cut, kept = None, None, None
    if ratio is None:
        student = task.resolve(student_spec(s), len(classes), role="student", weights=s["weights"], pretrained=s["pretrained"],
                               flag="--weights (student.weights in a recipe)", kwargs=s["kwargs"], keep_head=False)
        init = start_from(student, s, Path(out) if out else None, resume)
    # Unset sizes follow a teacher run (it was trained at them), else the student's own config (a cut student's is the teacher's).
    teacher_run = loaded_teacher.meta if loaded_teacher is not None else {}
    own = (student if ratio is None else loaded_teacher).data_config
    input_size = recipe["data"]["input_size"] or teacher_run.get("input_size", own["input_size"])[-1]
    crop_pct = recipe["data"]["crop_pct"] or teacher_run.get("crop_pct", own["crop_pct"])
    recipe["data"]["input_size"], recipe["data"]["crop_pct"] = int(input_size), float(crop_pct)
    if ratio is not None:  # cut once, at the size the run trains at; a resumed run rebuilds the cut from inputs.json
        task.configure(loaded_teacher, int(input_size))
        student, cut, kept = cut_student(loaded_teacher, ratio, recipe["prune"], task, int(input_size), Path(out) if out and resume else None)
    student.data_config["crop_pct"] = float(crop_pct)
    if recipe["train"]["sync_bn"] and runtime.world > 1:
        student.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student.model)
    for loaded in (student, loaded_teacher):  # a detector resizes to the input size inside (teacher and student alike)
        if loaded is not None:
            task.configure(loaded, int(input_size))
    run_dir = Path(out) if out else default_run_dir(recipe)
    if runtime.world > 1 and not out:  # ranks may start in different seconds: all take rank 0's folder name
        shared = [run_dir]
        dist.broadcast_object_list(shared, src=0)
        run_dir = shared[0]
    check_writable(run_dir)
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"run folder {run_dir} already exists and is not empty", f"continue it with --resume {run_dir}, or choose another --out")
    inputs = {"data": str(Path(data_dir).resolve()), "teacher": teacher, "teacher_weights": teacher_weights, "classes": classes,
              "skipped_files": splits.skipped, **({"init": init} if init else {}), **({"prune": cut} if cut else {}), **qat.base_input(recipe)}
    return Prepared(recipe, inputs, task, splits, student, loaded_teacher, int(input_size), RunFolder(run_dir), runtime,
                    method_note(task, layers), init, qat.hook(recipe, task, student.model, int(input_size), len(splits.train.samples), runtime.world), kept)


def cut_student(teacher: models.Loaded, ratio: float, settings: dict, task: Task, input_size: int,
                resumed: Path | None) -> tuple[models.Loaded, dict, dict | None]:
    """The student cut from the teacher, its record for inputs.json and the teacher channels it kept; a resumed
    run's, rebuilt from that record without the pruner."""
    if resumed is not None and RunFolder(resumed).inputs.is_file():
        try:
            record = json.loads(RunFolder(resumed).inputs.read_text()).get("prune")
        except (json.JSONDecodeError, AttributeError):
            record = None
        return prune.rebuilt(record, teacher), record, None
    done = prune.cut(teacher, ratio, settings, task, input_size)
    return done.student, {**done.record(), "line": done.line(input_size)}, done.kept


def start_from(student: models.Loaded, s: dict, run_dir: Path | None, resume: bool) -> dict | None:
    """Load what fits of student.init (--init) into the student and say what; a resumed run's checkpoint
    holds the weights already, so it only reads back what the first start recorded."""
    if not s.get("init"):
        return None
    if s["weights"]:
        raise UserError("--init and --weights both give the student its starting weights", "pass one of them")
    if resume:
        return json.loads(RunFolder(run_dir).inputs.read_text()).get("init") if run_dir else None
    report = init_from(student.model, student.arch, s["init"])
    student.origin += f" (init: {s['init']})"
    return report.as_dict()


def method_note(task: Task, layers: list[dict]) -> str:
    """'(segmentation's default: cwd measured strongest, ...)' when no recipe layer set the method, else ''."""
    if any("method" in layer for layer in layers):
        return ""
    if "method" not in task.recipe_defaults:
        return " (the default)"
    reason = getattr(task, "default_method_reason", "")
    return f" ({task.name}'s default" + (f": {reason})" if reason else ")")


def check_writable(run_dir: Path) -> None:
    """Fail before training, not at the first checkpoint, when the run folder cannot be written."""
    probe_in = run_dir
    while not probe_in.exists() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    fix = "choose another --out in a folder you can write to"
    if not probe_in.is_dir():
        raise UserError(f"run folder {run_dir} cannot be created: {probe_in} is not a folder", fix)
    try:  # a real write: os.access says yes to root on read-only mounts and no to some ACLs
        tempfile.TemporaryDirectory(dir=probe_in, prefix=".lcdistill-probe-").cleanup()
    except OSError as e:
        raise UserError(f"run folder {run_dir} cannot be written ({e.strerror or type(e).__name__} in {probe_in})", fix) from None


def load_resume(run_dir: str) -> tuple[dict, dict]:
    """The recipe and inputs a run folder was started with."""
    folder = RunFolder(run_dir)
    if not folder.started():
        raise UserError(f"{folder} is not an lcdistill run folder (no {folder.inputs.name} / {folder.recipe.name})", "pass the --out folder of an earlier `lcdistill compress`")
    if not folder.last.is_file():
        raise UserError(f"{folder} has no checkpoint to resume from", "start the run again without --resume")
    recipe = recipes.build([recipes.read_yaml(folder.recipe)])
    return recipe, json.loads(folder.inputs.read_text())


def build_distiller(p: Prepared):
    teacher = p.teacher.model if p.teacher else None
    teacher_cfg = p.teacher.data_config if p.teacher else None
    distiller = methods.build(p.recipe, p.task, p.student.model, teacher, p.student.data_config, teacher_cfg)
    if p.kept and p.recipe["prune"]["connectors"] == "select":  # a resumed run's connectors come from its checkpoint
        prune.select_connectors(distiller.terms, p.kept)
    return distiller


def run(p: Prepared, console: Console, resume: bool = False) -> dict:
    rt, folder = p.runtime, p.folder
    distiller = build_distiller(p)
    train_set, val_set = p.task.datasets(p.splits, p.input_size, p.student.data_config, p.recipe, rt.device)
    trainer = Trainer(distiller, p.recipe, train_set, val_set, folder, rt, console, len(p.splits.classes), hooks=(p.qat,) if p.qat else ())
    created = False
    if rt.world > 1:
        dist.barrier()  # every rank has checked the folder before rank 0 makes it
    if rt.main:
        created = not folder.path.exists()
        folder.path.mkdir(parents=True, exist_ok=True)
        if not resume:
            recipes.save(p.recipe, folder.recipe)
            atomic_write_json(folder.inputs, p.inputs)
    if resume:
        trainer.resume()
        console.print(f"resuming {folder} at epoch {trainer.epoch + 1}, step {trainer.step_in_epoch}")
    if rt.main:
        role = "student" if p.teacher else "model"
        console.print(f"[bold]{p.recipe['method']}[/]{escape(p.method_note)}: {role} {p.student.origin} ({p.student.params / 1e6:.2f}M params)"
                      + (f" <- teacher {p.teacher.origin} ({p.teacher.params / 1e6:.2f}M)" if p.teacher else "")
                      + f", {len(p.splits.train.samples)} train / {len(p.splits.val.samples)} val images, {len(p.splits.classes)} classes, {p.input_size}px, {rt.device}")
        if p.init:
            console.print(f"  {escape(init_line(p.init))}")
        if p.inputs.get("prune"):
            console.print(f"  cut from the teacher: {escape(p.inputs['prune']['line'])}")
        if p.qat:
            console.print(f"  {escape(qat.line(p.qat.report))}")
        for line in distiller.describe():
            console.print(f"  {line}")
        guardrails.warn(p, console)  # settings that run but are likely mistakes: one line each, naming the flag
        if isinstance(train_set, JpegDataset):
            console.print(f"  JPEGs decoded and augmented on {rt.device} (data.gpu_decode)")
        if p.splits.report:
            console.print(f"  {p.splits.report}")
        if p.splits.skipped:
            console.print(f"skipped {len(p.splits.skipped)} unreadable image files (--skip-bad-images), e.g. {p.splits.skipped[0]}")
    try:
        trainer.fit()
    except BaseException:
        # Nothing worth keeping yet (no checkpoint to resume): leave no half-made run folder behind.
        if rt.main and created and not folder.last.exists():
            shutil.rmtree(folder.path, ignore_errors=True)
        raise
    # Collectives: every rank takes part, then rank 0 alone writes.
    replicas = replica_check([trainer.distiller, trainer.ema], rt.world)
    teacher_val = trainer.evaluate(p.teacher.model, (p.teacher.data_config["mean"], p.teacher.data_config["std"])) if p.teacher else None
    summary = {}
    if rt.main:
        try:
            summary = finish(p, trainer, console, teacher_val, replicas)
        except OSError as e:  # disk full, folder removed: the last checkpoint still holds everything
            raise TrainingStopped(f"could not write the student to {folder} ({e.strerror or e})",
                                  f"free disk space, then finish with `lcdistill compress --resume {folder}`") from None
    if rt.world > 1:
        dist.barrier()
    return summary


def shipped(row: dict, metric) -> dict[str, float]:
    """The metric values of what is shipped: the EMA copy's when EMA is on."""
    return {key: row.get(f"ema_{key}", row[f"val_{key}"]) for _, key in metric.columns}


def finish(p: Prepared, trainer: Trainer, console: Console, teacher_val: dict, replicas: dict | None = None) -> dict:
    """Write the shippable student and print teacher beside student (teacher_val: its metric, from all ranks)."""
    student, shipped_qat = trainer.final_student(), None
    weights = student.state_dict()
    if p.qat:  # the weights on their int8 grid in the plain architecture, and the activation scales learnt (its finish hook)
        weights, shipped_qat = p.qat.shipped
    metric = p.task.metric(len(p.splits.classes))
    values = shipped(trainer.rows[-1], metric)
    size = [3, p.input_size, p.input_size]
    example = p.task.export.example({"input_size": size}, 1)
    count = lambda model: flops(model, example)  # noqa: E731
    teacher_entry = None
    rows = [("student" if p.teacher else "model", p.student.origin, values, p.student.params, count(student))]
    if p.teacher is not None:
        t = {key: teacher_val[key] for _, key in metric.columns}
        teacher_entry = {"spec": p.teacher.spec, "origin": p.teacher.origin, **t, "params": p.teacher.params}
        rows.insert(0, ("teacher", p.teacher.origin, t, p.teacher.params, count(p.teacher.model)))
    meta = models.model_meta(p.student, p.splits.classes, size, {
        **p.task.metadata(p.splits.classes), "method": p.recipe["method"], **values, "teacher": teacher_entry, "epochs": trainer.epoch,
        **({"ddp": replicas} if replicas else {}), **({"init": p.init} if p.init else {}), **({"qat": shipped_qat} if shipped_qat else {}),
    })
    if replicas and not replicas["ranks_identical"]:
        console.print(f"[bold red]warning[/]: the {replicas['world']} processes ended with different weights (see ddp in {p.folder.meta.name}); rank 0's are saved")
    save_weights(p.folder.student, weights, {"lcdistill": meta})
    atomic_write_json(p.folder.meta, meta)
    table = Table(title=f"{p.folder}")
    for column in ("", "model", *(h for h, _ in metric.columns), "params", "GFLOPs"):
        table.add_column(column, justify="right" if column not in ("", "model") else "left")
    for role, origin, vals, n, fl in rows:
        table.add_row(role, origin, *(f"{vals[key]:.2f}" for _, key in metric.columns), f"{n / 1e6:.2f}M", f"{fl / 1e9:.3f}")
    console.print(table)
    return {"run": str(p.folder), "student": {**values, "params": p.student.params},
            "teacher": {**rows[0][2], "params": p.teacher.params} if p.teacher else None}
