"""Every mistake a user can make: exit code 2, one line on stderr naming it, no traceback, no run folder.

Each case runs `python -m lcdistill` in a fresh process, so stderr is exactly what a user's
shell shows (library warnings included, which an in-process runner would swallow).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST, assert_user_error, cli, cli_ok, cli_process, subprocess_env, subset

STUDENT = ["--student", "mobilenetv2_050"]


def compress(data, teacher, out, *extra, **kwargs):
    args = ("compress", "--teacher", teacher, *STUDENT, "--data", data, *FAST, *extra, "--out", out)
    # In-process saves ~4 s of imports per case; the hub cases need their own process (env, timing).
    return cli_process(*args, **kwargs) if kwargs else cli(*args)


def tiny_copy(small_data: Path, out: Path, classes=("0", "1", "2"), n: int = 2) -> Path:
    return subset(small_data, out, n, n, list(classes))


# ---- data --------------------------------------------------------------------------------
def test_compress_without_data(teacher_run, tmp_path):
    out = tmp_path / "run"
    proc = cli_process("compress", "--teacher", teacher_run, *STUDENT, *FAST, "--out", out)
    assert_user_error(proc, "--data", run_dir=out)


def test_train_without_data(tmp_path):
    out = tmp_path / "run"
    proc = cli_process("train", "--model", "resnet18", *FAST, "--out", out)
    assert_user_error(proc, "--data", run_dir=out)


def test_data_folder_missing(teacher_run, tmp_path):
    out = tmp_path / "run"
    proc = compress(tmp_path / "nowhere", teacher_run, out)
    assert_user_error(proc, "nowhere", "not found", run_dir=out)


@pytest.mark.parametrize("missing", ["train", "val"])
def test_data_without_split(small_data, teacher_run, tmp_path, missing):
    data = tiny_copy(small_data, tmp_path / "data")
    shutil.rmtree(data / missing)
    out = tmp_path / "run"
    line = assert_user_error(compress(data, teacher_run, out), f"no {missing}/", run_dir=out)
    assert str(data) in line


def test_val_classes_differ(small_data, teacher_run, tmp_path):
    data = tiny_copy(small_data, tmp_path / "data")
    (data / "val" / "2").rename(data / "val" / "two")
    out = tmp_path / "run"
    line = assert_user_error(compress(data, teacher_run, out), "classes differ", run_dir=out)
    assert "'2'" in line and "'two'" in line


@pytest.mark.parametrize("split", ["train", "val"])
def test_class_folder_without_images(small_data, teacher_run, tmp_path, split):
    data = tiny_copy(small_data, tmp_path / "data")
    for f in (data / split / "1").iterdir():
        f.unlink()
    (data / split / "1" / "notes.txt").write_text("not an image")  # non-images do not count
    out = tmp_path / "run"
    line = assert_user_error(compress(data, teacher_run, out), "no images", run_dir=out)
    assert str(data / split / "1") in line


def test_unreadable_image(small_data, teacher_run, tmp_path):
    data = tiny_copy(small_data, tmp_path / "data")
    bad = data / "train" / "1" / "x.png"
    bad.write_text("this is text, not a PNG")
    out = tmp_path / "run"
    line = assert_user_error(compress(data, teacher_run, out), "unreadable", run_dir=out)
    assert str(bad) in line


# ---- models ------------------------------------------------------------------------------
def test_unknown_model_train_suggests_close_names(small_data, tmp_path):
    out = tmp_path / "run"
    proc = cli_process("train", "--model", "resnet181", "--data", small_data, *FAST, "--out", out)
    line = assert_user_error(proc, "resnet181", "resnet18,", run_dir=out)
    suggested = [s.strip() for s in line.split("did you mean", 1)[1].strip().rstrip("?").split(",")]
    assert len(suggested) == len(set(suggested)), f"a name is suggested twice: {line}"


def test_unknown_student_suggests_close_names(small_data, teacher_run, tmp_path):
    out = tmp_path / "run"
    proc = cli_process("compress", "--teacher", teacher_run, "--student", "mobilenetv2_05", "--data", small_data, *FAST, "--out", out)
    assert_user_error(proc, "unknown model", "mobilenetv2_050", run_dir=out)


# ---- recipes -----------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["compress", "train"])
def test_recipe_file_missing(small_data, teacher_run, tmp_path, command):
    out = tmp_path / "run"
    missing = tmp_path / "nope.yaml"
    if command == "compress":
        proc = compress(small_data, teacher_run, out, "--recipe", missing)
    else:
        proc = cli_process("train", "--model", "resnet18", "--data", small_data, "--recipe", missing, *FAST, "--out", out)
    assert_user_error(proc, str(missing), "not found", run_dir=out)


def test_recipe_with_unknown_key(small_data, teacher_run, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("student:\n  name: mobilenetv2_050\nschedule:\n  epoch: 3\n")
    out = tmp_path / "run"
    proc = cli_process("compress", "--teacher", teacher_run, "--recipe", recipe, "--data", small_data, *FAST, "--out", out)
    line = assert_user_error(proc, "schedule.epoch", run_dir=out)
    for valid in ("epochs", "batch_size", "lr", "warmup_epochs"):
        assert valid in line


def test_set_unknown_key(small_data, teacher_run, tmp_path):
    out = tmp_path / "run"
    line = assert_user_error(compress(small_data, teacher_run, out, "--set", "kd.tempreature=2"), "kd.tempreature", run_dir=out)
    assert "temperature" in line.split("kd.tempreature", 1)[1] and "weight" in line


def test_set_without_value(small_data, teacher_run, tmp_path):
    out = tmp_path / "run"
    assert_user_error(compress(small_data, teacher_run, out, "--set", "kd.temperature"), "KEY=VALUE", run_dir=out)


# ---- teachers ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def three_class_teacher(small_data, tmp_path_factory) -> Path:
    data = subset(small_data, tmp_path_factory.mktemp("three") / "data", 20, 6, ["0", "1", "2"])
    out = tmp_path_factory.mktemp("three-teacher") / "run"
    cli_ok("train", "--model", "resnet18", "--data", data, *FAST, "--out", out)
    return out


def test_teacher_with_other_classes(small_data, three_class_teacher, tmp_path):
    out = tmp_path / "run"
    assert_user_error(compress(small_data, three_class_teacher, out), "classes", "lcdistill train", run_dir=out)


@pytest.fixture(scope="module")
def thousand_classes(digits, tmp_path_factory) -> Path:
    """1000 one-image classes (hard links of one digit): data a hub ImageNet teacher would fit."""
    image = next((digits / "train" / "0").iterdir())
    root = tmp_path_factory.mktemp("k") / "data"
    for split in ("train", "val"):
        for c in range(1000):
            folder = root / split / f"c{c:04d}"
            folder.mkdir(parents=True)
            os.link(image, folder / "a.png")
    return root


@pytest.mark.parametrize("name", ["resnet50", "tv:resnet50"])
def test_hub_teacher_offline_fails_fast(thousand_classes, tmp_path, name):
    out = tmp_path / "run"
    start = time.monotonic()
    proc = compress(thousand_classes, name, out, env=subprocess_env(LCDISTILL_OFFLINE="1"), timeout=60)
    took = time.monotonic() - start
    assert_user_error(proc, "--teacher-weights", "unreachable", run_dir=out)
    assert took < 15, f"took {took:.1f} s"


def test_hub_teacher_with_other_class_count_offline(small_data, tmp_path):
    out = tmp_path / "run"
    start = time.monotonic()
    proc = compress(small_data, "resnet50", out, env=subprocess_env(LCDISTILL_OFFLINE="1"), timeout=60)
    assert_user_error(proc, "--teacher-weights", "1000", "lcdistill train", run_dir=out)
    assert time.monotonic() - start < 15


def test_train_pretrained_offline_asks_for_weights_file(small_data, tmp_path):
    # `train --pretrained` re-initialises the head for the data's classes: offline, the only
    # missing piece is the hub weights, so the error must point at --weights.
    out = tmp_path / "run"
    proc = cli_process("train", "--model", "resnet18", "--pretrained", "--data", small_data, *FAST, "--out", out, timeout=60)
    line = assert_user_error(proc, "weights", run_dir=out)
    assert "1000" not in line


class _Payload:
    """Unpickling this calls Path(marker).touch(): code execution, made visible."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def assert_no_unsafe_advice(line: str) -> None:
    """torch's own text says how to load the file anyway (weights_only=False, allow-listing): never pass that on."""
    for unsafe in ("weights_only` set to `False`", "weights_only=False", "can still be loaded", "add_safe_globals", "\x1b["):
        assert unsafe not in line, f"{unsafe!r} in {line!r}"


def _malicious_pth(path: Path, marker: Path) -> Path:
    state = torch.nn.Linear(2, 2).state_dict()
    state["payload"] = _Payload(marker)
    torch.save(state, path)
    return path


def test_malicious_pickle_teacher_weights_refused(small_data, tmp_path):
    # The payload is live: a plain unpickle runs it.
    probe_marker = tmp_path / "probe-ran"
    probe = _malicious_pth(tmp_path / "probe.pth", probe_marker)
    torch.load(probe, weights_only=False)
    assert probe_marker.exists()

    marker = tmp_path / "payload-ran"
    evil = _malicious_pth(tmp_path / "teacher.pth", marker)
    out = tmp_path / "run"
    proc = compress(small_data, "resnet18", out, "--teacher-weights", evil)
    line = assert_user_error(proc, "refused", str(evil), run_dir=out)
    assert not marker.exists(), "the pickle payload ran"
    assert_no_unsafe_advice(line)


# ---- export and eval of things that are not runs -------------------------------------------
@pytest.fixture
def not_runs(tmp_path, small_data):
    text = tmp_path / "model.txt"
    text.write_text("hello")
    fake_onnx = tmp_path / "model.onnx"
    fake_onnx.write_text("not onnx")
    fake_pt = tmp_path / "model.pt"
    fake_pt.write_text("not torchscript")
    return {"data dir": small_data, "missing": tmp_path / "missing-run", "text file": text, "onnx": fake_onnx, "pt": fake_pt}


@pytest.mark.parametrize("what", ["data dir", "missing", "text file", "onnx"])
def test_export_of_non_run(not_runs, tmp_path, what):
    target = not_runs[what]
    out = tmp_path / "export"
    proc = cli_process("export", target, "--out", out)
    assert_user_error(proc, str(target), run_dir=out)


@pytest.mark.parametrize("what", ["data dir", "missing", "onnx", "pt"])
def test_eval_of_non_run(not_runs, small_data, what):
    target = not_runs[what]
    proc = cli_process("eval", target, "--data", small_data, "--workers", "0")
    assert_user_error(proc, str(target))


def test_resume_refuses_other_settings(tmp_path):
    # a resumed run follows its own recipe; a flag beside --resume would be silently ignored
    assert_user_error(cli("compress", "--resume", tmp_path, "--epochs", "3"), "--resume", "--epochs")
