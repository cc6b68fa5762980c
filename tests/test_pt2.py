"""`lcdistill export --format pt2`: a torch.export ExportedProgram with a dynamic batch, checked against
eager PyTorch on real images, measured by `lcdistill eval` (the CNN families: tests/test_export_families.py)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import EVAL, assert_user_error, cli, cli_ok
from lcdistill import artifacts, exporters, models
from lcdistill.errors import UserError
from test_export import TOLERANCE, val_batch
from test_export_families import CLASSES, SIZE


@pytest.fixture(scope="session")
def pt2_export(compress_run, tmp_path_factory):
    run = compress_run("ce")
    out = tmp_path_factory.mktemp("pt2") / "files"
    return run, out, cli_ok("export", run, "--format", "pt2", "--out", out)


def test_export_writes_pt2_and_reports_parity(pt2_export):
    run, out, result = pt2_export
    assert (out / "student.pt2").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["student.pt2"], "--format pt2 wrote other files"
    line = next(line for line in result.stdout.splitlines() if line.startswith("pt2:"))
    assert float(line.split("max |diff| vs PyTorch ")[1].split()[0]) <= TOLERANCE
    assert "val images from" in line
    assert result.stderr.strip() == ""


def test_pt2_has_a_dynamic_batch_and_matches_pytorch(pt2_export, small_data):
    run, out, _ = pt2_export
    program = torch.export.load(str(out / "student.pt2"))
    assert isinstance(program, torch.export.ExportedProgram)
    user_input = program.graph_signature.user_inputs[0]
    placeholder = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == user_input)
    batch = placeholder.meta["val"].shape[0]
    assert isinstance(batch, torch.SymInt), f"batch dimension is static: {batch}"
    module = program.module()
    model = models.load_run(run).model.eval()
    with torch.no_grad():
        for n in (1, 7):
            x = val_batch(run, small_data, n)
            expected = model(x)
            got = module(x)
            assert got.shape == expected.shape == (n, 10)
            assert (got - expected).abs().max().item() <= TOLERANCE


def test_pt2_carries_metadata(pt2_export):
    run, out, _ = pt2_export
    meta = json.loads((run / "student.json").read_text())
    got = exporters.read_pt2_metadata(out / "student.pt2")
    for key in ("classes", "mean", "std", "input_size", "arch", "task"):
        assert got[key] == meta[key], key
    assert artifacts.kind_of(out / "student.pt2") == "pt2"


def test_eval_measures_pt2_like_the_run(pt2_export, small_data):
    run, out, _ = pt2_export
    ref = json.loads(cli_ok("eval", run, "--data", small_data, "--json", *EVAL, "--no-teacher").stdout)["student"]
    got = json.loads(cli_ok("eval", out / "student.pt2", "--data", small_data, "--json", *EVAL).stdout)["student"]
    assert got["kind"] == "pt2"
    assert got["images"] == ref["images"]
    assert got["top1"] == pytest.approx(ref["top1"], abs=0.5)
    assert got["latency_ms_b1"] > 0 and got["file_bytes"] == (out / "student.pt2").stat().st_size
    # beside the run: `eval RUN --exports DIR` measures the pt2 file with the others
    beside = json.loads(cli_ok("eval", run, "--data", small_data, "--json", *EVAL, "--no-teacher", "--exports", out).stdout)
    assert beside["pt2"]["kind"] == "pt2"


def artifacts_task():
    from lcdistill import tasks

    return tasks.get("classification")


class DataDependent(nn.Module):
    """A forward torch.export cannot trace: Python control flow on a tensor's value."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 10)

    def forward(self, x):
        pooled = x.mean((2, 3))
        if pooled.sum() > 0:
            return self.fc(pooled)
        return self.fc(-pooled)


def test_a_family_that_does_not_export_is_named(tmp_path):
    meta = {"classes": CLASSES, "mean": [0.5] * 3, "std": [0.5] * 3, "input_size": SIZE, "arch": {"source": "timm", "name": "oddnet_7", "kwargs": {}}}
    with pytest.raises(UserError) as caught:
        exporters.to_pt2(DataDependent().eval(), meta, tmp_path / "m.pt2", artifacts_task().export)
    line = caught.value.line()
    assert "timm:oddnet_7" in line and "torchscript" in line and "\n" not in line
    assert not list(tmp_path.iterdir()), "a failed export left a file behind"


def test_pt2_refuses_a_wrong_shape(pt2_export):
    _, out, _ = pt2_export
    with pytest.raises(UserError, match="32"):
        artifacts.identify(out / "student.pt2").predict(torch.randn(1, 3, 16, 16))


def test_unknown_format_names_pt2_and_hub(compress_run, tmp_path):
    line = assert_user_error(cli("export", compress_run("ce"), "--format", "tflite", "--out", tmp_path), "tflite")
    assert "pt2" in line and "hub" in line
