"""Stopping a run and picking it up again: SIGKILL, Ctrl-C, SIGTERM, divergence, unwritable folders.

The runs are real `python -m lcdistill compress` processes, stopped from outside at a step they
are known to have reached. "Resumed" must mean *the same run*: the student a resumed run ships
is compared bitwise with the one an unbroken run ships, and so are the per-epoch losses.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import assert_user_error, cli, cli_process, subprocess_env
from lcdistill.checkpoint import load_state

LAST = Path("checkpoints") / "last.safetensors"
STEPS_PER_EPOCH = 10 * 20 // 16  # small_data: 10 classes x 20 train images, batch 16, drop_last
# Two epochs, a checkpoint every 3 steps, a metrics line every step. The student's dropout draws
# from the global torch RNG, so a resume must restore that stream exactly, not just the weights.
LONDON = ["--student", "mobilenetv2_050", "--method", "london", "--epochs", "2", "--batch-size", "16", "--workers", "0",
          "--checkpoint-every", "3", "--input-size", "32", "--device", "cpu", "--set", "data.crop_pct=1.0",
          "--set", "train.deterministic=true", "--set", "train.log_every=1", "--set", "student.kwargs.drop_rate=0.2"]
# No teacher, one epoch: for what does not need a distillation run.
CE = ["--student", "mobilenetv2_050", "--method", "ce", "--epochs", "1", "--batch-size", "16", "--workers", "0",
      "--input-size", "32", "--device", "cpu", "--set", "data.crop_pct=1.0", "--set", "train.log_every=1"]


# ---- helpers ---------------------------------------------------------------------------------
def start(*args) -> subprocess.Popen:
    """`lcdistill compress ARGS` in its own process group, as a shell would start it."""
    return subprocess.Popen([sys.executable, "-m", "lcdistill", "compress", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env(), start_new_session=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before it got there:\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("the run never got there")
        time.sleep(0.01)


def has_steps(run: Path):
    metrics = run / "metrics.jsonl"
    return lambda: metrics.is_file() and metrics.stat().st_size > 0


def stderr_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, f"expected one line on stderr:\n{stderr}"
    return lines[0]


def stop_after_a_step(proc: subprocess.Popen, out: Path, sig: int, group: bool, code: int) -> dict:
    """Signal a run (its whole process group, as Ctrl-C does, or the process alone) once it has
    logged a step; it must exit with `code` and one line naming the signal and the resume command.
    Returns the checkpoint it left."""
    wait_for(has_steps(out), proc)
    (os.killpg if group else os.kill)(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    line = stderr_line(err)
    assert signal.Signals(sig).name in line and f"--resume {out}" in line
    return load_state(out / LAST)


def assert_same_student(a: Path, b: Path) -> None:
    one, two = load_file(a / "student.safetensors"), load_file(b / "student.safetensors")
    assert one.keys() == two.keys()
    differ = [k for k in one if not torch.equal(one[k], two[k])]
    assert not differ, f"{len(differ)} of {len(one)} tensors differ, e.g. {differ[:3]}"


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "img_per_s"} for row in rows]


def summary(run: Path) -> list[dict]:
    with open(run / "summary.csv", newline="") as f:
        return without_timing(list(csv.DictReader(f)))


def metrics(run: Path) -> list[dict]:
    return without_timing([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()])


def assert_same_run(resumed: Path, reference: Path) -> None:
    """Same shipped weights, same per-epoch losses and accuracy, each step logged once."""
    assert_same_student(resumed, reference)
    assert summary(resumed) == summary(reference)
    assert metrics(resumed) == metrics(reference)
    assert not list(resumed.rglob("*.tmp")), "a temporary file was left behind"


def resume(run: Path) -> subprocess.CompletedProcess:
    proc = cli_process("compress", "--resume", run)
    assert proc.returncode == 0, f"resume exited {proc.returncode}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def london(teacher_run, small_data):
    return ["--teacher", teacher_run, "--data", small_data, *LONDON]


@pytest.fixture(scope="module")
def reference(london, tmp_path_factory) -> Path:
    """The unbroken run every stopped-and-resumed run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = cli_process("compress", *london, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


# ---- SIGKILL: nothing is saved on the way out ----------------------------------------------
def test_sigkill_mid_epoch_then_resume_is_the_unbroken_run(london, reference, tmp_path):
    out = tmp_path / "run"
    proc = start(*london, "--out", out)
    wait_for((out / LAST).is_file, proc)
    os.kill(proc.pid, signal.SIGSTOP)  # freeze it to read the checkpoint it has
    state = load_state(out / LAST)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert state["epoch"] == 0 and 3 <= state["global_step"] < STEPS_PER_EPOCH, "not killed mid-epoch"
    assert not (out / "student.safetensors").exists()

    done = resume(out)
    assert f"at epoch 1, step {state['step_in_epoch']}" in " ".join(done.stdout.split())
    assert_same_run(out, reference)


# ---- SIGINT (Ctrl-C) and SIGTERM: checkpoint, one line, the exit code a shell expects ---------
def test_ctrl_c_with_loader_workers_then_resume_is_the_unbroken_run(london, reference, tmp_path):
    # Ctrl-C reaches the whole process group, loader workers included. The resumed run keeps the
    # 2 workers it started with; augmentation is seeded per sample, so it still matches 0 workers.
    out = tmp_path / "run"
    proc = start(*london, "--workers", "2", "--out", out)
    state = stop_after_a_step(proc, out, signal.SIGINT, group=True, code=130)
    assert state["epoch"] == 0 and state["global_step"] >= 1

    resume(out)
    assert yaml.safe_load((out / "recipe.yaml").read_text())["data"]["workers"] == 2
    assert_same_run(out, reference)


def test_sigterm_then_resume_finishes(small_data, tmp_path):
    out = tmp_path / "run"
    proc = start("--data", small_data, *CE, "--out", out)
    state = stop_after_a_step(proc, out, signal.SIGTERM, group=False, code=143)
    assert state["global_step"] >= 1 and state["epoch"] == 0

    done = cli("compress", "--resume", out)  # in-process: this one is about the stop, not the restart
    assert done.exit_code == 0, done.stderr
    assert load_state(out / LAST)["epoch"] == 1
    assert (out / "student.safetensors").is_file() and (out / "student.json").is_file()
    steps = [r["step"] for r in metrics(out) if "step" in r]
    assert steps == list(range(1, STEPS_PER_EPOCH + 1)), "a step was logged twice or not at all"


def test_sigterm_while_the_run_is_being_set_up_is_one_line_and_leaves_no_folder(small_data, tmp_path):
    # The signal lands after the run folder is made and before training (and its own handlers) starts.
    out = tmp_path / "run"
    code = ("import os, signal, sys; from lcdistill import cli; from lcdistill.training import loop; real = loop.Trainer.fit\n"
            "def fit(self):\n    assert self.folder.recipe.is_file(); os.kill(os.getpid(), signal.SIGTERM); return real(self)\n"
            "loop.Trainer.fit = fit; sys.argv[1:] = sys.argv[2:]; cli.main()")
    proc = subprocess.run([sys.executable, "-c", code, "--", "compress", "--data", small_data, *CE, "--out", out],
                          capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert proc.returncode == 143, proc.stderr
    assert "SIGTERM" in stderr_line(proc.stderr) and "Traceback" not in proc.stderr
    assert not out.exists()


def test_signal_during_evaluation_stops_after_the_epoch(small_data, tmp_path, monkeypatch):
    # In-process: SIGTERM arrives while the epoch's validation runs, after the last step.
    from lcdistill.training import Trainer

    real_evaluate, sent = Trainer.evaluate, []

    def evaluate_then_signal(self, *args, **kwargs):
        if not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))  # the handler fit() installed takes it
        return real_evaluate(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "evaluate", evaluate_then_signal)
    out = tmp_path / "run"
    result = cli("compress", "--data", small_data, *CE, "--out", out)
    assert result.exit_code == 143, result.stdout
    line = stderr_line(result.stderr)
    assert "SIGTERM after epoch 1" in line and f"--resume {out}" in line
    assert load_state(out / LAST)["epoch"] == 1 and not (out / "student.safetensors").exists()

    monkeypatch.undo()
    assert cli("compress", "--resume", out).exit_code == 0
    assert (out / "student.safetensors").is_file()


# ---- divergence ------------------------------------------------------------------------------
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(small_data, tmp_path):
    out = tmp_path / "run"
    proc = cli_process("compress", "--data", small_data, *CE, "--lr", "1e8", "--checkpoint-every", "1", "--out", out)
    assert proc.returncode not in (0, 2), proc.stderr  # not a bad flag: the run itself failed
    line = stderr_line(proc.stderr)
    state = load_state(out / LAST)  # still loadable
    step = state["global_step"] + 1  # the step after the last checkpoint is the one that diverged
    assert f"at step {step} " in line, line
    for advice in ("--lr", "--max-grad-norm", "float32"):
        assert advice in line, line
    kept = {**state["student"], **state["method"]}
    assert all(torch.isfinite(t).all() for t in kept.values() if t.is_floating_point())
    rows = metrics(out)
    assert all(math.isfinite(r["loss"]) for r in rows)  # nothing non-finite is logged
    # a non-finite loss stops before its step is logged; a finite loss whose update left the weights
    # non-finite is logged, and the checkpoint after it refused
    assert rows[-1]["step"] == (step - 1 if "the loss became" in line else step), line


# ---- where the run is written -----------------------------------------------------------------
def test_out_under_a_file_fails_before_training(small_data, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the run's parent folder should be")
    out = blocker / "run"
    proc = cli_process("compress", "--data", small_data, *CE, "--out", out)
    assert_user_error(proc, str(out), "not a folder", "--out")
    assert "epoch" not in proc.stdout, "training started"
    assert blocker.read_text().startswith("a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to a 0o555 folder anyway")
def test_out_in_a_read_only_folder_fails_before_training(small_data, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        proc = cli_process("compress", "--data", small_data, *CE, "--out", parent / "run")
        assert_user_error(proc, str(parent / "run"), "--out", run_dir=parent / "run")
    finally:
        parent.chmod(0o755)


def test_failed_checkpoint_write_keeps_the_previous_checkpoint(small_data, tmp_path, monkeypatch):
    # The disk fills up during the second checkpoint: half the bytes reach the temporary file.
    import lcdistill.checkpoint as checkpoint

    real_save_file, calls = checkpoint.save_file, []

    def disk_full_on_second_write(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"\0" * 1000)
            raise OSError(28, "No space left on device")
        real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", disk_full_on_second_write)
    out = tmp_path / "run"
    result = cli("compress", "--data", small_data, *CE, "--checkpoint-every", "2", "--out", out)
    assert result.exit_code not in (0, 2), result.stdout
    line = stderr_line(result.stderr)
    assert "No space left on device" in line and "previous checkpoint is intact" in line and f"--resume {out}" in line
    assert load_state(out / LAST)["global_step"] == 2
    assert not list(out.rglob("*.tmp")), "the half-written temporary file was left behind"
