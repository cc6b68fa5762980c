"""Accuracy on real digits: a real teacher and a LONDON student trained from it.

The slowest file of the suite (about a minute and a half on 2 idle cores): the end-to-end
proof that training and distillation work.
"""

import json
import os

import pytest

from conftest import EVAL, cli_ok

DIGITS = ["--input-size", "32", "--batch-size", "64", "--workers", "0", "--device", "cpu", "--set", "data.hflip=0",
          "--set", "data.scale=[0.6,1.0]", "--set", "data.crop_pct=1.0", "--set", "schedule.warmup_epochs=1"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def all_cores():
    # these are real trainings: use every core, not the suite's one thread
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, os.cpu_count() or 2))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def real_teacher(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("real-teacher") / "run"
    cli_ok("train", "--model", "resnet18", "--data", digits, "--epochs", "6", "--lr", "0.1", *DIGITS, "--out", out)
    return out


def top1(run, data):
    return json.loads(cli_ok("eval", run, "--data", data, "--json", "--no-teacher", *EVAL).stdout)["student"]["top1"]


def test_teacher_learns_digits(real_teacher, digits):
    assert top1(real_teacher, digits) >= 97.0


def test_london_student_learns_from_the_teacher(real_teacher, digits, tmp_path):
    out = tmp_path / "run"
    cli_ok("compress", "--teacher", real_teacher, "--student", "mobilenetv2_050", "--data", digits,
           "--epochs", "10", "--lr", "0.05", *DIGITS, "--out", out)
    assert top1(out, digits) >= 90.0
    report = json.loads(cli_ok("lipschitz", out, "--data", digits, "--json", "--device", "cpu").stdout)
    assert len(report["stages"]) == 3 and all(row["model"] > 0 and row["teacher"] > 0 for row in report["stages"])
