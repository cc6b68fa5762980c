"""Export a student to ONNX and TorchScript, with metadata, and prove the files match PyTorch."""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lcdistill.checkpoint import atomic_write
from lcdistill.errors import UserError

OPSET = 18  # supported by onnxruntime >= 1.16 and by both of torch's ONNX exporters


def onnx_opset(proto) -> int:
    """The default-domain opset a model really uses (the exporter may differ from what was asked)."""
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def metadata(meta: dict) -> dict[str, str]:
    """What a deployment needs to feed the model and read its output, as string pairs."""
    from lcdistill import __version__

    return {
        "classes": json.dumps(meta["classes"]),
        "mean": json.dumps(meta["mean"]),
        "std": json.dumps(meta["std"]),
        "input_size": json.dumps(meta["input_size"]),
        "interpolation": meta.get("interpolation", "bilinear"),
        "crop_pct": json.dumps(meta.get("crop_pct", 0.875)),
        "arch": json.dumps(meta["arch"]),
        "lcdistill_version": __version__,
    }


@contextmanager
def quiet_jit():
    """torch.jit.save/load warn on every call that they are deprecated: keep stderr to our own lines."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        yield


def to_onnx(model: nn.Module, meta: dict, path: Path, opset: int = OPSET) -> Path:
    """ONNX with a dynamic batch dimension and the metadata above, checked by onnx.checker."""
    import onnx

    model = model.eval()
    example = torch.randn(2, *meta["input_size"])
    batch = torch.export.Dim("batch", min=1, max=4096)

    def write(tmp: str) -> None:
        with warnings.catch_warnings(), open(os.devnull, "w") as quiet:
            warnings.simplefilter("ignore")
            # the exporter reports its progress on stdout; keep our own output clean
            saved = os.dup(1)
            os.dup2(quiet.fileno(), 1)
            try:
                program = torch.onnx.export(
                    model, (example,), dynamo=True, opset_version=opset, input_names=["input"], output_names=["logits"],
                    dynamic_shapes=({0: batch},), external_data=False,
                )
            finally:
                os.dup2(saved, 1)
                os.close(saved)
        proto = program.model_proto
        set_metadata(proto, {**metadata(meta), "onnx_opset": str(onnx_opset(proto))})
        onnx.checker.check_model(proto, full_check=True)
        onnx.save_model(proto, tmp)

    atomic_write(path, write)
    return path


def set_metadata(proto, props: dict[str, str]) -> None:
    """Replace the model's metadata_props with props."""
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def to_torchscript(model: nn.Module, meta: dict, path: Path) -> Path:
    """A traced TorchScript module; metadata rides along as an extra file."""
    model = model.eval()
    example = torch.randn(2, *meta["input_size"])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
    extra = {"lcdistill.json": json.dumps(metadata(meta))}
    with quiet_jit():
        atomic_write(path, lambda tmp: torch.jit.save(traced, tmp, _extra_files=extra))
    return path


def onnx_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # ONNX Runtime ignores OMP_NUM_THREADS and takes every core; give it PyTorch's thread
    # count so latencies of the two are measured on equal terms.
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, batch: torch.Tensor) -> torch.Tensor:
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: batch.cpu().numpy().astype(np.float32)})[0])


def parity(model: nn.Module, files: dict[str, Path], batch: torch.Tensor) -> dict[str, float]:
    """Max |exported - PyTorch| over the batch and over its first image alone (batch 1)."""
    model = model.eval()
    result = {}
    with torch.no_grad():
        for fmt, path in files.items():
            if fmt == "onnx":
                session = onnx_session(path)
                predict = lambda x: run_onnx(session, x)  # noqa: E731
            else:
                with quiet_jit():
                    scripted = torch.jit.load(str(path))
                predict = lambda x: scripted(x)  # noqa: E731
            diff = 0.0
            for x in (batch, batch[:1]):
                diff = max(diff, (predict(x) - model(x)).abs().max().item())
            result[fmt] = diff
    return result


def read_onnx_metadata(path: Path) -> dict:
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise UserError(f"{path} is not a readable ONNX file ({type(e).__name__})", "pass a file written by `lcdistill export`") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if "classes" not in props:
        raise UserError(f"{path} carries no lcdistill metadata", "export it with `lcdistill export`")
    return decode_metadata(props)


def read_torchscript_metadata(path: Path) -> dict:
    extra = {"lcdistill.json": ""}
    try:
        with quiet_jit():
            torch.jit.load(str(path), _extra_files=extra)
    except Exception as e:
        raise UserError(f"{path} is not a readable TorchScript file ({type(e).__name__})", "pass a file written by `lcdistill export`") from None
    if not extra["lcdistill.json"]:
        raise UserError(f"{path} carries no lcdistill metadata", "export it with `lcdistill export`")
    return decode_metadata(json.loads(extra["lcdistill.json"]))


def decode_metadata(props: dict[str, str]) -> dict:
    out = {k: json.loads(props[k]) for k in ("classes", "mean", "std", "input_size", "crop_pct", "arch")}
    out["interpolation"] = props.get("interpolation", "bilinear")
    out["lcdistill_version"] = props.get("lcdistill_version")
    if "onnx_opset" in props:
        out["onnx_opset"] = int(props["onnx_opset"])
    if "quantization" in props:  # what lcdistill.quantize did to the fp32 file
        out["quantization"] = json.loads(props["quantization"])
    out["num_classes"] = len(out["classes"])
    return out
