"""Reference implementations the tests check lcdistill.lipschitz against; the package does not use them.

* transmitting_matrix: the TM G formed explicitly (the FSP matrix), and spectral_norm_power:
  the same power iteration as lipschitz.tm.tm_spectral_norm on an explicit G.
* exact_spectral_norm: the largest singular value by SVD.
* conv_fft_norm: the exact norm of a stride-1 circular convolution (Sedghi et al. 2019).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lcdistill.lipschitz.norms import as_pair
from lcdistill.lipschitz.tm import _EPS, no_autocast


def transmitting_matrix(f_prev: Tensor, f_next: Tensor) -> Tensor:
    """Transmitting Matrix between two stage outputs, shape (B, C_prev, C_next).

    G = F_prev . F_next^T / (H * W) per sample (the FSP matrix of Yim et al.
    2017). The spatially larger map is average-pooled to the other's size
    first; in a CNN that is always f_prev, as in the authors' code. Computed
    in float32 (or float64 if given) even under autocast.
    """
    if f_prev.dim() != 4 or f_next.dim() != 4:
        raise ValueError(
            f"expected 4-d feature maps, got {tuple(f_prev.shape)} and {tuple(f_next.shape)}"
        )
    if f_prev.shape[0] != f_next.shape[0]:
        raise ValueError(f"batch sizes differ: {f_prev.shape[0]} vs {f_next.shape[0]}")
    with no_autocast(f_prev.device):
        a = f_prev if f_prev.dtype == torch.float64 else f_prev.float()
        b = f_next if f_next.dtype == torch.float64 else f_next.float()
        if a.dtype != b.dtype:
            a, b = a.double(), b.double()
        h = min(a.shape[-2], b.shape[-2])
        w = min(a.shape[-1], b.shape[-1])
        if a.shape[-2:] != (h, w):
            a = F.adaptive_avg_pool2d(a, (h, w))
        if b.shape[-2:] != (h, w):
            b = F.adaptive_avg_pool2d(b, (h, w))
        a = a.flatten(2)  # (B, C_prev, HW)
        b = b.flatten(2)  # (B, C_next, HW)
        return torch.bmm(a, b.transpose(1, 2)) / (h * w)


def spectral_norm_power(
    g: Tensor, iterations: int = 5, v0: Tensor | None = None, eps: float = _EPS
) -> Tensor:
    """Largest singular value of each matrix in g (B, m, n), shape (B,): the power iteration of
    lipschitz.tm.tm_spectral_norm on an explicit G, from ones or from v0 (shape (B, m) or (m,)).

    Forms K = G G^T when that is cheaper than two mat-vecs per step.
    """
    if g.dim() != 3:
        raise ValueError(f"expected a batch of matrices (B, m, n), got {tuple(g.shape)}")
    if iterations < 0:
        raise ValueError("iterations must be >= 0")
    with no_autocast(g.device):
        if g.dtype not in (torch.float32, torch.float64):
            g = g.float()
        bsz, m, n = g.shape
        if v0 is None:
            v = g.new_ones(bsz, m, 1)
        else:
            v0 = v0.to(device=g.device, dtype=g.dtype)
            if v0.shape == (m,):
                v = v0.expand(bsz, m).unsqueeze(-1)
            elif v0.shape == (bsz, m):
                v = v0.unsqueeze(-1)
            else:
                raise ValueError(f"v0 must have shape ({m},) or ({bsz}, {m}), got {tuple(v0.shape)}")
        gt = g.transpose(1, 2)
        # Cost of the loop: two mat-vecs (2mn each step) against forming K
        # once (m^2 n) and one m x m mat-vec per step. With few iterations
        # the mat-vec form wins unless m is tiny.
        form_k = m * m * n + iterations * m * m < iterations * 2 * m * n
        k = torch.bmm(g, gt) if form_k else None
        for _ in range(iterations):
            kv = torch.bmm(k, v) if form_k else torch.bmm(g, torch.bmm(gt, v))
            v = kv / kv.norm(dim=1, keepdim=True).clamp_min(eps)
        u = torch.bmm(gt, v)  # v^T K v = ||G^T v||^2, non-negative by construction
        rayleigh = u.pow(2).sum(dim=(1, 2)) / v.pow(2).sum(dim=(1, 2)).clamp_min(eps)
        return rayleigh.clamp_min(eps).sqrt()


def exact_spectral_norm(g: Tensor) -> Tensor:
    """Reference: exact largest singular value per matrix, shape (B,) (SVD based)."""
    with no_autocast(g.device):
        if g.dtype not in (torch.float32, torch.float64):
            g = g.float()
        return torch.linalg.matrix_norm(g, ord=2)


def conv_fft_norm(weight: Tensor, n, groups: int = 1) -> float:
    """Exact spectral norm of a stride-1 circularly padded conv on n x n inputs (Sedghi et al. 2019).

    The operator is block-diagonalised by the 2-d DFT: its singular values are
    those of the C_out x C_in matrices obtained by the FFT of the kernel,
    zero-padded to n x n, at each frequency. The padding amount and
    correlation-vs-convolution only change phases, not singular values.
    """
    hn, wn = as_pair(n)
    w = weight.detach().to(torch.float64)
    if w.shape[-2] > hn or w.shape[-1] > wn:
        raise ValueError("kernel larger than the input; the circular operator wraps more than once")
    if groups > 1:
        # Grouped conv = block-diagonal dense kernel.
        c_out, c_in_g = w.shape[:2]
        og = c_out // groups
        full = w.new_zeros(c_out, c_in_g * groups, *w.shape[-2:])
        for i in range(groups):
            full[i * og:(i + 1) * og, i * c_in_g:(i + 1) * c_in_g] = w[i * og:(i + 1) * og]
        w = full
    spectrum = torch.fft.fft2(w, s=(hn, wn))  # (C_out, C_in, hn, wn)
    per_freq = spectrum.permute(2, 3, 0, 1)
    return torch.linalg.svdvals(per_freq).max().item()
