"""Export a student to ONNX, TorchScript and torch.export (.pt2), with metadata, and prove the files match PyTorch."""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from lcdistill import hubfolder, tasks
from lcdistill.checkpoint import atomic_write
from lcdistill.defaults import OPSET
from lcdistill import __version__
from lcdistill.errors import UserError
from lcdistill.tasks import ExportSpec, scaled_diff


def onnx_opset(proto) -> int:
    """The default-domain opset a model really uses (the exporter may differ from what was asked)."""
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def metadata(meta: dict) -> dict[str, str]:
    """What a deployment needs to feed the model and read its output, as string pairs."""
    return {
        "task": tasks.of_meta(meta).name,
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


def to_onnx(model: nn.Module, meta: dict, path: Path, spec: ExportSpec | None = None, opset: int = OPSET) -> Path:
    """ONNX with the task's names and dynamic axes (batch at least; spec defaults to the task meta
    names) and the metadata above, checked by onnx.checker."""
    import onnx

    spec = spec or tasks.of_meta(meta).export
    model = model.eval()
    example = spec.example(meta, 2 if 0 in spec.dynamic_axes else 1)  # batch 2 shows a dynamic batch to the tracer
    dims = {axis: torch.export.Dim(name, min=1 if axis == 0 else 16, max=4096) for axis, name in spec.dynamic_axes.items()}

    def write(tmp: str) -> None:
        with warnings.catch_warnings(), open(os.devnull, "w") as quiet:
            warnings.simplefilter("ignore")
            # the exporter reports its progress on stdout; keep our own output clean
            saved = os.dup(1)
            os.dup2(quiet.fileno(), 1)
            try:
                if spec.legacy_onnx:  # torch.export cannot trace NMS and data-dependent box counts: the TorchScript-based exporter
                    axes = {spec.input_names[0]: dict(spec.dynamic_axes)}
                    torch.onnx.export(model, (example,), tmp, dynamo=False, opset_version=opset, input_names=spec.input_names,
                                      output_names=spec.output_names, dynamic_axes=axes)
                    proto = onnx.load(tmp)
                else:
                    proto = torch.onnx.export(
                        model, (example,), dynamo=True, opset_version=opset, input_names=spec.input_names, output_names=spec.output_names,
                        dynamic_shapes=(dims,), external_data=False,
                    ).model_proto
            finally:
                os.dup2(saved, 1)
                os.close(saved)
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
    spec = tasks.of_meta(meta).export
    example = spec.example(meta, 2 if 0 in spec.dynamic_axes else 1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
    extra = {"lcdistill.json": json.dumps(metadata(meta))}
    with quiet_jit():
        atomic_write(path, lambda tmp: torch.jit.save(traced, tmp, _extra_files=extra))
    return path


PT2_META = "lcdistill.json"  # the metadata's name among a .pt2 file's extra files


def to_pt2(model: nn.Module, meta: dict, path: Path, spec: ExportSpec | None = None) -> Path:
    """A torch.export ExportedProgram with the task's dynamic axes (batch at least, torch.export.Dim), saved by
    torch.export.save with the metadata above as an extra file. A model torch.export cannot trace: one line
    naming its family."""
    spec = spec or tasks.of_meta(meta).export
    if spec.pt2:
        raise UserError(f"{spec.pt2}: no .pt2 file", "export it with --format onnx or torchscript instead")
    model = model.eval()
    example = spec.example(meta, 2 if 0 in spec.dynamic_axes else 1)
    # free sizes first; an encoder-decoder whose skips need sides divisible by its stride gets multiples of 32
    strides = (None, 32) if set(spec.dynamic_axes) - {0} and all(int(v) % 32 == 0 for v in meta["input_size"][1:]) else (None,)
    first_error = None
    for stride in strides:
        dims = {axis: torch.export.Dim(name, min=1, max=4096) if axis == 0 else
                (torch.export.Dim(name, min=16, max=4096) if stride is None else stride * torch.export.Dim(f"{name}_x{stride}", min=1, max=4096 // stride))
                for axis, name in spec.dynamic_axes.items()}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.export.export(model, (example,), dynamic_shapes=(dims,))
            break
        except Exception as e:  # torch.export's own errors share no public base class
            first_error = first_error or e
    else:
        e = first_error
        arch = meta.get("arch") or {}
        family = f"{arch.get('source', '?')}:{arch.get('name', type(model).__name__)}"
        first = (str(e).strip().splitlines() or [""])[0][:140]
        raise UserError(f"torch.export cannot export {family} ({type(e).__name__}: {first})",
                        "export it with --format torchscript (traced, no torch.export) instead") from None
    extra = {PT2_META: json.dumps(metadata(meta))}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: torch.export logs a warning for a path not ending in .pt2
            torch.export.save(program, f, extra_files=extra)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        atomic_write(path, write)
    return path


def load_pt2(path: Path) -> nn.Module:
    """The callable module of a .pt2 file (eval mode is baked in at export; .eval() is not supported on it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.load(str(path)).module()


def read_pt2_metadata(path: Path) -> dict:
    extra = {PT2_META: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.export.load(str(path), extra_files=extra)
    except Exception as e:
        raise UserError(f"{path} is not a readable torch.export (.pt2) file ({type(e).__name__})", "pass a file written by `lcdistill export`") from None
    if not extra[PT2_META]:
        raise UserError(f"{path} carries no lcdistill metadata", "export it with `lcdistill export --format pt2`")
    return decode_metadata(json.loads(extra[PT2_META]))


def runner(fmt: str, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """A normalised batch -> the exported output, for one written format (onnx, torchscript, pt2, hub)."""
    if fmt.startswith("onnx"):
        session = onnx_session(path)
        return lambda x: (lambda outs: outs[0] if len(outs) == 1 else tuple(outs))(run_onnx_all(session, x))
    if fmt == "pt2":
        return load_pt2(path)
    if fmt == "hub":  # the folder built the way its card says (timm, torchvision or lcdistill)
        return hubfolder.load(path)
    with quiet_jit():
        return torch.jit.load(str(path))


def onnx_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # ONNX Runtime ignores OMP_NUM_THREADS and takes every core; give it PyTorch's thread
    # count so latencies of the two are measured on equal terms.
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx_all(session, batch: torch.Tensor) -> list[torch.Tensor]:
    """Every output of the session on one input batch."""
    name = session.get_inputs()[0].name
    return [torch.from_numpy(o) for o in session.run(None, {name: batch.cpu().numpy().astype(np.float32)})]


def run_onnx(session, batch: torch.Tensor) -> torch.Tensor:
    return run_onnx_all(session, batch)[0]


def parity(model: nn.Module, files: dict[str, Path], batch: torch.Tensor, spec: ExportSpec) -> dict[str, float]:
    """spec.compare of exported vs PyTorch over the batch and over its first image alone (batch 1)."""
    model = model.eval()
    result = {}
    with torch.no_grad():
        for fmt, path in files.items():
            predict = runner(fmt, path)
            result[fmt] = max(spec.compare(predict(x), model(x)) for x in spec.parity_inputs(batch))
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
    out["task"] = props.get("task") or tasks.LEGACY
    out["interpolation"] = props.get("interpolation", "bilinear")
    out["lcdistill_version"] = props.get("lcdistill_version")
    if "onnx_opset" in props:
        out["onnx_opset"] = int(props["onnx_opset"])
    if "quantization" in props:  # what lcdistill.quantize did to the fp32 file
        out["quantization"] = json.loads(props["quantization"])
    out["num_classes"] = len(out["classes"])
    return out
