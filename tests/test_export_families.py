"""Export holds across architectures: one member of each CNN family, random weights, through
lcdistill.exporters.to_onnx / to_torchscript / to_pt2, checked against PyTorch at batch 1 and batch 7.

The ONNX (dynamo) export dominates the time: roughly 3-15 s of CPU per model, so the list is
one small member per family rather than every size (timm's MobileNetV3 is left out: torchvision's
stands for it, and timm's shares its block code with mobilenetv2 and efficientnet)."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from lcdistill import exporters, models

FAMILIES = [
    ("timm", "resnet18"),
    ("timm", "mobilenetv2_050"),
    ("timm", "efficientnet_b0"),
    ("timm", "regnetx_002"),
    ("timm", "convnext_atto"),
    ("timm", "ghostnet_050"),
    ("timm", "densenet121"),
    ("tv", "mobilenet_v3_small"),
]
CLASSES = [str(i) for i in range(10)]
SIZE = [3, 32, 32]


def unit_logits(model: nn.Module) -> None:
    """Scale the (deliberately tiny) fresh head so logits have std ~1: a tolerance then means
    the same thing for every family, instead of comparing numbers near 1e-9."""
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        std = model(torch.randn(8, *SIZE, generator=torch.Generator().manual_seed(1))).std()
        head.weight /= std


def assert_close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert got.shape == expected.shape, what
    # float32 through 20-120 layers with other kernels: ~1e-6 relative in practice
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("source,name", FAMILIES, ids=[f"{s}:{n}" for s, n in FAMILIES])
def test_family_exports_match_pytorch(source, name, tmp_path):
    torch.manual_seed(0)
    arch = {"source": source, "name": name, "kwargs": {}}
    model = models.build(arch, len(CLASSES)).eval()
    unit_logits(model)
    loaded = models.Loaded(model, arch, len(CLASSES), models.data_config(model), name, arch)
    meta = models.model_meta(loaded, CLASSES, SIZE)

    onnx_file = exporters.to_onnx(model, meta, tmp_path / "m.onnx")
    ts_file = exporters.to_torchscript(model, meta, tmp_path / "m.pt")
    pt2_file = exporters.to_pt2(model, meta, tmp_path / "m.pt2")  # torch.export: every family here traces
    assert exporters.read_pt2_metadata(pt2_file)["arch"] == arch
    program = exporters.load_pt2(pt2_file)

    proto = onnx.load(str(onnx_file))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param, "batch dimension is not dynamic"
    got_meta = exporters.read_onnx_metadata(onnx_file)
    assert got_meta["arch"] == arch and got_meta["classes"] == CLASSES
    assert got_meta["onnx_opset"] == exporters.onnx_opset(proto) == exporters.OPSET
    assert exporters.read_torchscript_metadata(ts_file)["arch"] == arch

    session = exporters.onnx_session(onnx_file)
    with exporters.quiet_jit():
        scripted = torch.jit.load(str(ts_file)).eval()
    with torch.no_grad():
        for batch in (1, 7):
            x = torch.randn(batch, *SIZE, generator=torch.Generator().manual_seed(batch))
            expected = model(x)
            assert expected.shape == (batch, len(CLASSES))
            assert_close(exporters.run_onnx(session, x), expected, f"{name} onnx batch {batch}")
            assert_close(scripted(x), expected, f"{name} torchscript batch {batch}")
            assert_close(program(x), expected, f"{name} pt2 batch {batch}")
