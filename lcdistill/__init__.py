"""lcdistill: compress image classifiers with Lipschitz-continuity-guided knowledge distillation."""

__version__ = "0.1.0"
