"""--init and --pretrained from weights of another label set or task (lcdistill.models.transfer): what fits
is loaded under the prefixes the families declare, the class layers are made fresh, a file that does not fit
is one line."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import assert_user_error, cli, cli_ok
from lcdistill import models
from lcdistill.checkpoint import save_weights
from lcdistill.data.scenes import write_digit_scenes
from lcdistill.errors import UserError
from lcdistill.models import detection as det_family
from lcdistill.models.transfer import init_from, init_line, load_matching
from lcdistill.run import start_from

FAST = ["--input-size", "64", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--epochs", "1",
        "--set", "schedule.warmup_epochs=0", "--lr", "0.001"]


def build(spec: str, num_classes: int):
    family, arch = models.parse(spec)
    return family.build(arch, num_classes), arch


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer") / "scenes"
    write_digit_scenes(out, size=64, images=24)
    return out


def test_a_classification_run_fills_a_detectors_whole_backbone_and_changes_its_output(teacher_run):
    torch.manual_seed(0)
    detector, arch = build("det:FCOS:resnet18", 10)
    body = [k for k in detector.state_dict() if k.startswith("backbone.body.")]
    x = torch.rand(1, 3, 64, 64)
    detector.eval()
    before = detector.backbone(x)["0"].clone()
    report = init_from(detector, arch, str(teacher_run))
    assert report.loaded == len(body) == 120  # every tensor of resnet18's trunk, counted
    assert report.mapping == ("", "backbone.body.") and report.source_tensors == 122  # the classifier's fc left out
    assert report.fresh == ["backbone.fpn", "head"]
    classifier = models.load_run(teacher_run).model.state_dict()
    loaded = detector.state_dict()
    assert all(torch.equal(loaded[k], classifier[k.removeprefix("backbone.body.")]) for k in body)
    assert not torch.allclose(detector.backbone(x)["0"], before)


def test_a_classification_run_fills_an_smp_encoder(teacher_run):
    model, arch = build("smp:FPN:resnet18", 11)
    report = init_from(model, arch, str(teacher_run))
    assert report.loaded == sum(k.startswith("encoder.") for k in model.state_dict()) and report.mapping == ("", "encoder.")
    assert "segmentation_head" in report.fresh and "decoder" in report.fresh


def test_a_coco_detector_loads_into_a_10_class_one_with_only_the_class_layer_fresh(tmp_path):
    coco, _ = build("tv:fcos_resnet50_fpn", 91)
    path = tmp_path / "coco.pth"
    torch.save(coco.state_dict(), path)
    model, arch = build("tv:fcos_resnet50_fpn", 10)
    report = init_from(model, arch, str(path))
    assert report.fresh == ["head.classification_head.cls_logits"] == report.class_layers
    assert report.loaded == report.source_tensors - 2 == report.model_tensors - 2
    assert torch.equal(model.head.regression_head.bbox_reg.weight, coco.head.regression_head.bbox_reg.weight)


def test_class_layers_are_fresh_even_when_the_class_counts_match():
    other, _ = build("det:FCOS:resnet18", 10)
    model, arch = build("det:FCOS:resnet18", 10)
    fresh_logits = model.head.classification_head.cls_logits.weight.clone()
    report = load_matching(model, arch, other.state_dict(), "another label set")
    assert report.fresh == ["head.classification_head.cls_logits"]
    assert torch.equal(model.head.classification_head.cls_logits.weight, fresh_logits)


def test_pretrained_torchvision_detector_takes_the_whole_coco_model(monkeypatch):
    """--pretrained on tv:* loads every COCO tensor but the class layers (the download stubbed by a 91-class state)."""
    coco, _ = build("tv:retinanet_resnet50_fpn", 91)
    weights = SimpleNamespace(get_state_dict=lambda progress=False: coco.state_dict(), __str__=lambda: "COCO")
    monkeypatch.setattr(det_family, "tv_pretrained_weights", lambda name, flag: weights)
    family, arch = models.parse("tv:retinanet_resnet50_fpn")
    model = family.build(arch, 10, pretrained=True)
    own, theirs = model.state_dict(), coco.state_dict()
    differ = [k for k in own if own[k].shape != theirs[k].shape or not torch.equal(own[k], theirs[k])]
    assert differ == ["head.classification_head.cls_logits.weight", "head.classification_head.cls_logits.bias"]


def test_a_file_of_another_architecture_is_refused():
    big, _ = build("tv:fcos_resnet50_fpn", 91)
    model, arch = build("det:FCOS:resnet18", 10)
    with pytest.raises(UserError, match="another architecture"):
        load_matching(model, arch, big.state_dict(), "resnet50 detector")


def test_train_with_init_records_it_and_bad_files_are_one_line(scenes, teacher_run, tmp_path):
    out = tmp_path / "run"
    result = cli_ok("train", "--model", "det:FCOS:resnet18", "--data", scenes, "--init", teacher_run, *FAST, "--out", out)
    assert "init: loaded 120 of the 122 tensors" in result.stdout and "made fresh: backbone.fpn, head" in result.stdout
    inputs, meta = json.loads((out / "run.json").read_text()), json.loads((out / "student.json").read_text())
    assert inputs["init"]["loaded"] == meta["init"]["loaded"] == 120 and inputs["init"]["source"] == str(teacher_run)
    # a resumed run reads back what the first start loaded (its checkpoint holds the weights)
    assert start_from(None, {"init": str(teacher_run), "weights": None}, out, resume=True) == inputs["init"]
    assert "init: loaded 120" in init_line(meta["init"])

    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    big = tmp_path / "resnet50.safetensors"
    save_weights(big, build("resnet50", 10)[0].state_dict())
    for bad, words in ((tmp_path / "missing.pth", ("not found",)), (text, ("not a plain weights file",)),
                       (big, ("another architecture", "same backbone"))):
        target = tmp_path / f"bad-{bad.stem}"
        proc = cli("train", "--model", "det:FCOS:resnet18", "--data", scenes, "--init", bad, *FAST, "--out", target)
        assert_user_error(proc, *words, run_dir=target)
