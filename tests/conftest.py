"""Shared fixtures: the digits data, a small subset of it, and a tiny teacher run made by the CLI.

Everything here is real: real PNG files, real `lcdistill train` runs on CPU. The fixtures are
session-scoped so the whole suite pays for the digits and the teacher once.
"""

from __future__ import annotations

import os

# Small models on a shared 2-core box: one intra-op thread is as fast and does not fight
# other processes for cores. Set before torch is imported, for subprocesses too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# Never reach for the hub from the test suite (and fail in seconds when something tries).
os.environ["LCDISTILL_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("NO_COLOR", "1")

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from lcdistill.cli import app  # noqa: E402
from lcdistill.data import write_digits  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

TRAIN_PER_CLASS = 20
VAL_PER_CLASS = 6
# Flags every test run uses: tiny images, one loader process, digits need no centre crop, and
# the CPU even where a GPU is visible, so runs repeat exactly and eval sees the same numbers.
FAST = ["--epochs", "1", "--input-size", "32", "--batch-size", "32", "--workers", "0", "--set", "data.crop_pct=1.0", "--device", "cpu"]
EVAL = ["--workers", "0", "--device", "cpu"]


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu need CUDA: skipped (not failed) on CPU-only machines."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


# ---- running the CLI ---------------------------------------------------------------------
def cli(*args, env: dict | None = None):
    """`lcdistill ARGS` in this process (typer's CliRunner); stdout and stderr kept apart."""
    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    return result


def cli_ok(*args, env: dict | None = None):
    result = cli(*args, env=env)
    if result.exit_code != 0:
        raise AssertionError(f"lcdistill {' '.join(map(str, args))} exited {result.exit_code}\n"
                             f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}\nexception: {result.exception!r}") from result.exception
    return result


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(extra)
    return env


def cli_process(*args, cwd=None, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m lcdistill ARGS` in a fresh interpreter: what a user's shell sees, warnings and all."""
    return subprocess.run(
        [sys.executable, "-m", "lcdistill", *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env or subprocess_env(),
    )


def assert_user_error(proc, *keywords: str, run_dir: Path | None = None) -> str:
    """Exit 2, exactly one non-empty stderr line naming the problem, no traceback, no run folder."""
    if hasattr(proc, "returncode"):
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    else:  # CliRunner result: an escaped exception would not show as a traceback, so check it
        code, out, err = proc.exit_code, proc.stdout, proc.stderr
        assert proc.exception is None or isinstance(proc.exception, SystemExit), repr(proc.exception)
    assert code == 2, f"exit code {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in out + err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    line = lines[0]
    for word in keywords:
        assert word.lower() in line.lower(), f"{word!r} not in {line!r}"
    if run_dir is not None:
        assert not Path(run_dir).exists(), f"{run_dir} was created"
    return line


# ---- data -------------------------------------------------------------------------------
def subset(source: Path, out: Path, train: int, val: int, classes: list[str] | None = None) -> Path:
    """The first `train`/`val` images of each class of an ImageFolder, copied."""
    for split, n in (("train", train), ("val", val)):
        for folder in sorted((source / split).iterdir()):
            if classes is not None and folder.name not in classes:
                continue
            dest = out / split / folder.name
            dest.mkdir(parents=True)
            for f in sorted(folder.iterdir())[:n]:
                shutil.copy(f, dest / f.name)
    return out


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """All 1,797 digits, written by lcdistill.data.write_digits (seed 0)."""
    out = tmp_path_factory.mktemp("digits") / "digits"
    write_digits(out)
    return out


@pytest.fixture(scope="session")
def digits_cli(tmp_path_factory):
    """The same data written a second time, by `lcdistill data digits OUT`: (OUT, CLI result)."""
    out = tmp_path_factory.mktemp("digits-cli") / "digits"
    return out, cli_ok("data", "digits", out)


@pytest.fixture(scope="session")
def small_data(digits, tmp_path_factory) -> Path:
    """20 train + 6 val images per class: fast enough for CLI runs."""
    return subset(digits, tmp_path_factory.mktemp("small") / "data", TRAIN_PER_CLASS, VAL_PER_CLASS)


@pytest.fixture(scope="session")
def teacher_run(small_data, tmp_path_factory) -> Path:
    """A resnet18 trained for one epoch by `lcdistill train`: a teacher run folder."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    cli_ok("train", "--model", "resnet18", "--data", small_data, *FAST, "--out", out)
    return out


@pytest.fixture(scope="session")
def compress_run(teacher_run, small_data, tmp_path_factory):
    """compress_run(method, *extra) -> run folder of a one-epoch mobilenetv2_050 student (cached)."""
    made: dict[tuple, Path] = {}

    def make(method: str, *extra: str) -> Path:
        key = (method, *extra)
        if key not in made:
            out = tmp_path_factory.mktemp(f"student-{method}") / "run"
            cli_ok("compress", "--teacher", teacher_run, "--student", "mobilenetv2_050", "--data", small_data,
                   "--method", method, *FAST, *extra, "--out", out)
            made[key] = out
        return made[key]

    return make
