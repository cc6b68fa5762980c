"""The benchmark scripts run end to end (on CPU, tiny settings) and write their tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


@pytest.mark.slow
def test_throughput_benchmark_prints_the_ratio_table(tmp_path):
    report = tmp_path / "RESULTS.md"
    # compile backend 'eager': dynamo captures every compiled row (LONDON's hooks too) without inductor's C++ build
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--teacher", "resnet18", "--student", "mobilenetv2_050", "--size", "32", "--batch-size", "8",
         "--steps", "2", "--warmup", "1", "--jpegs", "32", "--workers", "0", "--device", "cpu", "--compile-backend", "eager", "--e2e-mode", "eager",
         "--jpeg-dir", tmp_path / "jpegs", "--out", report],
        capture_output=True, text=True, timeout=240, env=subprocess_env(), cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for row in ("| plain | eager |", "| kd | compiled |", "| london | compiled |", "| e2e london gpu-decode | eager |", "| e2e london cpu-path | eager |"):
        assert row in out, out
    assert "failed" not in out, out
    for ratio in ("kd / plain (compiled)", "london / kd (compiled)", "end-to-end GPU decode / compute (eager)"):
        line = next(line for line in out.splitlines() if ratio in line)
        assert float(line.split("|")[2]) > 0, line
    assert report.read_text().strip() == out.strip()
    assert len(list((tmp_path / "jpegs" / "train").rglob("*.jpg"))) == 32


@pytest.mark.slow
def test_methods_benchmark_writes_its_table(tmp_path):
    report = tmp_path / "methods.md"
    script = SCRIPT.parent / "methods.py"
    proc = subprocess.run(
        [sys.executable, script, "--fraction", "0.05", "--seeds", "0", "--epochs", "1", "--teacher-epochs", "1",
         "--methods", "kd", "london@london.alpha=0", "--out", report],
        capture_output=True, text=True, timeout=240, env=subprocess_env(), cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = report.read_text()
    rows = {line.split("|")[1].strip(): line.split("|") for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"method", "kd", "london@london.alpha=0"}, table
    # raw gaps for both; the connected gap only where connectors exist
    assert "mean" in rows["kd"][4] and rows["kd"][5].strip() == "-", table
    assert "mean" in rows["london@london.alpha=0"][5], table
    assert "70 training images (5% of digits train)" in table, table
