"""The Lipschitz term of LONDON distillation (Shang et al., ICCV 2021): what training computes.

For two consecutive stage maps F_prev (B, m, H, W) and F_next (B, n, H', W'), the
Transmitting Matrix (TM) is G = F_prev . F_next^T / (h * w) per sample (the FSP matrix
of Yim et al. 2017), after average-pooling the spatially larger map to the other's
size (in a CNN always f_prev, as in the authors' code). Its spectral norm, by power
iteration from a ones start, estimates the Lipschitz constant of the block between
the stages; the loss compares student and teacher norms.

Everything is computed in float32 even under autocast, is differentiable, and is a
pure function of its arguments; no training state is kept.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_EPS = 1e-12

_DISTANCES = ("mse", "log_mse", "relative")

# Power-iteration steps. From a ones start, 5 (the authors' ImageNet setting) is exact on
# non-negative maps but low on signed ones such as connector outputs: 3.2% on average (9.8%
# at the 90th percentile) on Gaussian maps, 1.1% (3.5%) on connected digits features; 20 is
# within 0.22% (0.75%) and 0.01% (0.00%). Each step is four thin products: cheap next to
# the stage convolutions.
ITERATIONS = 20


def no_autocast(device: torch.device):
    # Casting inputs to float32 is not enough on CUDA: autocast would still run
    # bmm in half precision, and the TM entries (sums over H*W products) and
    # the power iteration lose too many digits there.
    return torch.autocast(device_type=device.type, enabled=False)


def tm_spectral_norm(f_prev: Tensor, f_next: Tensor, iterations: int = ITERATIONS, scale_free: bool = False,
                     eps: float = _EPS) -> Tensor:
    """Largest singular value of the TM of f_prev and f_next, without forming the TM, shape (B,).

    Power iteration on K = G G^T from ones: v <- K v / ||K v||, then sigma =
    sqrt(v^T K v / v^T v) computed as ||G^T v|| / ||v||. G = A B^T / hw with
    A = F_prev (B, m, hw) and B = F_next (B, n, hw), so every product with G or
    G^T is two thin products: O((m + n) hw) instead of O(m n) per step, and the
    (B, m, n) matrix never exists; at deep stages hw is tiny (1 at stride 32 of
    a 32px input), which makes this orders of magnitude cheaper. The dense
    version (G formed, then the same iteration) is the reference in tests/oracles.py.

    The ones start suits TMs of non-negative (post-ReLU) maps: G is then
    entrywise non-negative and its top singular vector is too (Perron), so a
    handful of iterations is enough; signed maps need more (see ITERATIONS).

    scale_free: each spatial position's channel vector of both maps is L2-normalised
    first, so sigma (at most 1) no longer grows with feature scale or width and is
    comparable between a narrow student and a wide teacher. Differentiable in both maps: only
    the search for the singular vector runs without autograd, sigma itself is computed from the
    maps with gradient (the authors' first release wrapped everything in no_grad, and the loss
    trained nothing). Small norms are clamped at eps, so an all-zero G gives sigma = sqrt(eps)
    with zero gradient instead of NaN.
    """
    with no_autocast(f_prev.device):
        a, b = f_prev.float(), f_next.float()
        h, w = min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])
        if a.shape[-2:] != (h, w):
            a = F.adaptive_avg_pool2d(a, (h, w))
        if b.shape[-2:] != (h, w):
            b = F.adaptive_avg_pool2d(b, (h, w))
        if scale_free:
            # eps 1e-6, not 1e-12: an all-zero channel vector's gradient is scaled by 1 / eps
            a, b = F.normalize(a, dim=1, eps=1e-6), F.normalize(b, dim=1, eps=1e-6)
        a = a.flatten(2) / (h * w)  # fold the 1/hw into A
        b = b.flatten(2)
        a_t, b_t = a.transpose(1, 2), b.transpose(1, 2)
        g_t = lambda v: torch.bmm(b, torch.bmm(a_t, v))  # noqa: E731  G^T v
        g = lambda u: torch.bmm(a, torch.bmm(b_t, u))  # noqa: E731  G u
        # The iteration only finds the top singular vector: run it without autograd (as
        # torch.nn.utils.spectral_norm does) and let gradient flow through the final Rayleigh
        # quotient alone. At convergence that is the exact gradient of sigma (u v^T); unrolling
        # 20 steps through autograd cost more than the step's convolutions on CPU.
        with torch.no_grad():
            v = a.new_ones(a.shape[0], a.shape[1], 1)
            for _ in range(iterations):
                kv = g(g_t(v))
                v = kv / kv.norm(dim=1, keepdim=True).clamp_min(eps)
        u = g_t(v)
        rayleigh = u.pow(2).sum(dim=(1, 2)) / v.pow(2).sum(dim=(1, 2)).clamp_min(eps)
        return rayleigh.clamp_min(eps).sqrt()


def stage_sigmas(features: Sequence[Tensor], iterations: int = ITERATIONS, scale_free: bool = False,
                 matrices: Sequence[int] | None = None) -> Tensor:
    """Spectral norm of the TM of consecutive stage maps, shape (B, M): TM i joins features
    i and i+1; `matrices` picks which (default all len-1, shallow to deep)."""
    if len(features) < 2:
        raise ValueError("need at least two feature maps to form a transmitting matrix")
    picked = range(len(features) - 1) if matrices is None else matrices
    sigmas = [tm_spectral_norm(features[i], features[i + 1], iterations, scale_free) for i in picked]
    return torch.stack(sigmas, dim=1)


def default_pair_weights(p: int) -> list[float]:
    """The authors' weights for p TMs (ImageNet/distiller_london.py): 1 / 2^(p-i), so the
    deepest weighs 1/2, the one before 1/4, ..."""
    return [1.0 / 2 ** (p - i) for i in range(p)]


def lipschitz_loss(
    student_sigmas: Tensor,
    teacher_sigmas: Tensor,
    weights: Tensor | Sequence[float],
    distance: str = "log_mse",
    eps: float = _EPS,
) -> Tensor:
    """Weighted distance between student and teacher TM sigmas, a scalar.

    sigmas are (B, P); the result is sum_i w_i * mean_b d(s_bi, t_bi)^2.
    Teacher sigmas are detached here so no caller can leak gradient into the
    teacher.

    distance:
      "mse"      raw MSE of sigmas, as in the authors' code. Sigmas of real
                 stages are 20 to 200, so this is ~1e4 and needs a tiny alpha.
      "log_mse"  MSE of log(sigma): matches ratios, invariant to a common
                 scale of both networks. Default; a documented departure.
      "relative" MSE of (s - t) / t.
    """
    if distance not in _DISTANCES:
        raise ValueError(f"distance must be one of {_DISTANCES}, got {distance!r}")
    if student_sigmas.shape != teacher_sigmas.shape or student_sigmas.dim() != 2:
        raise ValueError(
            "student and teacher sigmas must both be (B, P); got "
            f"{tuple(student_sigmas.shape)} and {tuple(teacher_sigmas.shape)}"
        )
    s = student_sigmas
    t = teacher_sigmas.detach().to(dtype=s.dtype, device=s.device)
    w = torch.as_tensor(weights, dtype=s.dtype, device=s.device).flatten()
    if w.numel() != s.shape[1]:
        raise ValueError(f"{w.numel()} weights for {s.shape[1]} pairs")
    if distance == "mse":
        diff = s - t
    elif distance == "log_mse":
        diff = torch.log(s.clamp_min(eps)) - torch.log(t.clamp_min(eps))
    else:
        diff = (s - t) / t.clamp_min(eps)
    return (w * diff.pow(2).mean(dim=0)).sum()
