"""int8 for a student: post-training, or trained in (quantization-aware).

ptq.py quantizes an exported fp32 ONNX file with onnxruntime (static, QDQ), calibrated on training images or
fed the scales a quantization-aware run learnt. For quantization-aware training: fakequant.py holds
onnxruntime's arithmetic in float, prepare.py puts it on a student (weights through parametrizations,
activations through forward hooks: module paths and every term's taps intact) and takes it off again
(bake), qat.py is what a run calls of it (the fine-tune's schedule, prepare, the header line, what the run
ships), onnx_scales.py carries the learnt activation scales into the int8 ONNX that ptq.py writes.
"""
