"""Exact operator norms of single layers: convolutions (as linear maps on their input size) and linear layers.

Weight-only quantities for reporting, computed in float64; see bounds.network_upper_bound.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lcdistill.lipschitz.tm import no_autocast


def as_pair(x) -> tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, int) else (int(x[0]), int(x[1]))


def _conv_ops(weight, input_hw, stride, padding, dilation, groups, padding_mode):
    """The convolution as a linear map on (1, C_in, H, W) inputs and its adjoint."""
    stride, dilation = as_pair(stride), as_pair(dilation)
    h, w = as_pair(input_hw)
    kh, kw = weight.shape[-2:]
    if isinstance(padding, str):
        if padding == "valid":
            pads = (0, 0, 0, 0)
        elif padding == "same":
            # PyTorch puts the odd extra pixel of 'same' padding on the right/bottom.
            th, tw = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
            pads = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
        else:
            raise ValueError(f"unknown padding {padding!r}")
    else:
        ph, pw = as_pair(padding)
        pads = (pw, pw, ph, ph)  # F.pad order: left, right, top, bottom
    modes = {"zeros": "constant", "circular": "circular", "reflect": "reflect", "replicate": "replicate"}
    if padding_mode not in modes:
        raise ValueError(f"unknown padding_mode {padding_mode!r}")

    # Symmetric zero padding is done by conv2d itself, whose exact adjoint is
    # conv_transpose2d with the same padding. Anything else is padded
    # explicitly; the adjoint of a padding (a gather) is a scatter-add.
    explicit = padding_mode != "zeros" or pads[0] != pads[1] or pads[2] != pads[3]
    if explicit:
        conv_pad = (0, 0)
        hp, wp = h + pads[2] + pads[3], w + pads[0] + pads[1]
        # Pad a map of 1-based source indices to learn where each padded pixel comes from (0 = zero pad).
        idx = torch.arange(1, h * w + 1, dtype=torch.float64).view(1, 1, h, w)
        if modes[padding_mode] == "constant":
            src = F.pad(idx, pads, mode="constant", value=0.0)
        else:
            src = F.pad(idx, pads, mode=modes[padding_mode])
        src = src.round().long().flatten().to(weight.device)
    else:
        conv_pad = (pads[2], pads[0])
        hp, wp = h, w
    out_h = (hp + 2 * conv_pad[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (wp + 2 * conv_pad[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"kernel {kh}x{kw} does not fit input {h}x{w} with this padding")
    # conv2d floors (size - window) / stride; output_padding restores the
    # dropped rows/cols so the adjoint returns the input's exact shape.
    back_h = (out_h - 1) * stride[0] - 2 * conv_pad[0] + dilation[0] * (kh - 1) + 1
    back_w = (out_w - 1) * stride[1] - 2 * conv_pad[1] + dilation[1] * (kw - 1) + 1
    out_pad = (hp - back_h, wp - back_w)

    def forward(x: Tensor) -> Tensor:
        if explicit:
            x = F.pad(x, pads, mode=modes[padding_mode]) if padding_mode != "zeros" else F.pad(x, pads)
        return F.conv2d(x, weight, None, stride, conv_pad, dilation, groups)

    def adjoint(y: Tensor) -> Tensor:
        z = F.conv_transpose2d(y, weight, None, stride, conv_pad, out_pad, groups, dilation)
        if explicit:
            n, c = z.shape[:2]
            flat = z.new_zeros(n, c, h * w + 1).index_add_(2, src, z.flatten(2))
            z = flat[:, :, 1:].reshape(n, c, h, w)
        return z

    return forward, adjoint, (out_h, out_w)


def _top_singular_value(fwd, adj, x0: Tensor, iterations: int, tol: float, method: str) -> float:
    """Largest singular value of the linear map fwd (adjoint adj) from start x0, a lower estimate."""
    x = x0 / x0.norm()
    sigma = 0.0
    if method == "power":
        for _ in range(max(1, iterations)):
            y = fwd(x)
            z = adj(y)
            ny, nz = y.norm().item(), z.norm().item()
            if ny == 0.0 or nz == 0.0:
                return 0.0
            # ||A^T y|| / ||y|| >= ||A x|| for unit x: the better of the two free estimates.
            new = nz / ny
            x = z / nz
            done = abs(new - sigma) <= tol * new
            sigma = new
            if done:
                break
        return sigma
    if method != "lanczos":
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    # Lanczos on A^T A: same operator applications as power iteration, but
    # the top Ritz value converges far faster when the top singular values
    # are clustered, as they are for convolutions (about 1e-5 vs 1e-2
    # relative error after 30 steps on resnet18 layers).
    basis = [x.flatten()]
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(max(1, iterations)):
        w = adj(fwd(basis[-1].view_as(x0))).flatten()
        alphas.append(torch.dot(w, basis[-1]).item())
        # Full re-orthogonalisation, twice: without it finite precision
        # produces spurious copies of converged Ritz values.
        q = torch.stack(basis)
        for _ in range(2):
            w = w - q.t() @ (q @ w)
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            t = t + torch.diag(off, 1) + torch.diag(off, -1)
        theta = torch.linalg.eigvalsh(t)[-1].item()
        new = math.sqrt(max(theta, 0.0))
        done = abs(new - sigma) <= tol * new
        sigma = new
        beta = w.norm().item()
        if done or beta <= 1e-12 * max(theta, 1e-300):
            break  # converged, or the Krylov space is invariant and the value exact
        betas.append(beta)
        basis.append(w / beta)
    return sigma


def conv_operator_norm(
    conv_weight: Tensor,
    input_hw,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    iterations: int = 50,
    padding_mode: str = "zeros",
    tol: float = 1e-6,
    method: str = "lanczos",
    seed: int = 0,
) -> float:
    """Spectral norm of a 2-d convolution as a linear operator on C_in x H x W inputs.

    Iterates A^T A with A = conv2d and A^T = conv_transpose2d (its adjoint),
    in float64, from a seeded Gaussian start; method "lanczos" (default,
    Krylov-accelerated) or "power" (plain power iteration). A random start is
    needed: a constant image is a Fourier mode and would confine the
    iteration to the DC frequency. Works for any stride, dilation, groups,
    padding (int, pair, 'same', 'valid') and padding_mode. Stops early when
    the estimate changes by less than tol (relative).

    Both methods approach the true norm from below, so an unconverged result
    slightly under-states it.
    """
    weight = conv_weight.detach().to(torch.float64)
    c_in = weight.shape[1] * groups
    h, w = as_pair(input_hw)
    with torch.no_grad(), no_autocast(weight.device):
        fwd, adj, _ = _conv_ops(weight, (h, w), stride, padding, dilation, groups, padding_mode)
        gen = torch.Generator().manual_seed(seed)
        x0 = torch.randn(1, c_in, h, w, generator=gen, dtype=torch.float64).to(weight.device)
        return _top_singular_value(fwd, adj, x0, iterations, tol, method)


def linear_operator_norm(weight: Tensor) -> float:
    """Exact spectral norm of a linear layer's weight (out, in)."""
    return torch.linalg.matrix_norm(weight.detach().to(torch.float64), ord=2).item()
