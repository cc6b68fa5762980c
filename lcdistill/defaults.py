"""Defaults the CLI shows in --help and the modules use, kept here so reading them imports no torch."""

OPSET = 18  # supported by onnxruntime >= 1.16 and by both of torch's ONNX exporters
CALIBRATION_IMAGES = 300  # training images that calibrate an int8 ONNX file
