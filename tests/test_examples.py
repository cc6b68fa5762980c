"""The runnable examples under examples/: a plain PyTorch loop and a PyTorch Lightning module around lcdistill.Distiller.

The plain loop is held to `lcdistill compress` bit for bit: its student (made as the example makes it), its distiller and
its loop, fed the batches, optimizer and schedule compress uses, ship the student compress shipped, tensor for tensor,
and so the same top-1 (on CPU, one thread, as the suite runs). The example's own torchvision pipeline augments
differently, so run as a script it lands within a seed's noise of compress, not on it (docs/api.md has the figures).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import lcdistill
from lcdistill import recipe as recipes, tasks
from lcdistill.checkpoint import load_weights
from lcdistill.runfolder import RunFolder
from lcdistill.training import setup, setup_runtime

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # the examples import each other, as scripts do

import plain_loop  # noqa: E402


class PerStep:
    """timm's per-update scheduler behind torch's step() (compress's Trainer calls step_update after each step)."""

    def __init__(self, scheduler):
        self.scheduler, self.updates = scheduler, 0

    def step(self) -> None:
        self.updates += 1
        self.scheduler.step_update(num_updates=self.updates)


def test_the_plain_loop_ships_compress_s_student_bit_for_bit(compress_run, teacher_run, small_data):
    run = compress_run("london")  # the CLI: ce + kd + london, seed 0, 1 epoch at 32 px, batch 32, CPU
    recipe = recipes.build([recipes.read_yaml(RunFolder(run).recipe)])
    task = tasks.get(recipe["task"])
    splits = task.scan(small_data)
    runtime = setup_runtime(recipe["train"])
    # compress's batches: its datasets (seeded per sample) and loaders (seeded order) from its own recipe
    config = {**lcdistill.load(run).meta, "crop_pct": recipe["data"]["crop_pct"]}
    train_set, val_set = task.datasets(splits, recipe["data"]["input_size"], config, recipe, runtime.device)
    batch = setup.local_batch(recipe["schedule"]["batch_size"], len(train_set), 1)
    train_loader, val_loader = setup.loaders(train_set, val_set, batch, 0, recipe["train"]["seed"], runtime)
    # the student as the example makes it, then the distiller (its connectors draw from the random stream next, as in compress)
    student = plain_loop.make_student(len(splits.classes), recipe["train"]["seed"])
    distiller = lcdistill.Distiller(student, teacher_run, recipe["method"], input_size=recipe["data"]["input_size"],
                                    steps_per_epoch=len(train_loader), loss=recipe["loss"], kd=recipe["kd"], london=recipe["london"])
    # compress's optimizer (timm's sgd: nesterov, no decay on biases and norms) and per-step cosine schedule
    optimizer, scheduler, _, _ = setup.optimization(distiller, student, recipe, len(train_loader), runtime)
    plain_loop.fit(distiller, train_loader, optimizer, PerStep(scheduler), recipe["schedule"]["epochs"])

    shipped = load_weights(RunFolder(run).student)
    mine = distiller.student.state_dict()
    assert set(mine) == set(shipped)
    different = [k for k in shipped if not torch.equal(mine[k], shipped[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    recorded = json.loads(RunFolder(run).meta.read_text())["top1"]
    assert plain_loop.top1(distiller, val_loader) == pytest.approx(recorded, abs=1e-9)


def test_the_plain_loop_runs_as_a_script_and_its_student_loads(teacher_run, small_data, tmp_path, capsys):
    out = tmp_path / "student.safetensors"
    accuracy = plain_loop.main(["--data", str(small_data), "--teacher", str(teacher_run), "--epochs", "1", "--batch-size", "32",
                                "--out", str(out)])
    printed = capsys.readouterr().out
    assert "epoch 1/1: ce " in printed and " kd " in printed and " lip " in printed
    model = lcdistill.load(out)
    assert model.preprocessing.classes == sorted(p.name for p in (small_data / "val").iterdir())
    assert model.preprocessing.input_size == (3, 32, 32) and model.preprocessing.crop_pct == 1.0  # the teacher run's
    images = [p for folder in sorted((small_data / "val").iterdir()) for p in sorted(folder.iterdir())]
    from PIL import Image

    scores = model.predict([Image.open(p) for p in images])
    labels = torch.tensor([model.classes.index(p.parent.name) for p in images])
    assert 100.0 * (scores.argmax(1) == labels).float().mean().item() == pytest.approx(accuracy)


def test_the_lightning_example_trains_and_its_student_exports_with_parity(teacher_run, small_data, tmp_path):
    pytest.importorskip("lightning", reason="the Lightning example needs pip install 'lcdistill[lightning]'")
    import lightning_module

    out = tmp_path / "student.safetensors"
    trainer = lightning_module.main(["--data", str(small_data), "--teacher", str(teacher_run), "--epochs", "1", "--batch-size", "32",
                                     "--out", str(out)])
    assert trainer.state.finished and trainer.global_step == len(list((small_data / "train").rglob("*.png"))) // 32
    module = trainer.lightning_module
    assert not any(k.startswith("distiller.teacher") for k in module.state_dict())  # Lightning's checkpoint: student + connectors
    assert all(not p.requires_grad for p in module.distiller.teacher.parameters()) and not module.distiller.teacher.training

    exported = lcdistill.export(out, format="onnx", data=small_data, tolerance=1e-4, quiet=True)
    assert exported.parity["onnx"] < 1e-4 and exported.files["onnx"].is_file()
    x = torch.rand(5, 3, 32, 32)
    torch_model, onnx_model = lcdistill.load(out), lcdistill.load(exported.files["onnx"])
    assert onnx_model.preprocessing == torch_model.preprocessing
    assert (onnx_model.predict(x) - torch_model.predict(x)).abs().max().item() < 1e-4
