"""Quantization-aware training: the student trained as onnxruntime's int8 will run it.

fakequant.py holds the arithmetic (onnxruntime's own formulas), prepare.py puts it on a student (weights
through parametrizations, activations through forward pre-hooks: module paths and every term's taps
intact) and takes it off again (bake), onnx_scales.py carries the learnt activation scales into the
int8 ONNX that lcdistill.quantize writes.
"""
