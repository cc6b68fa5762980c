"""Multi-process training under torchrun (gloo, CPU): one run folder, identical ranks, whole validation."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import subprocess_env
from lcdistill.data import eval_loader
from lcdistill.distributed import replica_check

pytestmark = pytest.mark.slow
TINY = ["--epochs", "1", "--input-size", "32", "--batch-size", "16", "--workers", "0", "--set", "data.crop_pct=1.0"]


def torchrun(*args, cwd: Path, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N -m lcdistill ARGS`, with this interpreter's torch."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "lcdistill", *map(str, args)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=subprocess_env())


def test_torchrun_two_processes_train_as_one(teacher_run, small_data, tmp_path):
    # No --out: both ranks must agree on rank 0's time-stamped folder name.
    proc = torchrun("compress", "--teacher", teacher_run, "--student", "mobilenetv2_050", "--data", small_data.resolve(),
                    "--method", "london", *TINY, cwd=tmp_path)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs
    run = runs[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"], "a rank wrote outside the run folder"
    assert {"recipe.yaml", "run.json", "summary.csv", "metrics.jsonl", "student.json", "student.safetensors"} <= {p.name for p in run.iterdir()}
    assert not list(run.rglob("*.tmp"))

    meta = json.loads((run / "student.json").read_text())
    assert meta["ddp"]["world"] == 2 and meta["ddp"]["ranks_identical"] is True, meta["ddp"]
    rows = list(csv.DictReader(open(run / "summary.csv")))
    assert len(rows) == 1  # rank 0 alone wrote
    assert int(rows[0]["val_images"]) == 10 * 6, "the sharded validation missed or repeated images"
    epoch_ends = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "epoch_end" in r]
    assert len(epoch_ends) == 1
    # the global batch of 16 is split 8 + 8: 200 images / 16 = 12 optimizer steps, not 25
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "step" in r and "epoch_end" not in r]
    assert max(steps) == 200 // 16


def test_sync_bn_on_cpu_is_a_user_error(teacher_run, small_data, tmp_path):
    proc = torchrun("compress", "--teacher", teacher_run, "--student", "mobilenetv2_050", "--data", small_data.resolve(),
                    "--method", "kd", *TINY, "--set", "train.sync_bn=true", "--out", tmp_path / "run", cwd=tmp_path)
    assert proc.returncode != 0
    assert "error: train.sync_bn needs CUDA" in proc.stderr
    assert "Traceback" not in proc.stderr.split("error: train.sync_bn")[0]
    assert not (tmp_path / "run").exists()


def test_eval_shards_cover_every_image_once():
    dataset = list(range(61))
    seen = []
    for rank in range(3):
        for batch in eval_loader(dataset, 8, 0, world=3, rank=rank):
            seen += batch.tolist()
    assert sorted(seen) == dataset


def _replicas(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    same = replica_check([model, None], world)
    if rank == 1:
        model[1].running_mean += 1e-6  # a BN buffer that drifted on one rank
    drifted = replica_check([model], world)
    if rank == 0:
        Path(out).write_text(json.dumps({"same": same, "drifted": drifted}))
    dist.destroy_process_group()


def test_replica_check_sees_one_drifted_buffer(tmp_path):
    out = tmp_path / "result.json"
    mp.spawn(_replicas, args=(2, f"file://{tmp_path / 'rendezvous'}", str(out)), nprocs=2)
    result = json.loads(out.read_text())
    assert result["same"]["ranks_identical"] is True and result["same"]["world"] == 2
    assert result["drifted"]["ranks_identical"] is False
    assert len(set(result["drifted"]["rank_sha256"])) == 2
    assert replica_check([nn.Linear(2, 2)], 1) is None
