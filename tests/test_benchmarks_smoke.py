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
def test_methods_benchmark_writes_its_tables(tmp_path):
    import json

    report = tmp_path / "methods.md"
    script = SCRIPT.parent / "methods.py"
    proc = subprocess.run(
        [sys.executable, script, "--dataset", "digits", "--fractions", "0.05", "--seeds", "0", "1", "--epochs", "1", "--teacher-epochs", "1",
         "--methods", "kd", "kd+london", "--out", report],
        capture_output=True, text=True, timeout=400, env=subprocess_env(), cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = report.read_text()
    clean, robust = (part for part in text.split("\n\n") if part.startswith("| method"))
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in clean.splitlines()[2:]}
    assert set(rows) == {"kd", "kd+london"}, text
    # kd+london is paired with kd seed by seed; only it has a connected gap (its connectors)
    assert rows["kd"][1] == "" and "(se " in rows["kd+london"][1] and " up, " in rows["kd+london"][1], text
    assert rows["kd"][4] == "-" and float(rows["kd+london"][4]) > 0, text
    assert robust.splitlines()[0].startswith("| method | noise 0.05 |") and "FGSM 4/255" in robust, text
    assert [line.split("|")[1].strip() for line in robust.splitlines()[2:]] == ["teacher", "kd", "kd+london"], text
    assert "(5% of digits train (70 images)" in text or "5% of digits train (70 images)" in text, text
    raw = json.loads(report.with_suffix(".json").read_text())
    assert len(raw["runs"]) == 4 and {r["seed"] for r in raw["runs"]} == {0, 1}
    # the tables re-render from the raw numbers alone
    again = subprocess.run([sys.executable, script, "--render", report.with_suffix(".json"), "--out", ""],
                           capture_output=True, text=True, timeout=120, env=subprocess_env(), cwd=tmp_path)
    assert again.returncode == 0 and clean in again.stdout, again.stderr[-2000:]


@pytest.mark.slow
def test_segmentation_methods_benchmark_writes_its_table(tmp_path):
    report = tmp_path / "seg.md"
    proc = subprocess.run(
        [sys.executable, SCRIPT.parent / "seg_methods.py", "--seeds", "0", "1", "--images", "40", "--size", "32", "--epochs", "1",
         "--teacher-epochs", "1", "--methods", "kd", "london", "--out", report],
        capture_output=True, text=True, timeout=400, env=subprocess_env(), cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in report.read_text().splitlines() if line.startswith("| ") and "---" not in line and "method" not in line}
    assert set(rows) == {"kd", "london"}, rows
    kd, london = ([float(v) for v in rows[m][2].split(", ")] for m in ("kd", "london"))
    assert len(kd) == len(london) == 2 and all(0 <= v <= 100 for v in kd + london)
    # london is paired with kd seed by seed (its table shows one decimal: allow the rounding)
    assert rows["kd"][1] == "" and rows["london"][1].endswith("vs kd"), rows
    assert float(rows["london"][1].split()[0]) == pytest.approx(sum(london) / 2 - sum(kd) / 2, abs=0.11)
