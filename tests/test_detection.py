"""Object detection on the task seam: digit scenes as VOC detection, torchvision detectors training on
their own loss dict, COCO mAP (torchmetrics), LONDON and sigmoid KD on dense heads, exports with NMS
checked as matched sets."""

from __future__ import annotations

import copy
import json
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_user_error, cli, cli_ok
from lcdistill import methods, models, recipe as recipes, tasks
from lcdistill.data.scenes import write_digit_scenes
from lcdistill.errors import UserError
from lcdistill.methods.kd import sigmoid_kd_loss
from lcdistill.tasks import Batch
from lcdistill.tasks.detection import DetectionExport, MeanAP

TASK = tasks.get("detection")
FAST = ["--input-size", "64", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--set", "data.hflip=0",
        "--set", "schedule.optimizer=adamw", "--lr", "0.001", "--set", "schedule.warmup_epochs=0"]
TEACHER, STUDENT = "det:FCOS:resnet18", "det:FCOS:mobilenet_v3_small"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("det") / "scenes"
    write_digit_scenes(out, size=64, images=40)
    return out


@pytest.fixture(scope="module")
def det_teacher(scenes, tmp_path_factory):
    out = tmp_path_factory.mktemp("det-teacher") / "run"
    cli_ok("train", "--model", TEACHER, "--data", scenes, "--task", "detection", "--epochs", "1", *FAST, "--out", out)
    return out


@pytest.fixture(scope="module")
def det_student(scenes, det_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("det-student") / "run"
    result = cli_ok("compress", "--teacher", det_teacher, "--student", STUDENT, "--data", scenes, "--method", "london",
                    "--epochs", "1", *FAST, "--set", "london.warmup_epochs=0", "--out", out)
    return out, result.stdout


def det(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "scores": torch.tensor(scores, dtype=torch.float32),
            "labels": torch.tensor(labels)}


def truth(boxes, labels, ignore=None):
    n = len(labels)
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels),
            "ignore": torch.tensor(ignore if ignore is not None else [False] * n)}


# ---- the metric -------------------------------------------------------------------------------
def test_map_of_a_hand_computed_case():
    # one object; the top-scored detection misses it, the second hits it exactly: precision 1/2 at every
    # recall up to 1, at every IoU threshold, so AP = 50 (COCO's 101-point interpolation)
    m = MeanAP(2)
    m.update([det([[30, 30, 40, 40], [0, 0, 10, 10]], [0.9, 0.8], [0, 0])], [truth([[0, 0, 10, 10]], [0])])
    assert m.compute() == pytest.approx({"map": 50.0, "map_50": 50.0, "map_75": 50.0, "map_50_any": 50.0, "labels_right": 100.0})
    perfect = MeanAP(2)
    perfect.update([det([[0, 0, 10, 10]], [0.9], [1])], [truth([[0, 0, 10, 10]], [1])])
    assert perfect.compute()["map"] == pytest.approx(100.0)
    assert perfect.details(["a", "b"])["ap"] == {"a": None, "b": pytest.approx(100.0)}


def test_class_agnostic_ap50_and_labels_right_by_hand():
    # two objects, both found at IoU > 0.5; the first with the wrong label scored above a right one, the second right:
    # labels right 1 of 2 (the best-scored detection decides); any-class AP50 100, AP50 of class 0 found 1 of 1 but
    # after a false positive of class 1 ranked first elsewhere
    m = MeanAP(2)
    m.update([det([[0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30]], [0.9, 0.5, 0.8], [1, 0, 1])],
             [truth([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1])])
    values = m.compute()
    assert values["labels_right"] == pytest.approx(50.0) and values["map_50_any"] == pytest.approx(100.0)
    assert values["map_50"] < 100.0


def test_guessed_labels_earn_the_warning_and_right_ones_do_not():
    """A detector whose boxes are right but whose labels are shuffled: labels right near chance, the warning's phrase."""
    g = torch.Generator().manual_seed(0)
    preds, targets, shuffled = [], [], []
    for _ in range(30):
        boxes = torch.tensor([[0, 0, 20, 20], [30, 30, 50, 50]], dtype=torch.float32)
        labels = torch.randint(0, 10, (2,), generator=g)
        targets.append({"boxes": boxes, "labels": labels, "ignore": torch.zeros(2, dtype=torch.bool)})
        preds.append({"boxes": boxes, "scores": torch.tensor([0.9, 0.8]), "labels": labels})
        shuffled.append({**preds[-1], "labels": torch.randint(0, 10, (2,), generator=g)})
    right, guessed = MeanAP(10), MeanAP(10)
    right.update(preds, targets)
    guessed.update(shuffled, targets)
    assert right.guessing() is None and right.compute()["labels_right"] == 100.0
    phrase = guessed.guessing()
    assert phrase is not None and "of the 60 val boxes it finds (chance: 10%)" in phrase
    values = guessed.compute()
    assert values["map_50_any"] == pytest.approx(100.0) and values["map_50"] < 30.0


def test_the_validator_warns_once_at_the_last_epoch_when_labels_are_guessed():
    from io import StringIO

    from rich.console import Console

    from lcdistill.training.validator import Validator

    class Guessing:
        def collapsed(self):
            return None

        def guessing(self):
            return "the label is right on 9% of the 60 val boxes it finds (chance: 10%)"

    out = StringIO()
    v = Validator.__new__(Validator)
    v.console, v.runtime = Console(file=out, width=300), SimpleNamespace(main=True)
    v.metric, v.collapses, v.warned = MeanAP(10), 0, False
    values = {"map": 1.0, "map_50": 2.0, "map_75": 0.5, "map_50_any": 30.0, "labels_right": 9.0}
    v.scored = [(values, Guessing())]
    v.line({"epoch": 1}, 2, {"loss": 1.0}, values, 0)
    assert "warning" not in out.getvalue()  # not before training ends
    v.line({"epoch": 2}, 2, {"loss": 1.0}, values, 0)
    assert out.getvalue().count("guesses their classes") == 1 and "--init" in out.getvalue()


def test_a_detection_of_an_ignored_box_is_no_false_positive():
    m = MeanAP(1)
    m.update([det([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8], [0, 0])],
             [truth([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0], [False, True])])
    assert m.compute()["map"] == pytest.approx(100.0)


def test_map_is_gathered_over_ranks_not_averaged():
    # rank 0: its one object found (score 0.6); rank 1: its object missed, a false positive at 0.9
    a = ([det([[0, 0, 10, 10]], [0.6], [0])], [truth([[0, 0, 10, 10]], [0])])
    b = ([det([[50, 50, 60, 60]], [0.9], [0])], [truth([[0, 0, 10, 10]], [0])])
    rank0 = MeanAP(1)
    rank0.update(*a)
    rank0.sync(SimpleNamespace(all_gather=lambda obj: [obj, (b[0], b[1])]))  # as if rank 1 held image b
    both = MeanAP(1)
    both.update(*a)
    both.update(*b)
    assert rank0.count == 2 and rank0.compute() == pytest.approx(both.compute())
    # together: the FP ranks first, so precision 1/2 up to recall 1/2, 0 beyond: 0.5 x 51 of 101 recall points,
    # not the mean of the ranks' own mAPs (100 and 0)
    assert rank0.compute()["map"] == pytest.approx(100 * 0.5 * 51 / 101, rel=1e-4)


# ---- export comparison ------------------------------------------------------------------------
def test_exports_are_compared_as_matched_sets():
    spec = DetectionExport(input_names=["images"], output_names=["boxes", "scores", "labels"], dynamic_axes={2: "height", 3: "width"})
    ref = (torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), torch.tensor([0.9, 0.5]), torch.tensor([1, 2]))
    swapped = tuple(t.flip(0) for t in ref)
    assert spec.compare(swapped, ref) == 0.0  # order does not matter
    moved = (ref[0] + torch.tensor([[0.0, 0, 2, 2], [0, 0, 0, 0]]), ref[1], ref[2])
    assert spec.compare(moved, ref) > 0.1  # one box off by 2 px of 10
    assert spec.compare((ref[0][:1], ref[1][:1], ref[2][:1]), ref) == float("inf")  # a detection missing
    relabelled = (ref[0], ref[1], torch.tensor([1, 3]))
    assert spec.compare(relabelled, ref) == pytest.approx(1.0)


# ---- terms ------------------------------------------------------------------------------------
def test_sigmoid_kd_is_the_bernoulli_kl_written_out():
    s, t, T = torch.randn(2, 5, 3), torch.randn(2, 5, 3), 2.0
    ps, pt = torch.sigmoid(s / T), torch.sigmoid(t / T)
    kl = pt * (pt.log() - ps.log()) + (1 - pt) * ((1 - pt).log() - (1 - ps).log())
    assert sigmoid_kd_loss(s, t, T) == pytest.approx(float(kl.sum(-1).mean() * T**2), rel=1e-5)
    assert float(sigmoid_kd_loss(t, t, T)) == pytest.approx(0.0, abs=1e-6)


def distiller(method: str, teacher: str = TEACHER, student: str = STUDENT):
    recipe = recipes.build([{"student": {"name": student}, "method": method, "data": {"input_size": 64}, "london": {"warmup_epochs": 0}}],
                           TASK.recipe_defaults)
    loaded = [models.resolve(name, 3, pretrained=False, task="detection") for name in (student, teacher)]
    for m in loaded:
        TASK.configure(m, 64)
    return methods.build(recipe, TASK, loaded[0].model, loaded[1].model, loaded[0].data_config, loaded[1].data_config)


def batch() -> Batch:
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=gen) for _ in range(2)]
    targets = [truth([[8, 8, 30, 30]], [1]), truth([[20, 10, 50, 40], [2, 2, 12, 12]], [2, 0])]
    return Batch(images, targets)


def test_kd_and_london_train_the_student_and_never_the_teacher():
    torch.manual_seed(0)
    d = distiller("london")
    before = copy.deepcopy(d.teacher.state_dict())
    d.train()
    _, losses = d(batch())
    assert {"classification", "bbox_regression", "bbox_ctrness", "kd", "lip"} <= set(losses) and losses["kd"] > 0 and losses["lip"] > 0
    for name in ("kd", "lip"):
        d.zero_grad()
        for p in d.teacher.parameters():
            p.grad = None
        losses[name].backward(retain_graph=True)
        grads = [p.grad for p in d.student.parameters() if p.grad is not None]
        assert grads and sum(float(g.abs().sum()) for g in grads) > 0, name
        assert all(p.grad is None for p in d.teacher.parameters()), name
    assert all(torch.equal(before[k], v) for k, v in d.teacher.state_dict().items())


def test_kd_is_refused_where_grids_do_not_match_one_to_one():
    with pytest.raises(UserError, match="kd needs class scores"):
        distiller("kd", teacher="tv:fasterrcnn_mobilenet_v3_large_320_fpn")


def test_teacher_and_student_see_the_same_resized_tensor():
    d = distiller("kd")
    seen = {}
    for role, model in (("student", d.student), ("teacher", d.teacher)):
        model.backbone.register_forward_pre_hook(lambda m, inp, role=role: seen.__setitem__(role, inp[0].clone()))
    d.train()(batch())
    assert torch.equal(seen["student"], seen["teacher"]) and seen["student"].shape[-1] == 64


# ---- the layout and the CLI -------------------------------------------------------------------
def test_auto_task_follows_the_model_named(scenes):
    assert tasks.for_data("auto", scenes, (TEACHER,)).name == "detection"
    assert tasks.for_data("auto", scenes, ("smp:FPN:resnet18",)).name == "segmentation"
    with pytest.raises(UserError, match="--task"):
        tasks.for_data("auto", scenes, ("resnet18",))


def test_a_student_without_a_task_is_one_line(scenes, tmp_path):
    out = tmp_path / "run"
    proc = cli("train", "--model", "resnet18", "--data", scenes, "--epochs", "1", *FAST, "--out", out)
    assert_user_error(proc, "--task", run_dir=out)


def test_compress_export_and_eval_a_detector(scenes, det_student, tmp_path):
    run, printed = det_student
    assert "transmitting matrix" in printed and "voc:" in printed
    meta = json.loads((run / "student.json").read_text())
    assert meta["task"] == "detection" and meta["arch"]["kwargs"] == {"min_size": 64, "max_size": 64} and "map_50" in meta
    files = tmp_path / "export"
    result = cli_ok("export", run, "--format", "all", "--out", files)
    assert "pt2: skipped" in result.stdout and "matched detections" in result.stdout
    assert (files / "student.onnx").is_file() and (files / "student.pt").is_file() and (files / "hub" / "README.md").is_file()
    import onnx

    proto = onnx.load(str(files / "student.onnx"))

    def nodes(graph):  # torchvision scripts its empty-input check: NMS sits in an If branch
        for n in graph.node:
            yield n
            for a in n.attribute:
                yield from (x for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)) for x in nodes(g))

    assert [o.name for o in proto.graph.output] == ["boxes", "scores", "labels"]
    assert any(n.op_type == "NonMaxSuppression" for n in nodes(proto.graph))  # NMS inside: no Python post-processing
    saved = tmp_path / "eval.json"
    cli_ok("eval", run, "--data", scenes, "--exports", files, "--workers", "0", "--device", "cpu", "--batch-size", "4", "--save", saved,
           "--noise", "0.1")
    table = json.loads(saved.read_text())
    assert set(table["onnx"]["robustness"]["noise"]) == {"0.1"} and "fgsm" not in table["student"]["robustness"]  # noise only for detectors
    assert {"student", "teacher", "onnx", "torchscript"} <= set(table)
    assert table["onnx"]["map"] == pytest.approx(table["student"]["map"], abs=0.5)
    assert set(table["student"]["ap"]) == set(meta["classes"])


def test_a_detector_fine_tuned_quantization_aware_exports_what_it_learnt(scenes, det_teacher, det_student, tmp_path):
    """FCOS fine-tuned with --quantize int8: its int8 file runs int8 convolutions, finds the fake-quantized model's
    detections and scores its mAP within 0.3 (tensors the simulation does not place, in the GroupNorm head towers
    and the box decoding, keep calibrated scales)."""
    run, _ = det_student
    qat = tmp_path / "qat"
    printed = cli_ok("compress", "--teacher", det_teacher, "--student", run, "--data", scenes, "--quantize", "int8", "--epochs", "1", *FAST,
                     "--out", qat).stdout
    assert "qat: int8 as onnxruntime runs it" in " ".join(printed.split())
    lines = [line for line in cli_ok("export", qat, "--format", "onnx", "--quantize", "int8").stdout.splitlines() if line.startswith("int8:")]
    first, scored, ops = lines
    agree, seen = map(int, re.search(r"IoU >= 0.5\): (\d+)/(\d+) detections", first).groups())
    assert seen > 0 and agree >= 0.9 * seen, first
    got, want = map(float, re.search(r"mAP % on val ([\d.]+), the fake-quantized PyTorch model ([\d.]+)", scored).groups())
    assert abs(got - want) <= 0.3 + 1e-9, scored
    assert "QLinearConv x" in ops, ops


def test_pkd_is_the_mse_of_standardised_maps_written_out():
    from lcdistill.methods.pkd import pkd_loss

    gen = torch.Generator().manual_seed(3)
    s = [torch.randn(2, 4, 6, 6, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)]
    t = [torch.randn(2, 4, 6, 6, generator=gen) * 5 + 2, torch.randn(2, 4, 3, 3, generator=gen) - 1]
    total = 0.0
    for a, b in zip(s, t):
        za = torch.stack([(a[:, c] - a[:, c].mean()) / (a[:, c].std() + 1e-6) for c in range(4)], 1)
        zb = torch.stack([(b[:, c] - b[:, c].mean()) / (b[:, c].std() + 1e-6) for c in range(4)], 1)
        total += float(((za - zb) ** 2).mean()) / 2
    assert float(pkd_loss(s, t)) == pytest.approx(total, rel=1e-5)
    assert float(pkd_loss([x * 3 + 1 for x in t], t)) == pytest.approx(0.0, abs=1e-6)  # Pearson: scale and shift free


def test_pkd_trains_the_student_and_never_the_teacher():
    torch.manual_seed(0)
    d = distiller("pkd")
    d.train()
    _, losses = d(batch())
    assert losses["pkd"] > 0
    losses["pkd"].backward()
    assert sum(float(p.grad.abs().sum()) for p in d.student.backbone.parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in d.teacher.parameters())
    assert all(p.grad is None for p in d.student.head.parameters())  # the FPN maps come before the head


def test_pkd_is_refused_without_a_feature_pyramid():
    with pytest.raises(UserError, match="pkd needs pyramid"):
        recipe = recipes.build([{"student": {"name": "resnet18"}, "method": "pkd"}])
        methods.build(recipe, tasks.get("classification"), models.build({"source": "timm", "name": "resnet18", "kwargs": {}}, 3),
                      models.build({"source": "timm", "name": "resnet18", "kwargs": {}}, 3), {"mean": [0.5] * 3, "std": [0.5] * 3}, None)


@pytest.mark.slow
def test_torchrun_gathers_detections_for_map(scenes, det_teacher, tmp_path):
    """Two gloo processes: the validation mAP (detections gathered from both) equals one process's eval of the same weights."""
    import subprocess
    import sys

    from conftest import subprocess_env

    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lcdistill", "compress",
               "--teacher", str(det_teacher), "--student", STUDENT, "--data", str(scenes), "--method", "kd", "--epochs", "1", *FAST,
               "--out", str(out)]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "epoch_end" in line][-1]
    assert row["val_images"] == 8  # the whole val split, each image once
    saved = tmp_path / "eval.json"
    cli_ok("eval", out, "--data", scenes, "--no-teacher", "--workers", "0", "--device", "cpu", "--batch-size", "4", "--save", saved)
    assert json.loads(saved.read_text())["student"]["map"] == pytest.approx(row["val_map"], abs=1e-6)


def test_a_stopped_detection_run_resumes_to_the_unbroken_one(scenes, det_teacher, tmp_path, monkeypatch):
    import os
    import signal

    from safetensors.torch import load_file

    from lcdistill.training import Trainer

    args = ["--teacher", det_teacher, "--student", STUDENT, "--data", scenes, "--method", "kd", "--epochs", "2", *FAST]
    unbroken = tmp_path / "unbroken"
    cli_ok("compress", *args, "--out", unbroken)
    real_evaluate, sent = Trainer.evaluate, []

    def evaluate_then_signal(self, *a, **k):
        if not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))  # after epoch 1's last step: stop with a checkpoint
        return real_evaluate(self, *a, **k)

    monkeypatch.setattr(Trainer, "evaluate", evaluate_then_signal)
    stopped = tmp_path / "stopped"
    assert cli("compress", *args, "--out", stopped).exit_code == 143
    monkeypatch.undo()
    cli_ok("compress", "--resume", stopped)
    one, two = load_file(unbroken / "student.safetensors"), load_file(stopped / "student.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_students_measures_detectors_at_the_input_size():
    from lcdistill import students

    cands = students.candidates(["det:FCOS:mobilenet_v3_small"], TASK)
    (row,) = students.survey(TASK, [str(d) for d in range(10)], 64, "torch", cands, repeats=2)
    assert row.error is None and row.latency_ms > 0
    assert 0.3e9 < row.flops < 2e9  # at 64 px; at the detector's own default (800 px) it is over 100 GFLOPs


def as_yolo_and_coco(scenes, root):
    """The digit scenes rewritten as a YOLO set and a COCO set, from the VOC scan."""
    import shutil

    from lcdistill.data.detection import scan_detection

    train, val, _ = scan_detection(scenes)
    yolo, coco = root / "yolo", root / "coco"
    (yolo / "data.yaml").parent.mkdir(parents=True)
    (yolo / "data.yaml").write_text("names: [" + ", ".join(f"'{c}'" for c in train.classes) + "]\n")
    (coco / "annotations").mkdir(parents=True)
    for split, data in (("train", train), ("val", val)):
        (yolo / "images" / split).mkdir(parents=True)
        (yolo / "labels" / split).mkdir(parents=True)
        (coco / f"{split}2017").mkdir()
        images, annotations = [], []
        for k, s in enumerate(data.samples):
            w, h = s.size
            name = f"{k}.jpg"
            shutil.copy(s.image, yolo / "images" / split / name)
            shutil.copy(s.image, coco / f"{split}2017" / name)
            lines = [f"{int(c)} {(b[0] + b[2]) / 2 / w:.6f} {(b[1] + b[3]) / 2 / h:.6f} {(b[2] - b[0]) / w:.6f} {(b[3] - b[1]) / h:.6f}"
                     for b, c in zip(s.boxes.tolist(), s.labels.tolist())]
            (yolo / "labels" / split / f"{k}.txt").write_text("\n".join(lines) + "\n")
            images.append({"id": k + 1, "file_name": name, "width": w, "height": h})
            annotations += [{"id": len(annotations) + 1, "image_id": k + 1, "category_id": int(c) + 1, "iscrowd": 0,
                             "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": (b[2] - b[0]) * (b[3] - b[1])}
                            for b, c in zip(s.boxes.tolist(), s.labels.tolist())]
        categories = [{"id": i + 1, "name": c} for i, c in enumerate(train.classes)]
        (coco / "annotations" / f"instances_{split}2017.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return train, yolo, coco


def test_yolo_and_coco_layouts_train_through_the_task(scenes, tmp_path):
    """The same scenes as YOLO and as COCO: the task reads the same classes and boxes, and a detector trains on a batch of each."""
    voc, yolo, coco = as_yolo_and_coco(scenes, tmp_path)
    model = models.resolve(TEACHER, len(voc.classes), pretrained=False, task="detection")
    TASK.configure(model, 64)
    recipe = recipes.build([{"student": {"name": TEACHER}, "data": {"input_size": 64, "hflip": 0}}], TASK.recipe_defaults)
    for root in (yolo, coco):
        task = tasks.for_data("auto", root, (TEACHER,))
        splits = task.scan(root)
        assert task is TASK and splits.classes == voc.classes
        def boxes(samples):  # (class, box) of every object, rounded to 0.01 px, in any image order
            return sorted((int(c), *(round(v, 2) for v in b)) for s in samples for b, c in zip(s.boxes.tolist(), s.labels.tolist()))

        assert boxes(splits.train.samples) == boxes(voc.samples)
        train, _ = task.datasets(splits, 64, model.data_config, recipe, torch.device("cpu"))
        from lcdistill.data import train_loader

        item = next(iter(train_loader(train, 4, 0, 0, 1, 0, False)))
        out = task.forward(model.model.train(), task.batch(item), (None, None), recipe["loss"])
        assert {"classification", "bbox_regression"} <= set(out.losses) and all(torch.isfinite(v) for v in out.losses.values())


def test_cwd_on_fpn_levels_trains_the_student_and_never_the_teacher():
    from lcdistill.methods.cwd import cwd_loss

    torch.manual_seed(0)
    d = distiller("cwd")
    term = d.term("cwd")
    assert term.student_names == [f"backbone.fpn.layer_blocks.{i}" for i in range(3)]
    captured = {}
    original = term.forward
    term.forward = lambda step: captured.update(s=dict(step.student_features), t=dict(step.teacher_features)) or original(step)
    d.train()
    _, losses = d(batch())
    expected = sum(cwd_loss(captured["s"][n], captured["t"][n], 4.0) for n in term.student_names) * 3.0
    assert float(losses["cwd"].detach()) == pytest.approx(float(expected.detach()), rel=1e-5) and losses["cwd"] > 0
    losses["cwd"].backward()
    assert sum(float(p.grad.abs().sum()) for p in d.student.backbone.parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in d.teacher.parameters())


def test_a_fresh_fcos_predicts_boxes_its_relu_does_not_kill(scenes):
    """torchvision's FCOS sends its box regression through a ReLU: from a bias of 0, a side was 0 on 99% of
    the locations at seed 1, no gradient passed, and 1 run in 3 ended at 0 mAP. The family starts it at 1."""
    from lcdistill.data.detection import DetectionDataset, scan_detection
    from lcdistill.models.detection import build, set_input_size

    images = [DetectionDataset(scan_detection(scenes)[1], 64, training=False)[i][0] for i in range(8)]
    for seed in range(3):
        torch.manual_seed(seed)
        arch = {"source": "det", "name": "FCOS:mobilenet_v3_small", "kwargs": {}}
        model = build(arch, 10)
        set_input_size(model, arch, 64)
        model.eval()
        with torch.no_grad():
            batch, _ = model.transform(images)
            sides = model.head(list(model.backbone(batch.tensors).values()))["bbox_regression"]
        alive = (sides > 0).float().mean(dim=(0, 1))
        assert (alive > 0.8).all(), (seed, alive.tolist())  # every side, on nearly every location
