"""Recipes: override parsing, merging, validation, shipped recipes, save/load round trip."""

from __future__ import annotations

import copy

import pytest
import yaml

from lcdistill import recipe as recipes, tasks
from lcdistill.errors import UserError
from lcdistill.recipe import DEFAULTS, build, deep_merge, parse_override


def student(name: str = "mobilenetv2_050", **extra) -> dict:
    return {"student": {"name": name, **extra}}


# ---- --set KEY=VALUE ----------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("kd.temperature=2", {"kd": {"temperature": 2}}),
    ("london.alpha=0.5", {"london": {"alpha": 0.5}}),
    ("a.b=[1,2]", {"a": {"b": [1, 2]}}),
    ("data.scale=[0.6, 1.0]", {"data": {"scale": [0.6, 1.0]}}),
    ("london.pairs=[[s1, t1], [s2, t2]]", {"london": {"pairs": [["s1", "t1"], ["s2", "t2"]]}}),
    ("train.ema=true", {"train": {"ema": True}}),
    ("data.auto_augment=rand-m9-mstd0.5", {"data": {"auto_augment": "rand-m9-mstd0.5"}}),
    ("data.auto_augment=null", {"data": {"auto_augment": None}}),
    ("data.auto_augment=", {"data": {"auto_augment": None}}),
    ("student.kwargs={drop_rate: 0.2}", {"student": {"kwargs": {"drop_rate": 0.2}}}),
    ("method=kd", {"method": "kd"}),
    ("a.b=x=y", {"a": {"b": "x=y"}}),
    ("schedule.lr=1e-3", {"schedule": {"lr": 1e-3}}),  # YAML 1.1 alone reads this as a string
    ("schedule.weight_decay=5E-5", {"schedule": {"weight_decay": 5e-5}}),
    ("data.scale=[1e-1, 1]", {"data": {"scale": [0.1, 1]}}),
])
def test_parse_override_reads_yaml_values(text, expected):
    assert parse_override(text) == expected


def test_parse_override_needs_an_equals_sign():
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_override("kd.temperature")


# ---- merging and validation -----------------------------------------------------------------------
def test_build_applies_layers_in_order():
    r = build([student(), parse_override("kd.temperature=2"), parse_override("kd.temperature=3"), parse_override("data.scale=[0.6,1.0]")])
    assert r["kd"]["temperature"] == 3
    assert r["data"]["scale"] == [0.6, 1.0]
    assert r["kd"]["weight"] == DEFAULTS["kd"]["weight"]  # siblings keep their defaults
    assert r["student"]["source"] == "auto"


def test_build_does_not_change_defaults_or_layers():
    before = copy.deepcopy(DEFAULTS)
    layer = student(kwargs={"drop_rate": 0.1})
    kept = copy.deepcopy(layer)
    r = build([layer, parse_override("data.scale=[0.5,1.0]")])
    r["data"]["scale"].append(9)
    r["student"]["kwargs"]["x"] = 1
    assert DEFAULTS == before and layer == kept


@pytest.mark.parametrize("override, bad, valid", [
    ("kd.tempreature=2", "kd.tempreature", ["temperature", "weight"]),
    ("schedul.epochs=2", "schedul", ["schedule", "london", "train"]),
    ("london.alfa=1", "london.alfa", ["alpha", "distance", "iterations"]),
])
def test_unknown_key_names_the_valid_ones(override, bad, valid):
    with pytest.raises(UserError) as info:
        build([student(), parse_override(override)])
    line = info.value.line()
    assert f"'{bad}'" in line
    for key in valid:
        assert key in line
    assert "\n" not in line


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(UserError, match="did you mean 'temperature'"):
        build([student(), parse_override("kd.tempreature=2")])


def test_scalar_over_a_section_is_refused():
    with pytest.raises(UserError, match="'kd' must be a mapping"):
        build([student(), parse_override("kd=3")])


def test_student_kwargs_is_free_form():
    r = build([student(kwargs={"drop_rate": 0.2, "anything_at_all": {"deep": [1, 2]}})])
    assert r["student"]["kwargs"] == {"drop_rate": 0.2, "anything_at_all": {"deep": [1, 2]}}
    r = build([student(), parse_override("student.kwargs.width_mult=0.75")])
    assert r["student"]["kwargs"] == {"width_mult": 0.75}


def test_student_kwargs_layers_merge():
    # a recipe file's kwargs plus a --set of another kwarg: both hold
    r = build([student(kwargs={"drop_rate": 0.2}), parse_override("student.kwargs.drop_path_rate=0.1"),
               parse_override("student.kwargs.global_pool=max")])
    assert r["student"]["kwargs"] == {"drop_rate": 0.2, "drop_path_rate": 0.1, "global_pool": "max"}
    r = build([student(kwargs={"drop_rate": 0.2}), parse_override("student.kwargs.drop_rate=0.3")])
    assert r["student"]["kwargs"] == {"drop_rate": 0.3}


def test_free_form_is_only_student_kwargs():
    with pytest.raises(UserError, match="student.kwarg"):
        build([student(kwarg={"drop_rate": 0.1})])


@pytest.mark.parametrize("override, words", [
    ("method=distill", ["unknown method", "london", "kd", "ce"]),
    ("schedule.epochs=0", ["schedule.epochs", "positive"]),
    ("schedule.batch_size=2.5", ["schedule.batch_size"]),
    ("schedule.lr=-1", ["schedule.lr"]),
    ("london.distance=l1", ["london.distance", "log_mse"]),
    ("london.alpha=-1", ["london.alpha", ">= 0"]),
    ("london.warmup_epochs=soon", ["london.warmup_epochs", ">= 0"]),
    ("train.amp_dtype=fp8", ["amp_dtype", "bfloat16"]),
])
def test_invalid_values(override, words):
    with pytest.raises(UserError) as info:
        build([student(), parse_override(override)])
    for word in words:
        assert word in info.value.line()


def test_a_student_name_is_required():
    with pytest.raises(UserError, match="no student"):
        build([])


# ---- files -----------------------------------------------------------------------------------------
def test_shipped_recipes_all_build():
    shipped = recipes.list_recipes()
    assert {"mobilenetv2", "mobilenetv2_050", "resnet18", "efficientnet_b0", "tv_mobilenet_v3_small"} <= set(shipped)
    for name, path in shipped.items():
        raw = recipes.read_yaml(path)
        task = tasks.get(raw.get("task", "auto") if raw.get("task", "auto") != "auto" else tasks.LEGACY)
        r = build([raw], task.recipe_defaults)
        assert r["student"]["name"], name
        # no shipped recipe overrides its task's default method (london for classifiers, cwd for segmentation)
        default = task.recipe_defaults.get("method", recipes.CORE["method"])
        assert "method" not in raw or raw["method"] == default, name
        assert r["method"] == default, name


# ---- each task's own defaults -------------------------------------------------------------------
def test_a_tasks_defaults_lie_over_the_core_and_under_the_user():
    seg = tasks.get("segmentation")
    r = build([student()], seg.recipe_defaults)
    assert r["method"] == "cwd"
    assert {k: r["schedule"][k] for k in ("optimizer", "lr", "batch_size", "weight_decay", "warmup_epochs")} == {
        "optimizer": "adamw", "lr": 0.008, "batch_size": 8, "weight_decay": 1e-4, "warmup_epochs": 1}
    assert r["data"]["scale"] == [0.75, 1.25] and r["data"]["hflip"] == 0
    assert r["schedule"]["momentum"] == DEFAULTS["schedule"]["momentum"]  # the rest is the core's
    mine = build([student(), {"method": "kd"}, parse_override("schedule.lr=0.1"), parse_override("data.hflip=0.5")], seg.recipe_defaults)
    assert (mine["method"], mine["schedule"]["lr"], mine["data"]["hflip"]) == ("kd", 0.1, 0.5)
    assert build([student()], tasks.get("classification").recipe_defaults)["method"] == "london"
    det = build([{"student": {"name": "det:FCOS:resnet18"}}], tasks.get("detection").recipe_defaults)
    assert {k: det["schedule"][k] for k in ("optimizer", "lr", "batch_size", "weight_decay", "warmup_epochs")} == {
        "optimizer": "adamw", "lr": 0.002, "batch_size": 16, "weight_decay": 1e-4, "warmup_epochs": 1}
    assert det["data"]["scale"] == [0.75, 1.25] and det["data"]["hflip"] == 0


def test_the_run_header_says_when_the_method_is_the_tasks_default():
    from lcdistill.run import method_note

    seg = tasks.get("segmentation")
    assert method_note(seg, [student()]) == " (segmentation's default: cwd measured strongest, +london cost 0.79 mIoU, just beyond its standard error (0.72), benchmarks/RESULTS.md)"
    assert method_note(seg, [student(), {"method": "cwd"}]) == ""  # named, even if the same
    assert "classification's default" in method_note(tasks.get("classification"), [student()])


def test_the_methods_command_says_each_tasks_default_and_why():
    from conftest import cli_ok

    lines = cli_ok("methods").stdout.splitlines()
    for name, task in tasks.TASKS.items():
        found = [line for line in lines if line.startswith(f"{name}'s default: ")]
        assert len(found) == 1, lines
        if "method" in task.recipe_defaults:
            assert found[0].startswith(f"{name}'s default: {task.recipe_defaults['method']} (") and "RESULTS.md" in found[0]


def test_resolve_student():
    assert build([recipes.resolve_student("mobilenetv2_050", None)])["student"] == {
        **DEFAULTS["student"], "source": "timm", "name": "mobilenetv2_050"}
    assert recipes.resolve_student("tv:resnet18", None) == {"student": {"source": "tv", "name": "resnet18"}}
    assert recipes.resolve_student("some_model", None) == {"student": {"source": "auto", "name": "some_model"}}
    with pytest.raises(UserError, match="no student"):
        recipes.resolve_student(None, None)
    with pytest.raises(UserError, match="not found"):
        recipes.resolve_student("missing.yaml", None)


def test_resolve_student_from_a_file_with_a_name_override(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("student:\n  source: timm\n  name: resnet18\nschedule:\n  epochs: 3\n")
    r = build([recipes.resolve_student("resnet34", str(path))])
    assert r["student"]["name"] == "resnet34" and r["schedule"]["epochs"] == 3
    assert build([recipes.resolve_student(str(path), None)])["student"]["name"] == "resnet18"


@pytest.mark.parametrize("text, words", [
    ("student: [unclosed", ["not valid YAML"]),
    ("- a\n- b\n", ["must be a YAML mapping"]),
])
def test_read_yaml_errors(tmp_path, text, words):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        recipes.read_yaml(path)
    for word in words:
        assert word in info.value.line()


def test_read_yaml_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        recipes.read_yaml(tmp_path / "nope.yaml")


def test_recipe_file_exponent_numbers_are_numbers(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("student:\n  name: resnet18\nschedule:\n  lr: 1e-3\n  weight_decay: 4e-5\n  min_lr: 1.0e-6\n")
    sched = build([recipes.read_yaml(path)])["schedule"]
    assert (sched["lr"], sched["weight_decay"], sched["min_lr"]) == (1e-3, 4e-5, 1e-6)
    assert all(isinstance(sched[k], float) for k in ("lr", "weight_decay", "min_lr"))


def test_save_then_load_is_identical(tmp_path):
    r = build([student(kwargs={"drop_rate": 0.1}), parse_override("london.pairs=[[a, b], [c, d]]"), parse_override("data.auto_augment=rand-m9")])
    recipes.save(r, tmp_path / "recipe.yaml")
    assert build([recipes.read_yaml(tmp_path / "recipe.yaml")]) == r
    assert yaml.safe_load((tmp_path / "recipe.yaml").read_text()) == r
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.yaml"]


def test_deep_merge_reports_where_the_key_was_missing():
    with pytest.raises(UserError) as info:
        deep_merge(DEFAULTS, {"train": {"devices": 2}})
    assert "valid keys in train" in info.value.line() and "device" in info.value.line()
