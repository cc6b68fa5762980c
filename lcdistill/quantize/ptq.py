"""int8 static quantization of an exported ONNX student (onnxruntime.quantization): post-training, or with the
scales a quantization-aware run learnt."""

from __future__ import annotations

import json
import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from torch.utils.data import Subset

from lcdistill import exporters
from lcdistill.checkpoint import atomic_write
from lcdistill.data import eval_loader
from lcdistill.defaults import CALIBRATION_IMAGES
from lcdistill.errors import UserError


def calibration_batches(task, data_dir: str | Path, meta: dict, images: int = CALIBRATION_IMAGES, batch_size: int = 32, seed: int = 0) -> list[np.ndarray]:
    """A seeded random sample of TRAINING images, prepared as at eval time and normalised:
    what the model will see in deployment, without touching the val images it is scored on."""
    train = task.scan(data_dir, check=False).train
    if not train.samples:
        raise UserError(f"{data_dir}/train holds no images to calibrate int8 with", "pass --data DIR with a train/ folder")
    pick = torch.randperm(len(train.samples), generator=torch.Generator().manual_seed(seed))[:images].tolist()
    dataset = Subset(task.eval_dataset(train, meta), pick)
    return [x.numpy() for b in eval_loader(dataset, batch_size, 0) for x in task.export.calls(task.inputs(task.batch(b), meta["mean"], meta["std"]))]


@contextmanager
def quiet_ort_logging():
    """onnxruntime.quantization logs advice on the root logger; keep the CLI's output our own."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize(fp32: Path, out: Path, batches: list[np.ndarray], source: str = "", overrides: dict | None = None, how: dict | None = None,
             weight_bits: int = 8, trained_weights: bool = False) -> Path:
    """Static int8 (QDQ) model of the fp32 ONNX file, calibrated on batches; same metadata plus
    a 'quantization' entry saying how it was made (how: entries added to it).

    trained_weights: the convolution weights lie on the grid a quantization-aware run trained them on; their
    scales are read off them (onnx_scales.weight_overrides) rather than worked out again.
    weight_bits 4: int4 weights per channel (onnxruntime's range, [-8, 7]; [-7, 7] from a quantization-aware run,
    fakequant.py says why; onnxruntime has no int4 convolution
    kernel: it dequantizes them and runs float convolutions between the uint8 activations' Q/DQ pairs). Their
    biases are int32 as int8's: a float bias would be rounded onto that grid anyway when onnxruntime loads the file
    (its WeightBiasQuantization optimizer), so the file says what runs.

    overrides: {tensor name: [{"scale", "zero_point"}]}, activation scales a quantization-aware run learnt
    (lcdistill.quantize.onnx_scales): onnxruntime takes them instead of its calibrated ones; the batches still
    name the tensors it quantizes, and any tensor without an override keeps its calibrated scale."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, name: str):
            self.feeds = iter({name: b} for b in batches)

        def get_next(self):
            return next(self.feeds, None)

    props = {p.key: p.value for p in onnx.load(str(fp32), load_external_data=False).metadata_props}
    model_input = exporters.onnx_session(fp32).get_inputs()[0]
    input_name = model_input.name
    # ORT's symbolic shape inference gives up on computed sizes of a dynamic height/width (segmentation)
    # and then dumps files into the working directory: skip it there, as its own error advises
    spatial_dynamic = any(not isinstance(d, int) for d in model_input.shape[2:])
    with tempfile.TemporaryDirectory(prefix="lcdistill-int8-") as tmp, quiet_ort_logging():
        pre, raw = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        # shape inference + ORT's graph optimisation (BatchNorm folded into Conv) first, so
        # the quantiser sees the graph ORT will run and places fewer, better Q/DQ pairs
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=spatial_dynamic)
        graph = onnx.load(str(pre), load_external_data=False).graph
        # the stem conv (3 input channels of normalised pixels) and the classifier stay float: on the
        # demo student int8 there cost 4 points of top-1 before reduce_range (below), 0.3 after
        keep_float = [n.name for n in graph.node if n.op_type == "Conv"][:1] + [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")][-1:]
        if trained_weights:
            from lcdistill.quantize.onnx_scales import weight_overrides

            overrides = {**(overrides or {}), **weight_overrides(graph, {n.name for n in graph.node} - set(keep_float), weight_bits)}
        quantize_static(
            str(pre), str(raw), Reader(input_name), quant_format=QuantFormat.QDQ, nodes_to_exclude=keep_float,
            # per-channel weights: after BN folding, depthwise filters differ in range by orders
            # of magnitude and one scale per tensor wipes most of them out (top-1 falls to chance)
            per_channel=True,
            # u8 activations x s8 weights is the pair ORT's x86/ARM int8 kernels are built for
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8 if weight_bits == 8 else QuantType.QInt4,
            # 7-bit weights: x86 CPUs without VNNI sum u8 x s8 pairs in int16 and saturate (the demo
            # student fell from 98.3% to 89.1% top-1 on such a CPU; with reduce_range 98.1%); int4 weights
            # never meet an integer kernel, and reduce_range would halve their 16 levels to 8
            reduce_range=weight_bits == 8,
            extra_options={
                # learnt scales as they are: onnxruntime would otherwise widen a weight's scale where the int32
                # bias needs it, and the trained weights would no longer lie on their grid
                **({"TensorQuantOverrides": overrides, "QDQDisableWeightAdjustForInt32Bias": True} if overrides else {}),
            },
        )
        proto = onnx.load(str(raw))
    weights = "int8 per-channel (7-bit range)" if weight_bits == 8 else f"int{weight_bits} per-channel"
    how = {"method": "static", "format": "QDQ", "weights": weights, "weight_bits": weight_bits, "activations": "uint8 per-tensor",
           "float_nodes": "first conv, last matmul",
           "calibration": "minmax", "calibration_images": int(sum(len(b) for b in batches)), "calibration_data": source, **(how or {})}
    exporters.set_metadata(proto, {**props, "onnx_opset": str(exporters.onnx_opset(proto)), "quantization": json.dumps(how)})
    onnx.checker.check_model(proto)
    atomic_write(out, lambda tmp: onnx.save_model(proto, tmp))
    return out


def int8_path(fp32: Path, weight_bits: int = 8) -> Path:
    """student.onnx -> student.int8.onnx (student.w4a8.onnx with int4 weights)"""
    return fp32.with_name(f"{fp32.stem}.{'int8' if weight_bits == 8 else f'w{weight_bits}a8'}{fp32.suffix}")
