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
    assert rows["kd"][5] == "-" and float(rows["kd+london"][5]) > 0, text
    assert rows["kd"][3] == "-", text  # one epoch: no curve to read the last epochs' move from
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
    import json

    report = tmp_path / "seg.md"
    script = SCRIPT.parent / "seg_methods.py"
    proc = subprocess.run(
        [sys.executable, script, "--seeds", "0", "1", "--images", "40", "--size", "32", "--epochs", "1",
         "--teacher-epochs", "1", "--methods", "kd", "kd+london", "--jobs", "2", "--threads", "1", "--out", report],
        capture_output=True, text=True, timeout=400, env=subprocess_env(), cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = report.read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and "---" not in line and "method" not in line}
    assert set(rows) == {"kd", "kd+london"}, rows
    kd, london = ([float(v) for v in rows[m][2].split(", ")] for m in ("kd", "kd+london"))
    assert len(kd) == len(london) == 2 and all(0 <= v <= 100 for v in kd + london)
    # kd+london is paired with kd seed by seed: mean (se), seeds up and down, from the raw numbers
    raw = json.loads(report.with_suffix(".json").read_text())
    by = {(r["method"], r["seed"]): r["miou"] for r in raw["runs"]}
    diffs = [by["kd+london", s] - by["kd", s] for s in (0, 1)]
    assert rows["kd"][1] == "" and "(se " in rows["kd+london"][1] and " up, " in rows["kd+london"][1], rows
    assert float(rows["kd+london"][1].split()[0]) == pytest.approx(sum(diffs) / 2, abs=0.006)
    assert "--methods kd kd+london" in text  # the command that made it
    again = subprocess.run([sys.executable, script, "--render", report.with_suffix(".json"), "--out", ""],
                           capture_output=True, text=True, timeout=120, env=subprocess_env(), cwd=tmp_path)
    assert again.returncode == 0 and rows["kd+london"][1] in again.stdout, again.stderr[-2000:]


def raw_file(path: Path, seeds, miou: dict, lr: float = 0.04, seconds: float = 10.0) -> Path:
    import json

    args = {"seeds": list(seeds), "images": 40, "size": 32, "epochs": 4, "teacher_epochs": 1, "lr": lr, "teacher_lr": 0.008,
            "teacher": "FPN:resnet18", "teacher_run": None, "student": "FPN:tu-mobilenetv3_small_100", "methods": ["kd", "kd+london"],
            "jobs": 1, "threads": 1, "out": "", "render": None, "argv": ["--seeds", *map(str, seeds)]}
    runs = [{"method": m, "seed": s, "miou": miou[m, s], "curve": [0.0, 1.0, 2.0, 3.0, miou[m, s]]} for s in seeds for m in ("kd", "kd+london")]
    path.write_text(json.dumps({"args": args, "command": " ".join(args["argv"]), "teacher": {"miou": 50.0}, "n_train": 32, "n_val": 8,
                                "seconds": seconds, "runs": runs}))
    return path


def test_raw_files_of_one_setting_render_as_one_table_and_other_settings_are_refused(tmp_path):
    """More seeds run later (the same teacher) render with the earlier ones: paired over the union of seeds."""
    miou = {("kd", s): 40.0 + s for s in range(4)} | {("kd+london", s): 41.0 + s + (s % 2) for s in range(4)}
    first, later = raw_file(tmp_path / "a.json", [0, 1], miou), raw_file(tmp_path / "b.json", [2, 3], miou, seconds=5.0)
    script = SCRIPT.parent / "seg_methods.py"
    proc = subprocess.run([sys.executable, script, "--render", first, later, "--out", ""], capture_output=True, text=True, timeout=120,
                          env=subprocess_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| kd+london |"))
    # differences 1, 2, 1, 2: mean +1.50, std 0.577, se 0.29, four up; the last epochs moved by miou - 1.0
    assert "+1.50 (se 0.29), 4 up, 0 down" in row and "41.0, 43.0, 43.0, 45.0" in row and "| +42.00 |" in row, row
    assert "seeds [0, 1, 2, 3]" in proc.stdout and "Took 15 s" in proc.stdout and proc.stdout.count("`python benchmarks/seg_methods.py --seeds") == 2
    other = raw_file(tmp_path / "c.json", [2, 3], miou, lr=0.01)
    refused = subprocess.run([sys.executable, script, "--render", first, other, "--out", ""], capture_output=True, text=True, timeout=120,
                             env=subprocess_env(), cwd=tmp_path)
    assert refused.returncode == 2 and "differs in lr" in refused.stderr and "Traceback" not in refused.stderr, refused.stderr[-2000:]


def test_merged_raw_files_say_which_invocation_stopped_early(tmp_path, monkeypatch):
    """A first run stopped for time and a second that ran the seeds it left: the header names the first, not the whole."""
    import json

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from methods import load_raw

    miou = {(m, s): 40.0 + s for m in ("kd", "kd+london") for s in range(5)}
    first = raw_file(tmp_path / "a.json", [0, 1], miou)
    first.write_text(json.dumps({**json.loads(first.read_text()), "stopped": "stopped after seed 1"}))
    later, last = raw_file(tmp_path / "b.json", [2, 3], miou), raw_file(tmp_path / "c.json", [4], miou)
    assert load_raw([first])["stopped"] == "stopped after seed 1"
    merged = load_raw([first, later])
    assert merged["stopped"] == "invocation 1 stopped after seed 1" and len(merged["runs"]) == 8
    assert "stopped" not in load_raw([later, last])
