"""Accuracy on real digits: a real teacher and LONDON students trained from it.

The slowest file of the suite (about two and a half minutes on 2 idle cores): the end-to-end
proof that training and distillation work, and that the Lipschitz term does what it claims.
"""

import json
import os

import pytest

from conftest import EVAL, cli_ok

DIGITS = ["--input-size", "32", "--batch-size", "64", "--workers", "0", "--device", "cpu", "--set", "data.hflip=0",
          "--set", "data.scale=[0.6,1.0]", "--set", "data.crop_pct=1.0", "--set", "schedule.warmup_epochs=1"]
pytestmark = pytest.mark.slow
# Measured (docs/method.md): at lr 0.05 about one run in ten, with or without the Lipschitz term, ends near 90%
# after a KD loss spike at peak lr; at lr 0.02, 2 seeds each, default 97.2 / 96.9% and alpha = 0 97.8 / 96.7%, no
# spike. 3 points (11 of 359 val images) lets one seed stand for each without letting a real loss of accuracy through.
TOP1_SLACK = 3.0


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


@pytest.fixture(scope="module")
def london_runs(real_teacher, digits, tmp_path_factory):
    """Students of the same seed and schedule: the default recipe, and alpha = 0 (connectors, no Lipschitz term)."""
    runs = {}
    for name, extra in (("default", []), ("alpha0", ["--set", "london.alpha=0"])):
        runs[name] = tmp_path_factory.mktemp(f"london-{name}") / "run"
        cli_ok("compress", "--teacher", real_teacher, "--student", "mobilenetv2_050", "--data", digits,
               "--epochs", "10", "--lr", "0.02", *DIGITS, "--set", "schedule.warmup_epochs=2", *extra, "--out", runs[name])
    return runs


def test_london_student_learns_from_the_teacher(london_runs, digits):
    assert top1(london_runs["default"], digits) >= 90.0


def connected_gap(run, data) -> float:
    """Mean |student - teacher| TM spectral norm, student through its connectors, over the TMs the term
    uses: at 32 px the third (stride 16 -> 32) is 1x1, and london.min_positions leaves it out."""
    report = json.loads(cli_ok("lipschitz", run, "--data", data, "--json", "--device", "cpu", "--batches", "6").stdout)
    assert len(report["stages"]) == 3 and all(row["model"] > 0 and row["teacher"] > 0 for row in report["stages"])
    used = report["stages"][:2]
    return sum(abs(row["connected_gap"]) for row in used) / len(used)


def test_default_alpha_shrinks_the_lipschitz_gap_without_hurting_top1(london_runs, digits):
    default, baseline = connected_gap(london_runs["default"], digits), connected_gap(london_runs["alpha0"], digits)
    assert default <= 0.7 * baseline, (default, baseline)
    assert top1(london_runs["default"], digits) >= top1(london_runs["alpha0"], digits) - TOP1_SLACK
