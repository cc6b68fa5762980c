"""lcdistill's Python API: the package face (lazy, fast to import), the Distiller in a caller's hands, and every
public function's bad input raised as one UserError with the problem and the fix."""

from __future__ import annotations

import json
import pydoc
import subprocess
import sys

import pytest
import timm
import torch

import lcdistill
from lcdistill import api
from lcdistill.errors import UserError
from lcdistill.runfolder import RunFolder

PUBLIC = ("Distiller", "compress", "train", "evaluate", "export", "load", "UserError")


# ---- the package face -----------------------------------------------------------------------------------
def test_import_lcdistill_loads_neither_torch_nor_the_api():
    code = ("import sys, time; t = time.perf_counter(); import lcdistill; took = time.perf_counter() - t; "
            "print(took, sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'lcdistill')))")
    took, loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 1)
    assert eval(loaded) == ["lcdistill", "lcdistill.errors"]
    assert float(took) < 0.5  # a few milliseconds; the bound only catches a heavy import creeping in


def test_help_lists_the_public_names():
    text = pydoc.render_doc(lcdistill, renderer=pydoc.plaintext)
    for name in PUBLIC:
        assert f"    {name} " in text, name
    assert set(PUBLIC) <= set(lcdistill.__all__) and set(PUBLIC) <= set(dir(lcdistill))
    assert "image classifiers, semantic segmentation models, object detectors" in lcdistill.__doc__


def test_the_public_functions_are_the_api_s_even_beside_the_modules_they_use():
    import lcdistill.training  # noqa: F401  (what would shadow lcdistill.train were the loop still a package of that name)

    assert lcdistill.train is api.train and lcdistill.evaluate is api.evaluate and lcdistill.export is api.export
    assert lcdistill.compress is api.compress and lcdistill.load is api.load and lcdistill.UserError is UserError
    with pytest.raises(AttributeError):
        lcdistill.no_such_name  # noqa: B018


def test_compress_and_train_take_every_cli_training_option_as_a_keyword():
    from lcdistill.cli.common import TRAINING

    for function in (api.compress, api.train):
        import inspect

        keywords = inspect.signature(function).parameters
        assert set(TRAINING) <= set(keywords), set(TRAINING) - set(keywords)
        assert "overrides" in keywords


# ---- the Distiller ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    return timm.create_model("mobilenetv2_050", num_classes=10), timm.create_model("resnet18", num_classes=10)


def test_the_distiller_holds_the_teacher_outside_its_state_and_parameters(pair):
    student, teacher = pair
    distiller = lcdistill.Distiller(student, teacher, "kd+london", input_size=32, steps_per_epoch=4, london={"alpha": 0.5})
    state = distiller.state_dict()
    teacher_tensors = {t.data_ptr() for t in teacher.state_dict().values()}
    assert not any(k.startswith("teacher") for k in state) and not teacher_tensors & {t.data_ptr() for t in state.values()}
    assert {k.split(".")[0] for k in state} == {"student", "terms"}
    trained = {id(p) for p in distiller.parameters()}
    assert not trained & {id(p) for p in teacher.parameters()} and all(not p.requires_grad for p in teacher.parameters())
    connectors = distiller.extra_parameters()
    assert connectors and {id(p) for p in connectors} == trained - {id(p) for p in student.parameters()}
    distiller.train()
    assert student.training and not teacher.training
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    scores, losses = distiller((x, y))
    assert scores.shape == (4, 10) and set(losses) == {"ce", "kd", "lip"} and distiller.steps == 1
    assert distiller.progress == 0.0 and distiller.term("london").alpha == 0.5
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters()) and student.get_classifier().weight.grad is not None
    with torch.no_grad():
        scores, losses = distiller(x)  # images alone: the prediction, no losses, no step counted
    assert scores.shape == (4, 10) and losses == {} and distiller.steps == 1


def test_the_distiller_is_built_as_compress_builds_the_method(pair):
    student, teacher = pair
    distiller = lcdistill.Distiller(student, teacher, input_size=32, steps_per_epoch=1)
    assert distiller.recipe["method"] == "london" and [t.name for t in distiller.terms] == ["kd", "london"]  # the task's default
    normalised = lcdistill.Distiller(student, teacher, "kd", normalize=False)
    assert normalised.student_stats == normalised.teacher_stats == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def _raises(call, *words: str) -> UserError:
    with pytest.raises(UserError) as caught:
        call()
    error = caught.value
    assert error.message and error.fix, error.line()
    for word in words:
        assert word.lower() in error.line().lower(), (word, error.line())
    return error


def test_the_distiller_s_bad_input_is_one_user_error(pair):
    student, teacher = pair
    D = lcdistill.Distiller
    _raises(lambda: D(student, teacher, "kd+lodnon"), "unknown method", "london")
    _raises(lambda: D(student, teacher, "kd+dist"), "logit terms")
    _raises(lambda: D(student, teacher, "kd+london", london={"alpah": 1.0}), "alpah", "alpha")  # the valid keys named
    _raises(lambda: D(student, teacher, "kd", kd={"temperature": 0}), "kd.temperature")
    _raises(lambda: D(student, teacher, "kd", epochs=3), "epochs=", "london=")
    _raises(lambda: D(student, None, "kd"), "needs a teacher", "teacher=")
    _raises(lambda: D(42, teacher, "kd"), "student must be", "nn.Module")
    _raises(lambda: D(student, 3.5, "kd"), "teacher must be")
    _raises(lambda: D("mobilenetv2_050", teacher, "kd"), "class count", "num_classes")
    _raises(lambda: D(student, "no/such/run", "kd", num_classes=10), "no/such/run")
    _raises(lambda: D(student, teacher, "kd", task="auto"), "task")
    _raises(lambda: D(student, teacher, "kd", task="captioning"), "unknown task", "classification")
    ramped = D(student, teacher, "kd+london", input_size=32).train()
    x, y = torch.rand(2, 3, 32, 32), torch.randint(0, 10, (2,))
    _raises(lambda: ramped((x, y)), "london.warmup_epochs=3", "steps_per_epoch")
    assert set(ramped((x, y), epoch=0.5)[1]) == {"ce", "kd", "lip"}  # told how far training is, it runs
    _raises(lambda: ramped(((x * 255).byte(), y), epoch=0), "float", "[0, 1]")
    _raises(lambda: ramped([x], epoch=0), "(images, targets)")
    _raises(lambda: D(student, teacher, "kd").save("/tmp/unused.safetensors"), "class names", "classes=")


# ---- the functions -------------------------------------------------------------------------------------
def test_the_functions_bad_input_is_one_user_error(tmp_path, small_data):
    _raises(lambda: lcdistill.compress("t", "mobilenetv2_050", None), "--data is missing")
    _raises(lambda: lcdistill.compress("t", "mobilenetv2_050", small_data, epochs="3"), "epochs must be int", "epochs=")
    _raises(lambda: lcdistill.compress("t", "mobilenetv2_050", small_data, overrides=3), "overrides", "kd.temperature")
    _raises(lambda: lcdistill.compress("t", "mobilenetv2_050", small_data, overrides={"kd.temprature": 2}), "temprature", "temperature")
    _raises(lambda: lcdistill.compress(resume=str(tmp_path), epochs=3), "--resume", "--epochs")
    _raises(lambda: lcdistill.train(None, small_data), "--model is missing")
    _raises(lambda: lcdistill.train("resnet18", small_data, recipe=str(tmp_path / "none.yaml")), "none.yaml")
    _raises(lambda: lcdistill.evaluate(tmp_path / "nothing", data=small_data), "nothing", "run folder")
    _raises(lambda: lcdistill.evaluate(tmp_path / "nothing", data=small_data, noise="lots"), "--noise")
    _raises(lambda: lcdistill.export(tmp_path / "nothing", "onnx"), "nothing", "compress")
    _raises(lambda: lcdistill.export(tmp_path / "nothing", "tflite"), "--format", "onnx")
    _raises(lambda: lcdistill.export(tmp_path / "nothing", "torchscript", quantize="int8"), "--quantize int8", "--format onnx")
    _raises(lambda: lcdistill.load(tmp_path / "nothing.onnx"), "nothing.onnx")
    assert not list(tmp_path.iterdir())  # nothing half-made


def test_compress_evaluate_and_load_from_python(compress_run, small_data, tmp_path):
    """The CLI's own run (it calls lcdistill.compress) read back through the Python functions."""
    run = compress_run("ce")
    meta = json.loads(RunFolder(run).meta.read_text())
    result = lcdistill.evaluate(run, data=small_data, device="cpu", workers=0, batch_size=16, save=tmp_path / "eval.json")
    assert result.best == "top1" and result.best_header == "top-1 %" and result.images == 60
    assert result.rows["student"]["top1"] == pytest.approx(meta["top1"]) and "teacher" not in result.rows
    assert json.loads((tmp_path / "eval.json").read_text())["student"]["top1"] == result.rows["student"]["top1"]
    model = lcdistill.load(run)
    assert isinstance(model, torch.nn.Module) and not model.training and model.preprocessing.classes == meta["classes"]
    assert model.preprocessing.mean == tuple(meta["mean"]) and model.preprocessing.input_size == (3, 32, 32)
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(model.predict(x), model(model.preprocess(x)))
    _raises(lambda: model.predict(torch.zeros(3, 32, 32, dtype=torch.uint8)), "float")


def test_the_distiller_takes_a_detector_s_batch_as_torchvision_gives_it():
    """Lists of [3, H, W] images and {boxes, labels} targets (no lcdistill "ignore" key); losses in training mode,
    boxes in eval mode; the task's default method (cwd on the FPN levels)."""
    from lcdistill import models

    teacher = models.build(models.parse("det:FCOS:resnet18", "detection")[1], 3)
    distiller = lcdistill.Distiller("det:FCOS:mobilenet_v3_small", teacher, task="detection", num_classes=3, input_size=64, seed=0)
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.tensor([[10.0, 10.0, 40.0, 44.0]]), "labels": torch.tensor([0])}]
    _, losses = distiller.train()((images, targets))
    assert {"classification", "bbox_regression", "cwd"} <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        detections, losses = distiller.eval()(images)
    assert losses == {} and len(detections) == 2 and set(detections[0]) == {"boxes", "scores", "labels"}
