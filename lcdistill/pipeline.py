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
from rich.table import Table

from lcdistill import data, gpu_data, models, recipe as recipes
from lcdistill.checkpoint import atomic_write_json, save_weights
from lcdistill.distributed import replica_check
from lcdistill.errors import UserError
from lcdistill.evaluate import flops
from lcdistill.methods import METHODS
from lcdistill.trainer import LAST, Runtime, Trainer, TrainingStopped, setup_runtime

RUN_FILE = "run.json"
RECIPE_FILE = "recipe.yaml"


@dataclass
class Prepared:
    recipe: dict
    inputs: dict  # data dir, teacher spec: what --resume needs besides the recipe
    train_split: data.Split
    val_split: data.Split
    student: models.Loaded
    teacher: models.Loaded | None
    input_size: int
    run_dir: Path
    runtime: Runtime


def default_run_dir(recipe: dict) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{recipe['student']['name']}-{recipe['method']}-{stamp}"


def student_spec(student: dict) -> str:
    return student["name"] if student["source"] == "auto" else f"{student['source']}:{student['name']}"


def prepare(recipe: dict, data_dir: str, teacher: str | None, teacher_weights: str | None, out: str | None, resume: bool = False) -> Prepared:
    runtime = setup_runtime(recipe["train"])
    if recipe["train"]["sync_bn"] and runtime.world > 1 and runtime.device.type != "cuda":  # torch's SyncBatchNorm only syncs GPU tensors
        raise UserError("train.sync_bn needs CUDA GPUs (SyncBatchNorm cannot sync CPU tensors)", "drop --set train.sync_bn=true on CPU; BN statistics are averaged over processes at each epoch end anyway")
    train_split, val_split = data.scan(data_dir, skip_bad=recipe["data"]["skip_bad_images"])
    classes = train_split.classes
    method = METHODS[recipe["method"]]
    loaded_teacher = None
    if method.needs_teacher:
        if not teacher:
            raise UserError(f"method '{recipe['method']}' needs a teacher", "pass --teacher NAME_OR_RUN, or use --method ce")
        loaded_teacher = models.resolve(teacher, len(classes), weights=teacher_weights, pretrained=True)
        if loaded_teacher.classes is not None and loaded_teacher.classes != classes:
            raise UserError(
                f"teacher {teacher} was trained on classes {loaded_teacher.classes[:5]}... which differ from the data's {classes[:5]}...",
                "fine-tune a teacher on this data first with `lcdistill train --model NAME --data DIR`",
            )
    torch.manual_seed(recipe["train"]["seed"])
    s = recipe["student"]
    student = models.resolve(student_spec(s), len(classes), weights=s["weights"], pretrained=s["pretrained"],
                             flag="--weights (student.weights in a recipe)", kwargs=s["kwargs"], keep_head=False)
    if recipe["train"]["sync_bn"] and runtime.world > 1:
        student.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student.model)
    # Unset sizes follow a teacher run (it was trained at them), else the student's own config.
    teacher_run = loaded_teacher.meta if loaded_teacher is not None else {}
    input_size = recipe["data"]["input_size"] or teacher_run.get("input_size", student.data_config["input_size"])[-1]
    crop_pct = recipe["data"]["crop_pct"] or teacher_run.get("crop_pct", student.data_config["crop_pct"])
    recipe["data"]["input_size"], recipe["data"]["crop_pct"] = int(input_size), float(crop_pct)
    student.data_config["crop_pct"] = float(crop_pct)
    run_dir = Path(out) if out else default_run_dir(recipe)
    if runtime.world > 1 and not out:  # ranks may start in different seconds: all take rank 0's folder name
        shared = [run_dir]
        dist.broadcast_object_list(shared, src=0)
        run_dir = shared[0]
    check_writable(run_dir)
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"run folder {run_dir} already exists and is not empty", f"continue it with --resume {run_dir}, or choose another --out")
    inputs = {"data": str(Path(data_dir).resolve()), "teacher": teacher, "teacher_weights": teacher_weights, "classes": classes,
              "skipped_files": train_split.skipped + val_split.skipped}
    return Prepared(recipe, inputs, train_split, val_split, student, loaded_teacher, int(input_size), run_dir, runtime)


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
    folder = Path(run_dir)
    if not (folder / RUN_FILE).is_file() or not (folder / RECIPE_FILE).is_file():
        raise UserError(f"{folder} is not an lcdistill run folder (no {RUN_FILE} / {RECIPE_FILE})", "pass the --out folder of an earlier `lcdistill compress`")
    if not (folder / "checkpoints" / LAST).is_file():
        raise UserError(f"{folder} has no checkpoint to resume from", "start the run again without --resume")
    recipe = recipes.build([recipes.read_yaml(folder / RECIPE_FILE)])
    return recipe, json.loads((folder / RUN_FILE).read_text())


def build_distiller(p: Prepared):
    method = METHODS[p.recipe["method"]]
    teacher = p.teacher.model if p.teacher else None
    teacher_cfg = p.teacher.data_config if p.teacher else None
    return method(p.student.model, teacher, p.recipe, p.student.data_config, teacher_cfg)


def run(p: Prepared, console: Console, resume: bool = False) -> dict:
    rt = p.runtime
    distiller = build_distiller(p)
    train_set = data.ImageDataset(p.train_split, data.transforms(p.input_size, p.student.data_config, p.recipe["data"], True), p.recipe["train"]["seed"], p.recipe["data"]["skip_bad_images"])
    val_set = data.ImageDataset(p.val_split, data.eval_transform({**p.student.data_config, "input_size": [3, p.input_size, p.input_size]}), skip_bad=p.recipe["data"]["skip_bad_images"])
    # JPEG folders on CUDA: decode and augment on the GPU instead (data.gpu_decode)
    train_set = gpu_data.pick(train_set, p.train_split, p.input_size, p.student.data_config, p.recipe, rt.device, training=True)
    val_set = gpu_data.pick(val_set, p.val_split, p.input_size, p.student.data_config, p.recipe, rt.device, training=False)
    trainer = Trainer(distiller, p.recipe, train_set, val_set, p.run_dir, rt, console)
    created = False
    if rt.world > 1:
        dist.barrier()  # every rank has checked the folder before rank 0 makes it
    if rt.main:
        created = not p.run_dir.exists()
        p.run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            recipes.save(p.recipe, p.run_dir / RECIPE_FILE)
            atomic_write_json(p.run_dir / RUN_FILE, p.inputs)
    if resume:
        trainer.resume_from(p.run_dir / "checkpoints" / LAST)
        console.print(f"resuming {p.run_dir} at epoch {trainer.epoch + 1}, step {trainer.step_in_epoch}")
    if rt.main:
        role = "student" if p.teacher else "model"
        console.print(f"[bold]{p.recipe['method']}[/]: {role} {p.student.origin} ({p.student.params / 1e6:.2f}M params)"
                      + (f" <- teacher {p.teacher.origin} ({p.teacher.params / 1e6:.2f}M)" if p.teacher else "")
                      + f", {len(p.train_split.samples)} train / {len(p.val_split.samples)} val images, {len(p.train_split.classes)} classes, {p.input_size}px, {rt.device}")
        for line in getattr(distiller, "describe", lambda: [])():
            console.print(f"  pair {line}")
        if isinstance(train_set, gpu_data.JpegDataset):
            console.print(f"  JPEGs decoded and augmented on {rt.device} (data.gpu_decode)")
        skipped = p.train_split.skipped + p.val_split.skipped
        if skipped:
            console.print(f"skipped {len(skipped)} unreadable image files (--skip-bad-images), e.g. {skipped[0]}")
    try:
        last = trainer.fit()
    except BaseException:
        # Nothing worth keeping yet (no checkpoint to resume): leave no half-made run folder behind.
        if rt.main and created and not (p.run_dir / "checkpoints" / LAST).exists():
            shutil.rmtree(p.run_dir, ignore_errors=True)
        raise
    summary = {"student": {"top1": last.get("ema_top1", last["val_top1"]), "top5": last.get("ema_top5", last["val_top5"])}}
    # Collectives: every rank takes part, then rank 0 alone writes.
    replicas = replica_check([trainer.trainable, trainer.ema], rt.world)
    teacher_val = trainer.evaluate(p.teacher.model, (p.teacher.data_config["mean"], p.teacher.data_config["std"])) if p.teacher else None
    if rt.main:
        try:
            summary = finish(p, trainer, console, teacher_val, replicas)
        except OSError as e:  # disk full, folder removed: the last checkpoint still holds everything
            raise TrainingStopped(f"could not write the student to {p.run_dir} ({e.strerror or e})",
                                  f"free disk space, then finish with `lcdistill compress --resume {p.run_dir}`") from None
    if rt.world > 1:
        dist.barrier()
    return summary


def finish(p: Prepared, trainer: Trainer, console: Console, teacher_val: dict | None = None, replicas: dict | None = None) -> dict:
    """Write the shippable student and print teacher beside student (teacher_val: its accuracy, from all ranks)."""
    student = trainer.final_student()
    last = trainer.rows[-1]
    size = [3, p.input_size, p.input_size]
    top1, top5 = last.get("ema_top1", last["val_top1"]), last.get("ema_top5", last["val_top5"])
    teacher_entry = None
    rows = [("student" if p.teacher else "model", p.student.origin, top1, top5, p.student.params, flops(student, size))]
    if p.teacher is not None:
        t = teacher_val or trainer.evaluate(p.teacher.model, (p.teacher.data_config["mean"], p.teacher.data_config["std"]))
        teacher_entry = {"spec": p.teacher.spec, "origin": p.teacher.origin, "top1": t.get("top1"), "top5": t.get("top5"), "params": p.teacher.params}
        rows.insert(0, ("teacher", p.teacher.origin, t["top1"], t["top5"], p.teacher.params, flops(p.teacher.model, size)))
    meta = models.model_meta(p.student, p.train_split.classes, size, {
        "method": p.recipe["method"], "top1": top1, "top5": top5, "teacher": teacher_entry, "epochs": trainer.epoch,
        **({"ddp": replicas} if replicas else {}),
    })
    if replicas and not replicas["ranks_identical"]:
        console.print(f"[bold red]warning[/]: the {replicas['world']} processes ended with different weights (see ddp in {models.META_FILE}); rank 0's are saved")
    save_weights(p.run_dir / models.MODEL_FILE, {k: v for k, v in student.state_dict().items()}, {"lcdistill": meta})
    atomic_write_json(p.run_dir / models.META_FILE, meta)
    table = Table(title=f"{p.run_dir}")
    for column in ("", "model", "top-1 %", "top-5 %", "params", "GFLOPs"):
        table.add_column(column, justify="right" if column not in ("", "model") else "left")
    for role, origin, t1, t5, n, fl in rows:
        table.add_row(role, origin, f"{t1:.2f}", f"{t5:.2f}", f"{n / 1e6:.2f}M", f"{fl / 1e9:.3f}")
    console.print(table)
    return {"run": str(p.run_dir), "student": {"top1": top1, "top5": top5, "params": p.student.params},
            "teacher": {"top1": rows[0][2], "top5": rows[0][3], "params": p.teacher.params} if p.teacher else None}
