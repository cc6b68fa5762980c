"""Quantization-aware runs as runs: the teacher left alone, bad settings refused in one line, a stopped run resumed
bit for bit (a file of its own so pytest's workers share the quantization-aware tests between them)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import assert_user_error, cli, cli_ok, cli_process
from lcdistill.quantize.prepare import ATTR


def test_the_teacher_is_never_quantized(teacher_run, small_data, tmp_path):
    """The run's hook prepares the distiller's student only: the teacher keeps its plain weights, no quantizer
    hook and the same outputs, and none of its tensors is among what trains."""
    from torch.nn.utils import parametrize

    from lcdistill import run as runs

    layers = [{"method": "kd+london", "student": {"name": "mobilenetv2_050"}, "qat": {"mode": "int8"}, "schedule": {"epochs": 1, "batch_size": 16},
               "data": {"input_size": 32, "workers": 0}, "train": {"device": "cpu"}}]
    p = runs.prepare(layers, str(small_data), str(teacher_run), None, str(tmp_path / "r"))
    distiller = runs.build_distiller(p)
    teacher = p.teacher.model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = teacher(x)
    hooks = lambda m: sum(len(n._forward_pre_hooks) + len(n._forward_hooks) for n in m.modules())  # noqa: E731
    had = hooks(teacher)
    p.qat.before_optimizer(distiller)
    assert hasattr(distiller.student, ATTR) and p.qat.report["quantized"] > 40
    assert not hasattr(teacher, ATTR) and not any(parametrize.is_parametrized(m) for m in teacher.modules()) and hooks(teacher) == had
    with torch.no_grad():
        assert torch.equal(teacher(x), before)
    trained = {id(t) for t in distiller.parameters()}
    assert not any(id(t) in trained for t in teacher.parameters())
    assert not (tmp_path / "r").exists()


def test_bad_quantize_values_are_one_line(small_data, tmp_path):
    proc = cli("train", "--model", "mobilenetv2_050", "--data", small_data, "--quantize", "int4", "--out", tmp_path / "r")
    assert_user_error(proc, "qat.mode", "int8", run_dir=tmp_path / "r")
    proc = cli("train", "--model", "mobilenetv2_050", "--data", small_data, "--quantize", "int8", "--set", "qat.freeze_bn_at=2",
               "--out", tmp_path / "r")
    assert_user_error(proc, "qat.freeze_bn_at", run_dir=tmp_path / "r")
    proc = cli("train", "--model", "mobilenetv2_050", "--data", small_data, "--quantize", "int8", "--set", "qat.weight_bits=6", "--out", tmp_path / "r")
    assert_user_error(proc, "qat.weight_bits must be 8 or 4", "qat.weight_bits=8", run_dir=tmp_path / "r")


def test_a_two_stage_detector_is_refused_in_one_line(tmp_path):
    from lcdistill.data.scenes import write_digit_scenes

    write_digit_scenes(tmp_path / "scenes", images=20)
    proc = cli("train", "--model", "tv:fasterrcnn_mobilenet_v3_large_320_fpn", "--data", tmp_path / "scenes", "--quantize", "int8",
               "--input-size", "64", "--out", tmp_path / "r")
    assert_user_error(proc, "covers FCOS and RetinaNet detectors", "post-training int8", run_dir=tmp_path / "r")
    proc = cli("train", "--model", "mobilenetv2_050", "--data", tmp_path / "scenes", "--quantize", "int8", "--set", "qat.weight_range=minmax",
               "--out", tmp_path / "r")
    assert_user_error(proc, "qat.weight_range", "learnt", run_dir=tmp_path / "r")


def test_a_stopped_quantization_aware_run_resumes_to_the_unbroken_one(teacher_run, small_data, tmp_path):
    """Observer ranges, their state, the step count, the parametrized weights and their learnt clipping shares (int4
    weights) are in the checkpoint: a run stopped by SIGTERM mid-epoch and resumed ships the same grid weights and
    activation scales as the unbroken run, bit for bit."""
    import signal

    from test_resume import LONDON, assert_same_run, resume, start, stop_after_a_step

    args = ["--teacher", teacher_run, "--data", small_data, *LONDON, "--quantize", "int8", "--set", "qat.calibration_steps=2", "--set", "qat.weight_bits=4"]
    reference = tmp_path / "reference"
    proc = cli_process("compress", *args, "--out", reference)  # in a fresh interpreter, as the resumed run: same threads and flags
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "run"
    proc = start(*args, "--out", out)
    state = stop_after_a_step(proc, out, signal.SIGTERM, group=False, code=143)
    assert state["epoch"] == 0 and state["global_step"] >= 1
    assert not (out / "student.safetensors").exists()
    resume(out)
    assert_same_run(out, reference)
    shipped = json.loads((out / "student.json").read_text())["qat"]
    assert shipped == json.loads((reference / "student.json").read_text())["qat"] and shipped["weight_range"] == "learnt"


@pytest.mark.gpu
def test_a_quantization_aware_fine_tune_on_cuda_exports_what_it_learnt(teacher_run, small_data, tmp_path):
    """The CUDA path (bf16 autocast, channels_last) trains through the fake quantization; the int8 file made from
    it on the CPU still agrees with the fake-quantized model."""
    run = tmp_path / "qat"
    cli_ok("train", "--model", teacher_run, "--data", small_data, "--quantize", "int8", "--epochs", "1", "--workers", "0", "--device", "cuda",
           "--out", run)
    assert json.loads((run / "student.json").read_text())["qat"]["scheme"] == "int8"
    first = next(line for line in cli_ok("export", run, "--format", "onnx", "--quantize", "int8").stdout.splitlines() if line.startswith("int8:"))
    agree, seen = map(int, re.search(r"agrees with PyTorch on (\d+) of the (\d+) val images", first).groups())
    assert agree >= 0.97 * seen, first  # resnet18's twice-called ReLUs keep consumer-side quantizers
