"""Guardrails: one warning line each for settings that run but are very likely mistakes.

The checks are pure functions of numbers, tested directly; once through the CLI (training stopped
right after the warnings, so no epoch is paid for); and the Makefile demo's own commands on the
digits must raise none of them.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from conftest import cli
from lcdistill import guardrails
from lcdistill.training import Trainer

ROOT = Path(__file__).resolve().parents[1]


# ---- the pure checks ------------------------------------------------------------------------
def test_small_images_at_a_large_input_size():
    line = guardrails.image_size(32, 224)
    assert line and "--input-size 32" in line and "224" in line
    assert guardrails.image_size(32, 32) is None
    assert guardrails.image_size(120, 224) is None  # over half the input: fine
    assert guardrails.image_size(100, 224) is not None
    assert guardrails.image_size(None, 224) is None  # nothing readable: say nothing


def test_warmup_as_long_as_training():
    line = guardrails.warmup(5, 5)
    assert line and "schedule.warmup_epochs" in line and "--epochs" in line
    assert guardrails.warmup(1, 5) is not None
    assert guardrails.warmup(10, 2) is None
    assert guardrails.warmup(3, 0) is None
    assert "warmup_epochs=1 " in guardrails.warmup(3, 5)  # a fifth of 3 epochs rounds to 0: still one epoch to ramp
    assert "warmup_epochs=4 " in guardrails.warmup(20, 20)
    assert "warmup_epochs=0 " in guardrails.warmup(1, 1)  # one epoch leaves no room for a ramp


def test_a_terms_warmup_as_long_as_training():
    line = guardrails.term_warmup("dkd", "warmup_epochs", 10, 20)
    assert line and "--set dkd.warmup_epochs=2" in line and "20 of 10 epochs" in line and "--epochs" in line
    assert guardrails.term_warmup("london", "warmup_epochs", 3, 3) is not None  # reaches full weight only at the last step
    assert guardrails.term_warmup("london", "warmup_epochs", 10, 3) is None
    assert guardrails.term_warmup("dkd", "warmup_epochs", 5, 0) is None  # no ramp
    lines = guardrails.term_warmups(3, [("dkd", "warmup_epochs", 20.0), ("london", "warmup_epochs", 1.0)])
    assert len(lines) == 1 and lines[0].startswith("dkd ")


def test_the_terms_that_ramp_in_say_which_key():
    from lcdistill import methods

    ramps = {t.name: t.warmup_key for t in methods.TERMS.values()}
    assert ramps["dkd"] == ramps["london"] == "warmup_epochs"
    assert ramps["kd"] is None and ramps["cwd"] is None
    for t in methods.TERMS.values():
        assert t.warmup_key is None or t.warmup_key in t.defaults


def test_few_optimizer_steps_per_epoch():
    assert guardrails.steps_per_epoch(1437, 256) == 5  # drop_last, as the trainer's loader
    assert guardrails.steps_per_epoch(1437, 64) == 22
    assert guardrails.steps_per_epoch(1437, 256, world=2) == 5  # global batch split over processes
    line = guardrails.few_steps(5, 1437, 256)
    assert line and "5 optimizer steps" in line and "--batch-size" in line
    assert guardrails.few_steps(22, 1437, 64) is None


def test_ema_that_cannot_forget_the_initial_weights():
    line = guardrails.ema(True, 0.999, 50)
    assert line and "train.ema_decay" in line and "--model-ema" in line
    decay = float(re.search(r"ema_decay=([0-9.]+)", line).group(1))
    assert decay ** 50 <= guardrails.EMA_MEMORY  # the suggested decay does forget in 50 steps
    assert guardrails.ema(True, 0.999, 5000) is None  # 0.999**5000 < 0.01
    assert guardrails.ema(False, 0.999, 50) is None


def test_schedule_gathers_the_three():
    lines = guardrails.schedule(1, 5, 200, 64, ema_on=True, ema_decay=0.999)
    assert len(lines) == 3
    assert guardrails.schedule(15, 2, 1437, 64) == []


def test_median_side_of_the_digits(digits):
    from lcdistill.data import scan

    train, _ = scan(digits, check=False)
    paths = guardrails.sample_paths(train.samples)
    assert len(paths) == guardrails.SIZE_SAMPLE and len(set(paths)) == len(paths)
    assert guardrails.median_side(paths) == 32.0
    assert guardrails.median_side(["/no/such/file.png"]) is None


# ---- through the CLI, training stopped right after the warnings ---------------------------------
class Stopped(Exception):
    """Raised instead of training: the warnings are printed by then."""


@pytest.fixture
def no_training(monkeypatch):
    def stop(self):
        raise Stopped()

    monkeypatch.setattr(Trainer, "fit", stop)


def warnings_of(result) -> list[str]:
    assert isinstance(result.exception, Stopped), f"{result.exception!r}\n{result.stdout}\n{result.stderr}"
    return [line for line in result.stdout.splitlines() if line.startswith("warning:")]


def test_resnet18_at_224_on_digits_warns(digits, tmp_path, no_training):
    out = tmp_path / "run"
    result = cli("train", "--model", "resnet18", "--data", digits, "--batch-size", "256", "--epochs", "2",
                 "--set", "schedule.warmup_epochs=2", "--model-ema", "--workers", "0", "--device", "cpu", "--out", out)
    lines = warnings_of(result)
    assert len(lines) == 4, lines
    size, warm, steps, ema = lines
    assert "--input-size 32" in size and "224 px" in size
    assert "schedule.warmup_epochs" in warm
    assert "5 optimizer steps" in steps and "--batch-size" in steps
    assert "train.ema_decay" in ema
    assert not out.exists(), "a run stopped before its first checkpoint leaves no folder"


def demo_commands() -> dict[str, list[str]]:
    """The Makefile demo's `train` and `compress` argument lists, with its $(DIGITS) flags expanded."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    digits_flags = re.search(r"^DIGITS := (.*)$", text, re.M).group(1)
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", text, re.M).group(1)  # the `demo` target's own commands
    found = {}
    for line in recipe.splitlines():
        m = re.match(r"\t\$\(BIN\)/lcdistill (train|compress) (.*)$", line)
        if m:
            found[m.group(1)] = shlex.split(m.group(2).replace("$(DIGITS)", digits_flags))
    assert set(found) == {"train", "compress"}, "the Makefile's demo lost a command this test reads"
    return found


def test_demo_flags_raise_no_warning(digits, teacher_run, tmp_path, no_training):
    commands = demo_commands()
    for command, args in commands.items():
        args = [str(tmp_path / command) if prev == "--out" else a for prev, a in zip([None] + args, args)]
        args = [str(digits) if a == "$(DEMO)/digits" else str(teacher_run) if a == "$(DEMO)/teacher" else a for a in args]
        assert not [a for a in args if "$(" in a], args
        result = cli(command, *args, "--workers", "0", "--device", "cpu")
        assert warnings_of(result) == [], f"`lcdistill {command}` of make demo warns"


def test_one_warning_for_one_mistake(digits, tmp_path, no_training):
    result = cli("train", "--model", "mobilenetv2_050", "--data", digits, "--input-size", "32", "--batch-size", "512", "--workers", "0",
                 "--device", "cpu", "--out", tmp_path / "run", "--set", "data.crop_pct=1.0")
    lines = warnings_of(result)
    assert len(lines) == 1 and "2 optimizer steps" in lines[0] and "--batch-size" in lines[0]


def test_a_terms_warmup_longer_than_the_run_warns(small_data, teacher_run, tmp_path, no_training):
    result = cli("compress", "--teacher", teacher_run, "--student", "mobilenetv2_050", "--data", small_data, "--method", "dkd+london",
                 "--epochs", "3", "--input-size", "32", "--batch-size", "16", "--workers", "0", "--device", "cpu",
                 "--set", "data.crop_pct=1.0", "--set", "schedule.warmup_epochs=0", "--out", tmp_path / "run")  # the recipe's 5: not this test's
    lines = warnings_of(result)
    assert len(lines) == 2, lines
    assert "--set dkd.warmup_epochs=1" in lines[0] and "20 of 3 epochs" in lines[0]  # at least one epoch of ramp
    assert "--set london.warmup_epochs=1" in lines[1]
