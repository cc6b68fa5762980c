"""The end-to-end path through the CLI: data, recipes, train, compress (ce / kd / london), eval.

Runs use the session fixtures of conftest.py: a 200-image subset of the digits and a
one-epoch resnet18 teacher trained by `lcdistill train`.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from conftest import EVAL, FAST, VAL_PER_CLASS, cli, cli_ok, cli_process, subprocess_env
from lcdistill import models, recipe as recipes
from lcdistill.checkpoint import load_state, load_weights

CLASSES = [str(i) for i in range(10)]
SHIPPED = {"mobilenetv2", "mobilenetv2_050", "resnet18", "efficientnet_b0", "tv_mobilenet_v3_small"}
LOSSES = {"ce": {"ce"}, "kd": {"ce", "kd"}, "london": {"ce", "kd", "lip"}}
KD_SET = ("--set", "kd.temperature=2")


def run_for(compress_run, method: str) -> Path:
    return compress_run(method, *KD_SET) if method == "kd" else compress_run(method)


# ---- help ---------------------------------------------------------------------------------
def test_help_lists_every_command():
    result = cli_ok("--help")
    for command in ("compress", "train", "eval", "export", "recipes", "data"):
        assert command in result.stdout
    for command in (["compress"], ["train"], ["eval"], ["export"], ["recipes"], ["data", "digits"]):
        assert "Usage" in cli_ok(*command, "--help").stdout


def test_compress_help_names_its_flags():
    text = cli_ok("compress", "--help").stdout
    for flag in ("--teacher", "--student", "--data", "--method", "--recipe", "--set", "--teacher-weights", "--resume"):
        assert flag in text


def test_python_dash_m_help():
    proc = subprocess.run([sys.executable, "-m", "lcdistill", "--help"], capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    assert "compress" in proc.stdout and "export" in proc.stdout
    assert proc.stderr.strip() == ""


def test_console_script_help():
    script = Path(sys.executable).parent / "lcdistill"
    if not script.exists():
        pytest.fail(f"console script {script} is not installed")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    assert "compress" in proc.stdout


# ---- data digits -----------------------------------------------------------------------------
def test_data_digits(digits_cli):
    out, result = digits_cli
    assert "1438 train and 359 val images of 10 classes" in result.stdout
    for split, total in (("train", 1438), ("val", 359)):
        assert sorted(p.name for p in (out / split).iterdir()) == CLASSES
        files = sorted((out / split).rglob("*"))
        assert len(files) == total + 10 and all(f.suffix == ".png" for f in files if f.is_file())
        for f in [f for f in files if f.is_file()][:: max(1, total // 25)]:
            with Image.open(f) as im:
                assert im.format == "PNG" and im.mode == "RGB" and im.size == (32, 32)
    assert not list(out.rglob("*.tmp")), "temporary files left behind"


def test_data_digits_refuses_existing_folder(tmp_path):
    (tmp_path / "d" / "train").mkdir(parents=True)
    result = cli("data", "digits", tmp_path / "d")
    assert result.exit_code == 2
    assert "already" in result.stderr and len(result.stderr.strip().splitlines()) == 1


# ---- recipes -----------------------------------------------------------------------------
def test_recipes_lists_every_shipped_recipe_outside_the_repo(tmp_path):
    proc = cli_process("recipes", cwd=tmp_path, env=subprocess_env(COLUMNS="200"))
    assert proc.returncode == 0, proc.stderr
    listed = set(recipes.list_recipes())
    assert SHIPPED <= listed
    for name in listed:
        assert name in proc.stdout, f"{name} missing from:\n{proc.stdout}"
    assert "Traceback" not in proc.stderr


def test_recipes_names_are_whole_at_80_columns():
    result = cli_ok("recipes", env={"COLUMNS": "80"})
    for name in SHIPPED:
        assert name in result.stdout, result.stdout


# ---- the teacher run -------------------------------------------------------------------------
def test_train_makes_a_teacher_run(teacher_run, small_data):
    meta = json.loads((teacher_run / "student.json").read_text())
    assert meta["arch"]["name"] == "resnet18" and meta["classes"] == CLASSES
    assert meta["input_size"] == [3, 32, 32] and meta["crop_pct"] == 1.0
    assert meta["teacher"] is None and meta["method"] == "ce"
    loaded = models.resolve(str(teacher_run), 10)
    assert loaded.classes == CLASSES and loaded.meta["input_size"] == [3, 32, 32]
    run = json.loads((teacher_run / "run.json").read_text())
    assert Path(run["data"]) == small_data.resolve()


# ---- compress: every method ------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ce", "kd", "london"])
def test_compress_writes_a_complete_run(compress_run, teacher_run, small_data, method):
    run = run_for(compress_run, method)

    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    assert recipe["method"] == method
    assert recipe["student"]["name"] == "mobilenetv2_050"
    assert recipe["schedule"]["epochs"] == 1 and recipe["schedule"]["batch_size"] == 32
    assert recipe["data"]["input_size"] == 32 and recipe["data"]["workers"] == 0 and recipe["data"]["crop_pct"] == 1.0
    assert recipe["kd"]["temperature"] == (2 if method == "kd" else 4.0)
    assert recipes.build([recipe]) == recipe  # the saved recipe is complete and valid

    with open(run / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["epoch"] == "1"
    columns = set(rows[0])
    assert LOSSES[method] <= columns
    assert not ({"ce", "kd", "lip"} - LOSSES[method]) & columns, f"{method} logged another method's loss: {columns}"
    for name in LOSSES[method] | {"loss", "lr"}:
        assert math.isfinite(float(rows[0][name])), name
    assert float(rows[0]["loss"]) == pytest.approx(sum(float(rows[0][k]) for k in LOSSES[method]), rel=1e-4)
    assert 0 <= float(rows[0]["val_top1"]) <= float(rows[0]["val_top5"]) <= 100

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records and records[-1].get("epoch_end") == 1
    assert any("step" in r and LOSSES[method] <= set(r) for r in records)

    state = load_state(run / "checkpoints" / "last.safetensors")
    assert state["epoch"] == 1 and state["step_in_epoch"] == 0
    assert state["global_step"] == (10 * 20) // 32 and len(state["rows"]) == 1
    if method == "london":
        assert any(k.startswith("london.connectors.") for k in state["method"]), "LONDON connectors are not checkpointed"

    meta = json.loads((run / "student.json").read_text())
    assert meta["arch"] == {"source": "timm", "name": "mobilenetv2_050", "kwargs": {}}
    assert meta["classes"] == CLASSES and meta["num_classes"] == 10
    assert len(meta["mean"]) == 3 and len(meta["std"]) == 3 and all(s > 0 for s in meta["std"])
    assert meta["input_size"] == [3, 32, 32]
    assert meta["method"] == method
    assert meta["top1"] == pytest.approx(float(rows[0]["val_top1"]))
    if method == "ce":
        assert meta["teacher"] is None
    else:
        assert meta["teacher"]["spec"] == {"run": str(teacher_run.resolve())}

    loaded = models.load_run(run)
    assert loaded.classes == CLASSES
    shipped = loaded.model.state_dict()
    best = load_weights(run / "checkpoints" / "best.safetensors")
    assert set(best) == set(shipped)
    assert not any(k.startswith(("london", "connectors", "terms")) for k in load_weights(run / "student.safetensors"))
    with torch.no_grad():
        assert loaded.model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)

    assert not list(run.rglob("*.tmp")), "temporary files left behind"
    inputs = json.loads((run / "run.json").read_text())
    assert Path(inputs["data"]) == small_data.resolve() and inputs["classes"] == CLASSES


def test_saved_recipe_runs_again(compress_run, small_data, tmp_path):
    first = compress_run("ce")
    out = tmp_path / "again"
    cli_ok("compress", "--recipe", first / "recipe.yaml", "--data", small_data, "--out", out)
    again = yaml.safe_load((out / "recipe.yaml").read_text())
    assert again == yaml.safe_load((first / "recipe.yaml").read_text())
    # same recipe, same seed, same data, CPU: the same epoch
    one = next(csv.DictReader(open(first / "summary.csv")))
    two = next(csv.DictReader(open(out / "summary.csv")))
    assert float(two["ce"]) == pytest.approx(float(one["ce"]), rel=1e-4)
    assert two["val_top1"] == one["val_top1"]


@pytest.mark.parametrize("method", ["kd", "london"])
def test_saved_distillation_recipes_load(compress_run, method):
    path = run_for(compress_run, method) / "recipe.yaml"
    recipe = recipes.build([recipes.resolve_student(None, str(path))])
    assert recipe["method"] == method and recipe["student"]["name"] == "mobilenetv2_050"


def test_compress_refuses_a_nonempty_run_folder(compress_run, teacher_run, small_data):
    run = compress_run("ce")
    before = sorted(p.name for p in run.iterdir())
    result = cli("compress", "--teacher", teacher_run, "--student", "mobilenetv2_050", "--data", small_data,
                 "--method", "ce", *FAST, "--out", run)
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert sorted(p.name for p in run.iterdir()) == before


# ---- eval ----------------------------------------------------------------------------------------
def eval_json(target, data, *extra) -> dict:
    result = cli_ok("eval", target, "--data", data, "--json", *EVAL, "--batch-size", "16", *extra)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"stdout is not one JSON line:\n{result.stdout}"
    return json.loads(lines[0])


@pytest.fixture(scope="session")
def london_eval(compress_run, small_data) -> dict:
    return eval_json(compress_run("london"), small_data)


def test_eval_json_has_student_and_teacher(london_eval, compress_run, teacher_run):
    assert set(london_eval) == {"student", "teacher"}
    for role, r in london_eval.items():
        assert 0 <= r["top1"] <= r["top5"] <= 100, role
        assert r["images"] == 10 * VAL_PER_CLASS
        assert r["params"] > 0 and r["flops"] > 0
        assert r["latency_ms_b1"] > 0 and r["latency_ms_batch"] > 0
    student, teacher = london_eval["student"], london_eval["teacher"]
    assert student["params"] == models.load_run(compress_run("london")).params
    assert teacher["params"] > 10 * student["params"] and teacher["flops"] > student["flops"]
    # the same numbers the runs recorded on the same val images
    meta = json.loads((compress_run("london") / "student.json").read_text())
    assert student["top1"] == pytest.approx(meta["top1"], abs=0.5)
    assert teacher["top1"] == pytest.approx(meta["teacher"]["top1"], abs=0.5)
    teacher_meta = json.loads((teacher_run / "student.json").read_text())
    assert teacher["top1"] == pytest.approx(teacher_meta["top1"], abs=0.5)


def test_eval_save_and_no_teacher(compress_run, small_data, tmp_path):
    saved = tmp_path / "eval.json"
    result = eval_json(compress_run("ce"), small_data, "--no-teacher", "--save", saved)
    assert set(result) == {"student"}
    assert json.loads(saved.read_text()) == result


def test_eval_refuses_data_with_other_classes(compress_run, small_data, tmp_path):
    from conftest import subset

    other = subset(small_data, tmp_path / "three", 2, 2, ["0", "1", "2"])
    result = cli("eval", compress_run("ce"), "--data", other, *EVAL)
    assert result.exit_code == 2 and "classes" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.gpu
def test_compress_and_eval_on_cuda(teacher_run, small_data, tmp_path):
    # the CUDA path: bf16 autocast, channels_last, pinned loaders; the student still exports and evaluates
    out = tmp_path / "run"
    flags = FAST[: FAST.index("--device")] + ["--device", "cuda"]
    cli_ok("compress", "--teacher", teacher_run, "--student", "mobilenetv2_050", "--data", small_data, "--method", "london", *flags, "--out", out)
    row = next(csv.DictReader(open(out / "summary.csv")))
    assert all(math.isfinite(float(row[k])) for k in ("loss", "ce", "kd", "lip"))
    assert yaml.safe_load((out / "recipe.yaml").read_text())["train"]["device"] == "cuda"
    result = eval_json(out, small_data, "--device", "cuda")
    assert 0 <= result["student"]["top1"] <= 100 and "cuda" in result["student"]["device"]


# ---- lipschitz ----------------------------------------------------------------------------
def test_lipschitz_shows_a_london_run_through_its_connectors(compress_run, teacher_run, small_data):
    london = run_for(compress_run, "london")
    args = ("--data", small_data, "--device", "cpu", "--batches", "2", "--batch-size", "16")
    rows = json.loads(cli_ok("lipschitz", london, *args, "--json").stdout)["stages"]
    assert [r["name"] for r in rows] == ["stride 4->8", "stride 8->16", "stride 16->32"]
    # at 32 px the stride-32 map is 1x1: london leaves that matrix out and trains no connector for it
    assert rows[-1]["connected"] is None and rows[-1]["connected_gap"] is None and rows[-1]["teacher"] > 0
    for r in rows[:-1]:
        # the connectors map the student's channels to the teacher's: another matrix, another norm
        assert r["connected"] > 0 and r["connected"] != pytest.approx(r["model"], rel=1e-3)
        assert r["connected_gap"] == pytest.approx(r["connected"] - r["teacher"])
        assert r["gap"] == pytest.approx(r["model"] - r["teacher"])
    assert "connected gap" in cli_ok("lipschitz", london, *args).stdout
    # connectors fit only the run's own teacher; a kd run has none
    named = json.loads(cli_ok("lipschitz", london, *args, "--teacher", teacher_run, "--json").stdout)["stages"]
    kd = json.loads(cli_ok("lipschitz", run_for(compress_run, "kd"), *args, "--json").stdout)["stages"]
    assert "connected" not in named[0] and "connected" not in kd[0]
    assert [r["teacher"] for r in named] == pytest.approx([r["teacher"] for r in rows])
