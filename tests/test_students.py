"""`lcdistill students`: the shipped recipes and small families, measured here, fastest first."""

from __future__ import annotations

import json

import pytest

from conftest import assert_user_error, cli, cli_ok
from lcdistill import models, recipe as recipes, students, tasks


def test_candidates_are_the_recipes_and_the_curated_families():
    found = students.candidates()
    archs = [(c.source, c.name) for c in found]
    assert len(archs) == len(set(archs)), "an architecture is listed twice"
    names = {c.student for c in found}
    classifiers = {n for n, path in recipes.list_recipes().items() if recipes.read_yaml(path).get("task", "auto") in ("auto", "classification")}
    assert classifiers and classifiers <= names, "a shipped classification recipe is missing"
    assert not [c for c in found if c.source == "smp"], "a segmentation recipe among classifiers"
    for source, name in models.classifiers.CURATED:
        assert (source, name) in archs
    by_arch = {(c.source, c.name): c for c in found}
    assert by_arch[("timm", "resnet18")].student == "resnet18" and by_arch[("timm", "resnet18")].recipe  # the recipe's name wins
    assert by_arch[("timm", "ghostnet_100")].student == "timm:ghostnet_100"


def test_candidates_named_and_unknown():
    only = students.candidates(["mobilenetv2_050", "tv:mobilenet_v3_small", "regnetx_002"])
    assert [(c.student, c.recipe) for c in only] == [("mobilenetv2_050", True), ("tv:mobilenet_v3_small", False), ("timm:regnetx_002", False)]
    with pytest.raises(Exception, match="unknown model"):
        students.candidates(["mobilenetv9_000"])


def test_segmentation_candidates():
    found = students.candidates(task=tasks.get("segmentation"))
    assert ("smp", "DeepLabV3Plus:mobilenet_v2") in {(c.source, c.name) for c in found}
    assert not [c for c in found if c.source == "timm"], "a classifier among segmentation students"
    with pytest.raises(Exception, match="not a segmentation model"):
        students.candidates(["resnet18"], tasks.get("segmentation"))


def test_default_input_size():
    assert students.default_input_size(32.0) == 32
    assert students.default_input_size(500.0) == 224
    assert students.default_input_size(70.0) == 64
    assert students.default_input_size(None) == 224


def test_survey_sorts_and_marks_the_budget(small_data):
    task = tasks.get("classification")
    classes = [str(i) for i in range(10)]
    cands = students.candidates(["mobilenetv2_050", "resnet18"])
    rows = students.survey(task, classes, 32, "torch", cands, teacher="resnet34", max_latency_ms=1e6, repeats=3)
    assert [r.role for r in rows].count("teacher") == 1
    latencies = [r.latency_ms for r in rows]
    assert latencies == sorted(latencies) and all(v > 0 for v in latencies)
    assert all(r.within_budget for r in rows)
    built = models.build({"source": "timm", "name": "resnet18", "kwargs": {}}, 10)
    row = next(r for r in rows if r.model == "timm:resnet18")
    assert row.params == models.params(built) and row.flops > 0
    tight = students.survey(task, classes, 32, "torch", cands[:1], max_latency_ms=1e-6, repeats=3)
    assert tight[0].within_budget is False


def test_students_cli_on_onnxruntime(small_data, teacher_run):
    result = cli_ok("students", "--data", small_data, "--teacher", teacher_run, "--model", "mobilenetv2_050", "--model", "tv:mobilenet_v3_small",
                    "--max-latency-ms", "1000", "--repeats", "5", "--json")
    out = json.loads(result.stdout)
    assert out["input_size"] == 32  # the teacher run's size
    assert out["runtime"] == "onnxruntime" and out["classes"] == 10 and out["threads"] >= 1
    rows = out["rows"]
    assert {r["student"] for r in rows} == {"mobilenetv2_050", "tv:mobilenet_v3_small", str(teacher_run)}
    teacher = next(r for r in rows if r["role"] == "teacher")
    assert teacher["model"] == "timm:resnet18" and teacher["params"] > 10e6
    assert [r["latency_ms"] for r in rows] == sorted(r["latency_ms"] for r in rows)
    assert all(r["error"] is None and r["within_budget"] for r in rows)


def test_students_table_on_torch(small_data):
    result = cli_ok("students", "--data", small_data, "--runtime", "torch", "--model", "mobilenetv2_050", "--model", "regnetx_002",
                    "--max-latency-ms", "1000", "--repeats", "3")
    text = result.stdout
    assert "classification students for 10 classes at 32px" in text and "PyTorch eager" in text
    assert "mobilenetv2_050" in text and "timm:regnetx_002" in text and "fits" in text and "yes" in text


@pytest.mark.parametrize("args,words", [
    (["--runtime", "tflite"], ["tflite", "onnxruntime"]),
    (["--model", "mobilenetv9_000"], ["unknown model"]),
    (["--max-latency-ms", "0"], ["--max-latency-ms"]),
])
def test_students_user_errors(small_data, args, words):
    assert_user_error(cli("students", "--data", small_data, *args), *words)


def test_students_needs_data():
    assert_user_error(cli("students"), "--data")
