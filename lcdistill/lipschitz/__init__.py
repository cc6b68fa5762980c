"""Lipschitz-constant estimates for LONDON distillation (Shang et al., ICCV 2021).

tm: what training uses, the transmitting-matrix spectral norms of consecutive stages and
the loss that compares them. norms and bounds: weight-only per-layer operator norms and
their product over a network, for reporting. The `lcdistill lipschitz` measurement, a command
that reads run folders and rebuilds their method, lives above the methods in lcdistill.lipschitz_report:
this package is the maths the london term imports.
"""

from lcdistill.lipschitz.bounds import network_upper_bound
from lcdistill.lipschitz.norms import conv_operator_norm, linear_operator_norm
from lcdistill.lipschitz.tm import default_pair_weights, lipschitz_loss, stage_sigmas, tm_spectral_norm

__all__ = [
    "tm_spectral_norm", "stage_sigmas", "default_pair_weights", "lipschitz_loss",
    "conv_operator_norm", "linear_operator_norm", "network_upper_bound",
]
