"""The int8 ONNX file `export --quantize int8` writes beside a student's fp32 file: post-training (calibrated on
train images, ptq.py), or from what a quantization-aware run learnt (its weights on their grid, its activation scales
carried over by onnx_scales.py). int8 is judged by agreement with PyTorch, not by a tolerance; each function returns
the lines that say what it wrote and how it agrees."""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from pathlib import Path

import onnx
import torch

from lcdistill import artifacts, exporters
from lcdistill.data import eval_loader
from lcdistill.quantize import onnx_scales, ptq as quant
from lcdistill.quantize.prepare import attach


def agreement(task, run, reference, batches) -> tuple[int, int]:
    """(agreeing, total) of run's predictions against reference's on each image of the batches."""
    agree = total = 0
    with torch.no_grad():
        for batch in batches:
            for x in task.export.calls(batch):
                a, t = task.export.agreement(run(x), reference(x))
                agree, total = agree + a, total + t
    return agree, total


def _mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def post_training(model, task, meta: dict, fp32: Path, data_dir: str, images: int, batch, source: str, weight_bits: int) -> list[str]:
    """student.int8.onnx (student.w4a8.onnx) beside the fp32 file, calibrated on `images` train images."""
    batches = quant.calibration_batches(task, data_dir, meta, images)
    int8 = quant.quantize(fp32, quant.int8_path(fp32, weight_bits), batches, str(Path(data_dir).resolve()), weight_bits=weight_bits)
    agree, total = agreement(task, exporters.runner("onnx", int8), model.eval(), [batch])
    return [f"int8: {int8}  {_mb(int8):.2f} MB (fp32 {_mb(fp32):.2f} MB), calibrated on {sum(len(b) for b in batches)} train images;"
            f" {task.export.agreement_text} {counted(task, agree, total)} {source}; measure accuracy with `lcdistill eval`"]


def counted(task, agree: int, total: int) -> str:
    """'7 of' where agreement counts the images themselves (the source names how many), else '40/42 detections of'."""
    return f"{agree} of" if task.export.unit == "images" else f"{agree}/{total} {task.export.unit} of"


def from_qat(loaded, task, meta: dict, fp32: Path, data_dir: str, images: int, opset: int, batch) -> list[str]:
    """The int8 ONNX of a quantization-aware run, from what it learnt: its weights lie on their int8 grid
    already, and its activation scales go to onnxruntime as overrides (onnx_scales); judged by agreement
    with the fake-quantized PyTorch model on the whole val split, and by the kernels onnxruntime runs."""
    qat = meta["qat"]
    # exported with its activation quantizers only (onnxruntime rounds the int32 biases itself); judged against the
    # model that rounds them as onnxruntime does
    reference = task.exportable(attach(copy.deepcopy(loaded.model), qat["activations"])).eval()
    attached = attach(copy.deepcopy(loaded.model), qat["activations"], qat.get("bias"), qat.get("weight_bits", 8)).eval()
    batches = quant.calibration_batches(task, data_dir, meta, images)
    with tempfile.TemporaryDirectory(prefix="lcdistill-qat-") as tmp:
        # torch.export cannot take fake quantization with a dynamic batch (its cachemask variant has no symbolic
        # shapes), so this file comes from torch.onnx's TorchScript-based exporter, which writes each quantizer
        # as a QuantizeLinear/DequantizeLinear pair; the int8 file is made from this graph itself, so every
        # harvested tensor name is one its quantizer sees
        with torch.no_grad():
            marked = exporters.to_onnx(reference, meta, Path(tmp) / "marked.onnx", dataclasses.replace(task.export, legacy_onnx=True), opset)
        proto = onnx.load(str(marked))
        scales = onnx_scales.harvest(proto)
        plain = Path(tmp) / "plain.onnx"
        onnx.save_model(proto, str(plain))
        bits = qat.get("weight_bits", 8)
        int8 = quant.quantize(plain, quant.int8_path(fp32, bits), batches, str(Path(data_dir).resolve()), overrides=onnx_scales.overrides(scales),
                              how={"method": "quantization-aware", "activation_scales": f"{len(scales)} learnt in training, the rest calibrated"},
                              weight_bits=bits, trained_weights=True)
    graph = onnx.load(str(int8), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    quantized = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in weights}
    learnt = len(quantized & set(scales))
    val = task.scan(data_dir, check=False).val
    agree, total, got, want = side_by_side(task, meta, int8, attached, val)
    ops = onnx_scales.executed_ops(int8, task.export.calls(batch[:1])[0].numpy())
    integer = {k: v for k, v in ops.items() if k.startswith("QLinear") or "Integer" in k}
    floating = {k: v for k, v in ops.items() if k in ("Conv", "Gemm", "MatMul")}
    metric = task.metric(len(meta["classes"]))
    dequantized = ops.get("DequantizeLinear", 0)
    return [
        f"int8: {int8}  {_mb(int8):.2f} MB (fp32 {_mb(fp32):.2f} MB), quantization-aware: weights as trained, {learnt} of the "
        f"{len(quantized)} activation scales learnt in training, the rest calibrated on {sum(len(b) for b in batches)} train images;"
        f" {task.export.agreement_text} {counted(task, agree, total)} the {len(val.samples)} val images against the fake-quantized PyTorch model",
        f"int8: {metric.best_header} on val {got[metric.best]:.2f}, the fake-quantized PyTorch model {want[metric.best]:.2f} "
        f"(difference {got[metric.best] - want[metric.best]:+.2f})",
        "int8: onnxruntime ran " + (", ".join(f"{k} x{v}" for k, v in sorted(integer.items())) or "no integer kernel")
        + (" and in float " + ", ".join(f"{k} x{v}" for k, v in sorted(floating.items())) if floating else "")
        + (f" (int{bits} weights: {dequantized} DequantizeLinear feed float convolutions)" if bits != 8 else ""),
    ]


def side_by_side(task, meta: dict, int8: Path, reference, val) -> tuple[int, int, dict, dict]:
    """(agreeing, total, the int8 file's metric, the reference PyTorch model's) over the val split, streamed."""
    got_run, want_run = artifacts.Artifact(int8, "onnx").predict, task.predictor(reference)
    got, want = task.metric(len(meta["classes"])), task.metric(len(meta["classes"]))
    agree = total = 0
    with torch.no_grad():
        for item in eval_loader(task.eval_dataset(val, meta), 64, 0):
            batch = task.batch(item)
            x = task.inputs(batch, meta["mean"], meta["std"])
            a, b = got_run(x), want_run(x)
            got.update(a, batch.targets), want.update(b, batch.targets)
            k, n = task.export.agreement(a, b)
            agree, total = agree + k, total + n
    return agree, total, got.compute(), want.compute()
