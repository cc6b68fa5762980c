"""The learnt activation scales of a quantization-aware run, carried into onnxruntime's quantizer.

The run's fake-quantized model is exported once with its activation quantizers in place: each becomes a
QuantizeLinear -> DequantizeLinear pair on exactly the tensor onnxruntime will quantize, named as the
exporter names it. harvest() reads each pair's (scale, zero point), keyed by that tensor's name, and
removes the pair: what is left is the plain float graph, which lcdistill.quantize.ptq quantizes with those
scales as TensorQuantOverrides instead of calibrating them."""

from __future__ import annotations

import numpy as np


def _constants(graph) -> dict:
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


SHAPE_ONLY = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose")


def harvest(proto) -> dict[str, dict]:
    """Remove each QuantizeLinear -> DequantizeLinear pair from proto (in place), its consumers reading the
    pair's input again; {input tensor name: {"scale", "zero_point"}} of the pairs removed."""
    graph = proto.graph
    values = _constants(graph)
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found: dict[str, dict] = {}
    rename: dict[str, str] = {}
    dead = []
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        users = consumers.get(q.output[0], [])
        if len(users) != 1 or users[0].op_type != "DequantizeLinear":
            continue
        dq = users[0]
        scale, zero = values.get(q.input[1]), values.get(q.input[2]) if len(q.input) > 2 else np.uint8(0)
        if scale is None or zero is None or np.size(scale) != 1:
            continue
        found[q.input[0]] = {"scale": float(np.asarray(scale).reshape(())), "zero_point": int(np.asarray(zero).reshape(()))}
        rename[dq.output[0]] = q.input[0]
        dead += [q, dq]
    for node in dead:
        graph.node.remove(node)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    for out in graph.output:  # a pair at the very end: the graph's output is its input again
        if out.name in rename:
            src = rename[out.name]
            for node in graph.node:
                for i, name in enumerate(node.output):
                    if name == src:
                        node.output[i] = out.name
            for node in graph.node:
                for i, name in enumerate(node.input):
                    if name == src:
                        node.input[i] = out.name
            found[out.name] = found.pop(src)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for init in [t for t in graph.initializer if t.name not in used]:  # the pairs' scale constants
        graph.initializer.remove(init)
    for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]:
        graph.node.remove(node)
    # onnxruntime quantizes the input of a shape-only op too (a pooling's output before the classifier's Flatten),
    # with the output's parameters: the scale learnt after the op holds before it
    for node in reversed(graph.node):
        if node.op_type in SHAPE_ONLY and node.output[0] in found and node.input[0] not in found:
            found[node.input[0]] = found[node.output[0]]
    return found


def overrides(scales: dict[str, dict]) -> dict[str, list[dict]]:
    """onnxruntime's TensorQuantOverrides for uint8 activations: {tensor: [{"scale", "zero_point"}]}."""
    return {name: [{"scale": np.array(q["scale"], dtype=np.float32), "zero_point": np.array(q["zero_point"], dtype=np.uint8)}] for name, q in scales.items()}


def executed_ops(path, feed: np.ndarray) -> dict[str, int]:
    """{op type: count} of the kernels onnxruntime ran for one input (its profiler's node events): how an
    int8 file is checked to run int8 kernels (QLinearConv, ...) rather than float ones around Q/DQ."""
    import json
    import os
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="lcdistill-prof-") as tmp:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "run")
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        session.run(None, {session.get_inputs()[0].name: feed})
        events = json.loads(open(session.end_profiling()).read())
    ops: dict[str, int] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name")
            if op:
                ops[op] = ops.get(op, 0) + 1
    return ops


def weight_overrides(graph, quantized_nodes: set[str], bits: int) -> dict[str, list[dict]]:
    """Per-channel TensorQuantOverrides for the convolution weights of a quantization-aware run, read off the
    weights themselves: each channel lies on its trained symmetric grid, k * s with k in [-qmax, qmax] and its
    max |w| at qmax exactly, so s = max |w| / qmax. onnxruntime would otherwise grid int4 weights on its own
    [-8, 7] (scale max |w| / 7.5), one the run never trained on (for int8's [-64, 64] both agree)."""
    from onnx import numpy_helper

    from lcdistill.quantize.fakequant import WEIGHT_RANGES

    qmax = WEIGHT_RANGES[bits][1]
    inits = {t.name: t for t in graph.initializer}
    out: dict[str, list[dict]] = {}
    for node in graph.node:
        if node.op_type != "Conv" or node.name not in quantized_nodes or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32).reshape(inits[node.input[1]].dims[0], -1)
        s = np.abs(w).max(1) / qmax
        s = np.where(s > 0, s, 1.0).astype(np.float32)
        out[node.input[1]] = [{"axis": 0, "scale": s[0], "zero_point": 0}] + [{"scale": v, "zero_point": 0} for v in s[1:]]
    return out
