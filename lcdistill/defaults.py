"""Defaults the CLI shows in --help and the modules use, kept here so reading them imports no torch."""

OPSET = 18  # supported by onnxruntime >= 1.16 and by both of torch's ONNX exporters
CALIBRATION_IMAGES = 300  # training images that calibrate an int8 ONNX file
# `lcdistill eval --robustness`, in [0, 1] pixel units (before each model's mean/std).
# Gaussian noise sigmas span the Gaussian-noise severities of CIFAR-10-C (0.04-0.10) and ImageNet-C (0.08-0.38);
# FGSM epsilons 1/255 to 4/255, the L-inf budget of ImageNet robustness benchmarks (RobustBench: 4/255).
NOISE_SIGMAS = (0.05, 0.1, 0.2)
FGSM_EPSILONS = (1 / 255, 2 / 255, 4 / 255)
ROBUSTNESS_SEED = 0
