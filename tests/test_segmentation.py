"""Segmentation end to end through the CLI: digit scenes, a teacher trained from scratch, students
distilled with ce / kd / london, eval (mIoU checked against a plain numpy confusion matrix), ONNX
parity at two input sizes and batch sizes, both data layouts, and every bad input as one line.

Small on purpose (120 train / 40 val scenes at 64 px, one epoch, tiny models, CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from conftest import assert_user_error, cli, cli_ok

from lcdistill.data.scenes import CLASSES, write_digit_scenes

TEACHER = "tv:lraspp_mobilenet_v3_large"  # 3.2M params: the fastest torchvision segmentation model on CPU
STUDENT = "smp:DeepLabV3Plus:tu-mobilenetv3_small_100"  # 2.2M params
SEG = ["--epochs", "1", "--input-size", "64", "--batch-size", "16", "--workers", "0", "--device", "cpu"]  # the task's AdamW and lr
EVAL = ["--workers", "0", "--device", "cpu"]


# ---- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def scenes(tmp_path_factory) -> Path:
    """120 train + 40 val digit scenes, 64 px, in the VOC layout, written by `lcdistill data digit-scenes`."""
    out = tmp_path_factory.mktemp("seg") / "scenes"
    result = cli_ok("data", "digit-scenes", out, "--images", "160", "--size", "64", "--seed", "0", "--val-fraction", "0.25")
    assert "120 train and 40 val" in result.stdout
    return out


@pytest.fixture(scope="session")
def seg_teacher(scenes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seg-teacher") / "run"
    cli_ok("train", "--model", TEACHER, "--data", scenes, *SEG, "--out", out)
    return out


@pytest.fixture(scope="session")
def seg_student(scenes, seg_teacher, tmp_path_factory):
    """seg_student(method) -> (run folder, stdout) of a one-epoch student (cached)."""
    made: dict[str, tuple[Path, str]] = {}

    def make(method: str):
        if method not in made:
            out = tmp_path_factory.mktemp(f"seg-{method}") / "run"
            result = cli_ok("compress", "--teacher", seg_teacher, "--student", STUDENT, "--data", scenes, "--method", method,
                            *SEG, "--out", out)
            made[method] = out, result.stdout
        return made[method]

    return make


@pytest.fixture(scope="session")
def cls_data(tmp_path_factory) -> Path:
    """A tiny classification ImageFolder (2 classes x 4 images per split)."""
    root = tmp_path_factory.mktemp("cls") / "data"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def cls_teacher(cls_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cls-teacher") / "run"
    cli_ok("train", "--model", "resnet18", "--data", cls_data, "--epochs", "1", "--input-size", "32", "--batch-size", "4",
           "--workers", "0", "--device", "cpu", "--out", out)
    return out


def as_folders(voc: Path, out: Path, n_train: int = 32, n_val: int = 8) -> Path:
    """The first scenes of a VOC-layout set copied into train/images + train/masks (and val/)."""
    for split, n in (("train", n_train), ("val", n_val)):
        names = (voc / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()[:n]
        (out / split / "images").mkdir(parents=True)
        (out / split / "masks").mkdir(parents=True)
        for name in names:
            shutil.copy(voc / "JPEGImages" / f"{name}.jpg", out / split / "images" / f"{name}.jpg")
            shutil.copy(voc / "SegmentationClass" / f"{name}.png", out / split / "masks" / f"{name}.png")
    shutil.copy(voc / "classes.txt", out / "classes.txt")
    return out


# ---- the metric, alone --------------------------------------------------------------------------------
def test_confusion_matrix_metric_ignores_255_and_matches_a_hand_count():
    from lcdistill.tasks.segmentation import ConfusionMatrix

    labels = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 255]]])  # [1, 2, 4]
    predicted = torch.tensor([[[0, 1, 1, 1], [2, 0, 2, 0]]])
    logits = torch.nn.functional.one_hot(predicted, 3).permute(0, 3, 1, 2).float()
    m = ConfusionMatrix(3)
    m.update(logits, labels)
    # class 0: tp 1, fp 1 (a 2 called 0), fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: tp 1, fn 1 -> 1/2
    values = m.compute()
    assert values["miou"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert values["pixel_acc"] == pytest.approx(100 * 4 / 6)
    assert m.count == 1 and m.matrix.dtype == torch.int64 and int(m.matrix.sum()) == 6
    assert m.per_class(["bg", "x", "y"])["x"] == pytest.approx(200 / 3)
    doubled = ConfusionMatrix(3)
    doubled.update(logits, labels)
    doubled.sync(SimpleNamespace(all_reduce=lambda t: t.mul_(2)))  # as if two ranks saw the same batch
    assert doubled.compute() == pytest.approx(values) and doubled.count == 2
    # a smaller output is upsampled to the labels before the argmax
    small = ConfusionMatrix(3)
    small.update(torch.zeros(1, 3, 1, 2).index_fill_(1, torch.tensor([1]), 1.0), labels)
    assert small.compute()["pixel_acc"] == pytest.approx(100 * 2 / 6)


def test_loss_ignores_255_and_adds_half_the_aux_head():
    from lcdistill.tasks.segmentation import Segmentation

    task = Segmentation()
    targets = torch.tensor([[[0, 1], [255, 255]]])
    out, aux = torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2)
    settings = {"label_smoothing": 0.0}
    plain = torch.nn.functional.cross_entropy(out[..., 0, :].reshape(1, 3, 2), targets[:, 0])
    assert task.loss(out, targets, settings) == pytest.approx(float(plain))
    aux_only = torch.nn.functional.cross_entropy(aux[..., 0, :].reshape(1, 3, 2), targets[:, 0])
    assert task.loss({"out": out, "aux": aux}, targets, settings) == pytest.approx(float(plain + 0.5 * aux_only))
    assert float(task.loss(out, torch.full((1, 2, 2), 255), settings)) == 0.0  # nothing labelled: 0, not NaN
    assert task.prediction({"out": out, "aux": aux}) is out


def test_auto_detects_segmentation_before_classification(scenes, tmp_path):
    from lcdistill import tasks

    folders = as_folders(scenes, tmp_path / "f", 2, 2)
    assert tasks.for_data("auto", scenes, ("smp:FPN:resnet18",)).name == "segmentation"  # scenes also read as detection
    assert tasks.for_data("auto", folders).name == "segmentation"
    assert not tasks.get("classification").detect(folders)  # train/images + train/masks are no class folders


def test_encoder_stages_pair_by_depth_never_head_with_head():
    from lcdistill.models import find_stages, pair_stages, resolve

    teacher = resolve("tv:fcn_resnet50", 11, pretrained=False).model  # dilated: layer2-4 all at stride 8
    student = resolve("smp:DeepLabV3Plus:resnet18", 11, pretrained=False).model  # dilated at 16
    t, s = find_stages(teacher), find_stages(student)
    assert [x.name for x in t][-3:] == ["backbone.layer2", "backbone.layer3", "backbone.layer4"]
    assert [x.name for x in s][-3:] == ["encoder.layer2", "encoder.layer3", "encoder.layer4"]
    pairs = pair_stages(s, t)
    assert [(a.name.split(".")[-1], b.name.split(".")[-1]) for a, b in pairs] == [(f"layer{k}", f"layer{k}") for k in range(1, 5)]
    # the maps keep their real size: a dilated layer4 is 8x8 at 64 px, so no transmitting matrix is left out
    assert [x.real_stride for x in t][-3:] == [8, 8, 8] and [x.real_stride for x in s][-3:] == [8, 16, 16]
    assert [x.stride for x in t][-3:] == [8, 16, 32]


def test_eval_counts_what_ships_not_the_auxiliary_head():
    """tv deeplabv3 trains an auxiliary head that exports drop: eval's params and FLOPs leave it out too."""
    from lcdistill import measure, tasks
    from lcdistill.artifacts import InMemory
    from lcdistill.models import params, resolve

    task = tasks.get("segmentation")
    model = resolve("tv:deeplabv3_mobilenet_v3_large", 11, pretrained=False).model.eval()
    assert model.aux_classifier is not None
    meta = {"classes": [str(i) for i in range(11)], "input_size": [3, 64, 64], "mean": [0.5] * 3, "std": [0.25] * 3}
    loader = [(torch.rand(2, 3, 64, 64), torch.randint(0, 11, (2, 64, 64)))]
    row = measure.measure(InMemory(model, meta, task), loader, torch.device("cpu"), 2, meta["mean"], meta["std"])
    assert row["params"] == params(model) - params(model.aux_classifier)
    without = resolve("tv:deeplabv3_mobilenet_v3_large", 11, pretrained=False, kwargs={"aux_loss": False}).model.eval()
    assert row["flops"] == measure.flops(without, torch.zeros(1, 3, 64, 64)) > 0


# ---- training, each method ----------------------------------------------------------------------------
def test_teacher_run_is_a_segmentation_run(seg_teacher):
    meta = json.loads((seg_teacher / "student.json").read_text())
    assert meta["task"] == "segmentation" and meta["classes"] == CLASSES and meta["input_size"] == [3, 64, 64]
    assert meta["arch"] == {"source": "tv", "name": "lraspp_mobilenet_v3_large", "kwargs": {}}
    assert 0 <= meta["miou"] <= 100 and 0 <= meta["pixel_acc"] <= 100
    rows = [json.loads(line) for line in (seg_teacher / "metrics.jsonl").read_text().splitlines()]
    assert any("val_miou" in r for r in rows)


@pytest.mark.parametrize("method", ["ce", "kd", "london"])
def test_each_method_distils_a_segmentation_student(seg_student, method):
    run, stdout = seg_student(method)
    meta = json.loads((run / "student.json").read_text())
    assert meta["task"] == "segmentation" and meta["method"] == method
    assert meta["arch"]["source"] == "smp" and meta["arch"]["name"] == "DeepLabV3Plus:tu-mobilenetv3_small_100"
    assert np.isfinite(meta["miou"]) and (meta["teacher"] is None if method == "ce" else meta["teacher"]["miou"] >= 0)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "epoch_end" in line]
    assert all(np.isfinite(rows[-1][k]) for k in ("loss", "ce"))
    if method == "kd":
        assert np.isfinite(rows[-1]["kd"])
    if method == "london":
        assert np.isfinite(rows[-1]["lip"])
        pairs = [line for line in stdout.splitlines() if line.strip().startswith("pair")]
        assert len(pairs) >= 3, stdout
        assert all("student encoder." in p and "teacher backbone." in p for p in pairs), pairs  # encoders only, never heads


# ---- eval: mIoU against numpy -------------------------------------------------------------------------
def numpy_miou(run: Path, scenes: Path) -> tuple[float, float]:
    """mIoU and pixel accuracy of a run's student on the val scenes: PIL images, the model's logits,
    a numpy confusion matrix. Nothing of lcdistill's data or metric code."""
    from lcdistill.models import load_run

    loaded = load_run(run)
    model = loaded.model.eval()
    mean, std = np.array(loaded.data_config["mean"]), np.array(loaded.data_config["std"])
    k = len(CLASSES)
    matrix = np.zeros((k, k), np.int64)
    for name in (scenes / "ImageSets" / "Segmentation" / "val.txt").read_text().split():
        image = np.asarray(Image.open(scenes / "JPEGImages" / f"{name}.jpg").convert("RGB"), np.float32) / 255
        label = np.asarray(Image.open(scenes / "SegmentationClass" / f"{name}.png")).astype(np.int64)
        x = torch.from_numpy(((image - mean) / std).astype(np.float32)).permute(2, 0, 1)[None]
        with torch.no_grad():
            out = model(x)
        out = out["out"] if isinstance(out, dict) else out
        predicted = out[0].argmax(0).numpy()
        keep = label != 255
        np.add.at(matrix, (label[keep], predicted[keep]), 1)
    tp = np.diag(matrix).astype(np.float64)
    union = matrix.sum(0) + matrix.sum(1) - tp
    iou = tp[union > 0] / union[union > 0]
    return 100 * iou.mean(), 100 * tp.sum() / matrix.sum()


def test_eval_miou_equals_a_numpy_confusion_matrix(seg_student, scenes):
    run, _ = seg_student("london")
    result = cli_ok("eval", run, "--data", scenes, "--json", *EVAL)
    report = json.loads(result.stdout)
    student, teacher = report["student"], report["teacher"]
    miou, pixel_acc = numpy_miou(run, scenes)
    assert student["miou"] == pytest.approx(miou, abs=1e-6)
    assert student["pixel_acc"] == pytest.approx(pixel_acc, abs=1e-6)
    assert student["images"] == 40
    for entry in (student, teacher):
        assert {"miou", "pixel_acc", "params", "flops", "latency_ms_b1"} <= set(entry)
    assert teacher["params"] > 0 and student["flops"] > 0
    assert set(student["iou"]) == set(CLASSES)
    meta = json.loads((run / "student.json").read_text())
    assert student["miou"] == pytest.approx(meta["miou"], abs=1e-6)  # what training recorded, measured again


# ---- export -----------------------------------------------------------------------------------------
def test_export_onnx_parity_at_two_sizes_and_batches(seg_student, scenes, tmp_path):
    import onnxruntime as ort

    from lcdistill.models import load_run
    from lcdistill.tasks.segmentation import Segmentation

    run, _ = seg_student("london")
    out = tmp_path / "export"
    # one epoch from scratch leaves encoder activations in the thousands: float32 rounding alone moves
    # logits of magnitude ~30 by a few 1e-3, which the default tolerance (relative to the largest |logit|) allows
    result = cli_ok("export", run, "--format", "all", "--quantize", "int8", "--calibration-images", "16", "--out", out)
    assert "96x128" in result.stdout, result.stdout  # the exporter's own check at a second size
    model = Segmentation().exportable(load_run(run).model).eval()
    session = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    from lcdistill.exporters import quiet_jit

    with quiet_jit():
        scripted = torch.jit.load(str(out / "student.pt"))
    assert [d for d in session.get_inputs()[0].shape[:1]] == ["batch"]
    for shape in ((1, 3, 64, 64), (3, 3, 96, 128)):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            reference = model(x)
        got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
        assert got.shape == reference.shape == (shape[0], len(CLASSES), *shape[2:])
        tolerance = 1e-3 + 2e-4 * reference.abs().max().item()  # float32 rounding, relative to the logits' scale
        assert (got - reference).abs().max().item() < tolerance, shape
        assert (got.argmax(1) == reference.argmax(1)).float().mean() > 0.999, shape
        with torch.no_grad():
            assert (scripted(x) - reference).abs().max().item() < tolerance, shape
    # the exported files measure as the run does
    report = json.loads(cli_ok("eval", run, "--data", scenes, "--exports", out, "--no-teacher", "--json", *EVAL).stdout)
    assert report["onnx"]["miou"] == pytest.approx(report["student"]["miou"], abs=0.05)
    assert report["torchscript"]["miou"] == pytest.approx(report["student"]["miou"], abs=0.05)
    assert 0 <= report["onnx-int8"]["miou"] <= 100


# ---- the other commands -------------------------------------------------------------------------------
def test_lipschitz_and_report_on_a_segmentation_run(seg_student, scenes):
    pytest.importorskip("matplotlib")
    run, _ = seg_student("london")
    lip = json.loads(cli_ok("lipschitz", run, "--data", scenes, "--batches", "1", "--batch-size", "8", "--device", "cpu", "--json").stdout)
    assert len(lip["stages"]) >= 2 and all("encoder." in n for row in lip["stages"] for n in row["model_stages"])
    result = cli_ok("report", run)
    assert (run / "report.html").is_file() and "plot:" in result.stdout


def test_recipes_list_the_segmentation_students():
    result = cli_ok("recipes", env={"COLUMNS": "200"})
    assert "seg_deeplabv3plus_mobilenetv2" in result.stdout and "seg_lraspp_mobilenetv3" in result.stdout


def test_the_folders_layout_trains(scenes, tmp_path):
    data = as_folders(scenes, tmp_path / "folders")
    out = tmp_path / "run"
    cli_ok("train", "--model", STUDENT, "--data", data, *SEG, "--out", out)
    meta = json.loads((out / "student.json").read_text())
    assert meta["task"] == "segmentation" and meta["classes"] == CLASSES


# ---- bad input: one line, exit 2, no run folder -------------------------------------------------------
def broken(scenes: Path, tmp_path: Path, how: str) -> tuple[Path, str]:
    """A small copy of the scenes with one thing wrong; (data, a word the error must contain)."""
    data = as_folders(scenes, tmp_path / "data", 4, 2)
    images, masks = data / "train" / "images", data / "train" / "masks"
    first = sorted(masks.iterdir())[0]
    if how == "image-without-mask":
        first.unlink()
        return data, first.stem
    if how == "mask-without-image":
        (images / f"{first.stem}.jpg").unlink()
        return data, first.name
    if how == "mask-size":
        Image.open(first).resize((32, 32), Image.NEAREST).save(first)
        return data, first.name
    if how == "mask-values":
        values = np.asarray(Image.open(first)).copy()
        values[0, 0] = 42
        Image.fromarray(values, "L").save(first)
        return data, "42"
    if how == "voc-missing-file":
        voc = tmp_path / "voc"
        shutil.copytree(scenes, voc)
        name = (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[0]
        (voc / "JPEGImages" / f"{name}.jpg").unlink()
        return voc, f"{name}.jpg"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["image-without-mask", "mask-without-image", "mask-size", "mask-values", "voc-missing-file"])
def test_bad_segmentation_data_is_one_line(scenes, tmp_path, how):
    data, word = broken(scenes, tmp_path, how)
    out = tmp_path / "run"
    proc = cli("train", "--model", STUDENT, "--data", data, *SEG, "--out", out)
    assert_user_error(proc, word, run_dir=out)


def test_a_classification_teacher_is_refused_on_segmentation_data(scenes, cls_teacher, tmp_path):
    out = tmp_path / "run"
    proc = cli("compress", "--teacher", cls_teacher, "--student", STUDENT, "--data", scenes, "--method", "kd", *SEG, "--out", out)
    assert_user_error(proc, "classification run", "segmentation teacher", run_dir=out)


def test_a_segmentation_teacher_is_refused_on_classification_data(seg_teacher, cls_data, tmp_path):
    out = tmp_path / "run"
    proc = cli("compress", "--teacher", seg_teacher, "--student", "mobilenetv2_050", "--data", cls_data, "--method", "kd",
               "--epochs", "1", "--input-size", "32", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--out", out)
    assert_user_error(proc, "segmentation", "classifier", run_dir=out)


def test_a_segmentation_student_is_refused_on_classification_data(cls_data, tmp_path):
    out = tmp_path / "run"
    proc = cli("train", "--model", STUDENT, "--data", cls_data, "--epochs", "1", "--input-size", "32", "--batch-size", "4",
               "--workers", "0", "--device", "cpu", "--out", out)
    assert_user_error(proc, "segmentation", "classifier", run_dir=out)


def test_a_student_without_dense_output_is_refused(scenes, seg_teacher, tmp_path):
    out = tmp_path / "run"
    proc = cli("compress", "--teacher", seg_teacher, "--student", "resnet18", "--data", scenes, "--method", "kd", *SEG, "--out", out)
    assert_user_error(proc, "resnet18", "dense", "smp:", run_dir=out)


def test_pretrained_segmentation_weights_offline_fail_fast(scenes, tmp_path):
    out = tmp_path / "run"
    proc = cli("train", "--model", "smp:DeepLabV3Plus:mobilenet_v2", "--pretrained", "--data", scenes, *SEG, "--out", out)
    assert_user_error(proc, "unreachable", "--weights", run_dir=out)


def test_unknown_smp_names_suggest(scenes, tmp_path):
    out = tmp_path / "run"
    assert_user_error(cli("train", "--model", "smp:DeepLabV3Plus:resnet181", "--data", scenes, *SEG, "--out", out), "resnet181", "resnet18", run_dir=out)
    assert_user_error(cli("train", "--model", "smp:DeepLabV3Pls:resnet18", "--data", scenes, *SEG, "--out", out), "DeepLabV3Plus", run_dir=out)


def test_digit_scenes_command_refuses_a_used_folder(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    assert_user_error(cli("data", "digit-scenes", tmp_path / "used", "--images", "4"), "already exists")
    assert write_digit_scenes  # the command is this function


def test_a_grid_too_coarse_for_the_masks_is_said_before_training(scenes, tmp_path):
    """DeepLabV3 over MobileNetV3 scores at 1/16 of the input: at 64 px a 4x4 grid, which caps these masks'
    mIoU far below what the model could learn at 128 px; one warning line says so and names the size."""
    out = tmp_path / "dl"
    result = cli_ok("train", "--model", "tv:deeplabv3_mobilenet_v3_large", "--data", scenes, *SEG, "--set", "student.kwargs.aux_loss=false",
                    "--out", out)
    line = next(l for l in result.stdout.splitlines() if "scores the classes on" in l)
    assert line.startswith("warning: tv:deeplabv3_mobilenet_v3_large scores the classes on a 4x4 grid at 64 px"), result.stdout
    assert "--input-size 128" in line or "--input-size 256" in line
    assert "scores the classes on" not in cli_ok("train", "--model", "smp:FPN:resnet18", "--data", scenes, *SEG, "--out", tmp_path / "fpn").stdout
