"""`lcdistill export`: ONNX and TorchScript files that match PyTorch and carry what a deployment needs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import EVAL, cli, cli_ok
from lcdistill import exporters, models
from lcdistill.data import ImageDataset, eval_loader, normalize, scan, transforms
from lcdistill.errors import UserError

TOLERANCE = 1e-3


@pytest.fixture(scope="session")
def exported(compress_run, tmp_path_factory):
    """`lcdistill export RUN --format all --out DIR` of the LONDON student; (run, out dir, CLI result)."""
    run = compress_run("london")
    out = tmp_path_factory.mktemp("export") / "files"
    result = cli_ok("export", run, "--format", "all", "--out", out)
    return run, out, result


def val_batch(run: Path, data: Path, n: int) -> torch.Tensor:
    """n normalised val images, prepared the way the run's student expects them."""
    meta = models.read_meta(run)
    _, val = scan(data, check=False)
    settings = {"scale": [0.08, 1.0], "ratio": [0.75, 1.33], "hflip": 0.0, "color_jitter": 0.0, "auto_augment": None}
    images = next(iter(eval_loader(ImageDataset(val, transforms(meta["input_size"][-1], meta, settings, False)), n, 0)))[0]
    return normalize(images, meta["mean"], meta["std"])


def test_export_writes_both_files_and_reports_parity(exported):
    run, out, result = exported
    assert result.exit_code == 0
    assert (out / "student.onnx").is_file() and (out / "student.pt").is_file()
    assert not (run / "student.onnx").exists(), "--out was not honoured"
    for fmt in ("onnx", "torchscript"):
        line = next(line for line in result.stdout.splitlines() if line.startswith(f"{fmt}:"))
        assert float(line.split("max |diff| vs PyTorch ")[1].split()[0]) <= TOLERANCE
    assert result.stderr.strip() == ""
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))


def test_onnx_is_valid_and_carries_metadata(exported):
    run, out, _ = exported
    proto = onnx.load(str(out / "student.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    props = {p.key: p.value for p in proto.metadata_props}
    meta = json.loads((run / "student.json").read_text())
    for key in ("classes", "mean", "std", "input_size"):
        assert json.loads(props[key]) == meta[key], key
    assert json.loads(props["arch"]) == meta["arch"]
    assert exporters.read_onnx_metadata(out / "student.onnx")["classes"] == [str(i) for i in range(10)]
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value, "batch dimension is not dynamic"


def test_torchscript_carries_metadata(exported):
    run, out, _ = exported
    meta = json.loads((run / "student.json").read_text())
    got = exporters.read_torchscript_metadata(out / "student.pt")
    for key in ("classes", "mean", "std", "input_size", "arch"):
        assert got[key] == meta[key], key


@pytest.mark.parametrize("batch", [1, 7])
def test_exported_files_match_pytorch(exported, small_data, batch):
    run, out, _ = exported
    model = models.load_run(run).model.eval()
    real = val_batch(run, small_data, batch)
    noise = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    session = exporters.onnx_session(out / "student.onnx")
    with exporters.quiet_jit():
        scripted = torch.jit.load(str(out / "student.pt")).eval()
    with torch.no_grad():
        for x in (real, noise):
            expected = model(x)
            assert expected.shape == (batch, 10)
            from_onnx = exporters.run_onnx(session, x)
            assert from_onnx.shape == expected.shape
            assert (from_onnx - expected).abs().max().item() <= TOLERANCE
            assert (scripted(x) - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("name", ["student.onnx", "student.pt"])
def test_eval_of_exported_files_matches_the_run(exported, small_data, name):
    run, out, _ = exported
    reference = cli_ok("eval", run, "--data", small_data, "--json", *EVAL, "--no-teacher")
    result = cli_ok("eval", out / name, "--data", small_data, "--json", *EVAL)
    ref, got = json.loads(reference.stdout)["student"], json.loads(result.stdout)
    assert set(got) == {"student"}  # an exported file knows no teacher
    got = got["student"]
    assert got["kind"] == ("onnx" if name.endswith(".onnx") else "torchscript")
    assert got["images"] == ref["images"]
    assert got["top1"] == pytest.approx(ref["top1"], abs=0.5)
    assert got["top5"] == pytest.approx(ref["top5"], abs=0.5)
    assert got["file_bytes"] == (out / name).stat().st_size


def test_export_single_format_and_safetensors_target(compress_run, tmp_path):
    run = compress_run("ce")
    result = cli_ok("export", run / "student.safetensors", "--format", "torchscript", "--out", tmp_path)
    assert (tmp_path / "student.pt").is_file() and not (tmp_path / "student.onnx").exists()
    assert "torchscript:" in result.stdout and "onnx:" not in result.stdout
    assert exporters.read_torchscript_metadata(tmp_path / "student.pt")["classes"] == [str(i) for i in range(10)]
    # the run's own val images were used for the parity check (run.json names the data)
    assert "val images from" in result.stdout


def test_export_unknown_format(compress_run, tmp_path):
    result = cli("export", compress_run("ce"), "--format", "tflite", "--out", tmp_path)
    assert result.exit_code == 2 and "tflite" in result.stderr
    assert not list(tmp_path.iterdir())


def test_metadata_round_trip():
    meta = {"classes": ["a", "b"], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "input_size": [3, 8, 8],
            "interpolation": "bicubic", "crop_pct": 0.9, "arch": {"source": "timm", "name": "x", "kwargs": {}}}
    props = exporters.metadata(meta)
    assert all(isinstance(v, str) for v in props.values())
    back = exporters.decode_metadata(props)
    for key, value in meta.items():
        assert back[key] == value
    assert back["num_classes"] == 2


def test_reading_metadata_from_foreign_files(tmp_path):
    # an ONNX model without lcdistill metadata
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), str(tmp_path / "plain.onnx"))
    with pytest.raises(UserError, match="no lcdistill metadata"):
        exporters.read_onnx_metadata(tmp_path / "plain.onnx")
    with exporters.quiet_jit(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(torch.nn.Identity()), str(tmp_path / "plain.pt"))
    with pytest.raises(UserError, match="no lcdistill metadata"):
        exporters.read_torchscript_metadata(tmp_path / "plain.pt")
    (tmp_path / "junk.onnx").write_bytes(np.arange(100, dtype=np.uint8).tobytes())
    with pytest.raises(UserError, match="not a readable ONNX"):
        exporters.read_onnx_metadata(tmp_path / "junk.onnx")


def test_parity_is_measured_relative_to_the_logits_scale():
    from lcdistill.exporters import scaled_diff

    reference = torch.tensor([[100.0, -3.0], [0.5, 2.0]])
    assert scaled_diff(reference + 0.01, reference) == pytest.approx(1e-4, rel=1e-3)  # 0.01 of a largest |logit| of 100
    small = torch.tensor([[0.2, -0.3]])
    assert scaled_diff(small + 0.01, small) == pytest.approx(0.01, rel=1e-3)  # below 1: absolute
    assert scaled_diff(reference[:1], reference) == float("inf")  # a wrong shape never passes
    broken = reference.clone()
    broken[0, 0] = float("nan")
    assert scaled_diff(broken, reference) == float("inf")  # nor a nan, which compares below every tolerance
