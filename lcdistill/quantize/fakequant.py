"""The int8 arithmetic onnxruntime's static quantization uses (lcdistill.quantize.ptq settings), simulated in
float so the student trains through it.

- Weights: per output channel, symmetric, zero point 0, scale max|w| / qmax. int8 in the 7-bit range of
  reduce_range, q in [-64, 64] (onnxruntime.quantization.quant_utils: get_qmin_qmax_for_qType(INT8,
  reduce_range=True) and compute_scale_zp: the same scale). int4 (qat.weight_bits=4) in [-7, 7]:
  onnxruntime's own int4 range is [-8, 7] with scale max|w| / 7.5, where max|w| lands on 7 or -8 by a
  rounding hair and the scale cannot be read back off the weights; on [-7, 7] both ends are exact, and the
  export hands onnxruntime these scales (onnx_scales.weight_overrides). qat.weight_range learnt (the default
  at int4): the scale is a learnt share of max|w| instead, the weights beyond it clipped (clipped_quant_weight).
- Biases: in int32 on the grid of input scale x weight scale (BiasRounding), int4 weights' too.
- Activations: per tensor, uint8 [0, 255], asymmetric, from a range that always holds 0: scale =
  (max - min) / 255, zero point round(-min / scale) (compute_scale_zp with qmin 0, qmax 255).
Rounding is half to even in both (torch.fake_quantize_* and ONNX QuantizeLinear).
"""

from __future__ import annotations

import torch
from torch import nn

WEIGHT_RANGES = {8: (-64, 64), 4: (-7, 7)}  # bits -> the symmetric weight range: int8 with reduce_range, int4 one level short
ACT_QMIN, ACT_QMAX = (0, 255)  # uint8


def weight_scales(w: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per output channel: max |w| / qmax (1.0 for an all-zero channel, as onnxruntime does)."""
    amax = w.detach().abs().flatten(1).amax(1)
    return torch.where(amax > 0, amax / WEIGHT_RANGES[bits][1], torch.ones_like(amax)).float()


def fake_quant_weight(w: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """w on its per-channel grid (straight-through gradient: nothing is clipped, the scale holds max |w|)."""
    scales = weight_scales(w, bits)
    zeros = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    qmin, qmax = WEIGHT_RANGES[bits]
    return torch.fake_quantize_per_channel_affine(w.float(), scales, zeros, 0, qmin, qmax).to(w.dtype)


def act_qparams(lo: float, hi: float) -> tuple[float, int]:
    """(scale, zero point) of a uint8 tensor seen in [lo, hi], by onnxruntime's formula."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / (ACT_QMAX - ACT_QMIN)
    if scale == 0:
        return 1.0, 0
    return scale, int(min(max(round(ACT_QMIN - lo / scale), ACT_QMIN), ACT_QMAX))


def fold_scale(bn: nn.BatchNorm2d | None, w: torch.Tensor) -> torch.Tensor | None:
    """s = gamma / sqrt(running_var + eps), shaped to multiply w per output channel; None without a BatchNorm
    (or one that keeps no running statistics)."""
    if bn is None or bn.running_var is None:
        return None
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)
    s = gamma / torch.sqrt(bn.running_var + bn.eps)
    s = torch.where(s.abs() < 1e-12, torch.full_like(s, 1e-12), s)  # a dead channel: keep the division finite
    return s.reshape(-1, *([1] * (w.dim() - 1))).to(w.dtype)


def clip_search(w: torch.Tensor, bits: int, shares: torch.Tensor | None = None) -> torch.Tensor:
    """Per output channel, the share of max |w| the grid's last level should sit at to make the quantized
    weights closest to w (least squares), over the shares tried: where a few outliers would stretch a 15-level
    int4 grid, clipping them gives the many small weights finer steps (the usual start of learnt clipping)."""
    shares = torch.linspace(0.3, 1.0, 71) if shares is None else shares
    w = w.detach().float().flatten(1)
    best, err = torch.ones(w.shape[0]), torch.full((w.shape[0],), float("inf"))
    for share in shares.tolist():
        e = (clipped_quant_weight(w, torch.full((w.shape[0],), share), bits) - w).pow(2).sum(1)
        better = e < err
        best, err = torch.where(better, torch.full_like(best, share), best), torch.where(better, e, err)
    return best


def clipped_quant_weight(w: torch.Tensor, clip: torch.Tensor, bits: int) -> torch.Tensor:
    """w on a per-channel grid whose last level is clip * max |w| (clip in (0, 1], per output channel): weights
    beyond it are clipped. Learnt step size (Esser et al. 2020, LSQ): rounding passes the gradient straight
    through, and clip gets its own gradient from the rounding and clipping error; the scale is never above
    max |w| / qmax, so the export reads it back off the weights (onnx_scales.weight_overrides)."""
    qmin, qmax = WEIGHT_RANGES[bits]
    amax = w.detach().float().abs().flatten(1).amax(1)
    shape = (-1, *([1] * (w.dim() - 1)))
    share = torch.where(clip > 1, torch.ones_like(clip), torch.where(clip < 0.01, torch.full_like(clip, 0.01), clip))  # at 1: still learns down
    scale = torch.where(amax > 0, share * amax / qmax, torch.ones_like(amax)).view(shape)
    x = torch.clamp(w.float() / scale, qmin, qmax)
    x = x + (torch.round(x) - x).detach()  # half to even, as QuantizeLinear
    return (x * scale).to(w.dtype)


class FoldedWeight(nn.Module):
    """A parametrization of a conv's weight: the weight its int8 model holds once the BatchNorm after it is
    folded in, w_q = fq(w * s) / s with s = gamma / sqrt(running_var + eps) per channel. Dividing by s keeps
    the BatchNorm module as it is: in eval, BN(conv(x, w_q)) is exactly the folded int8 convolution; in
    training BN still normalises with batch statistics (Jacob et al. 2018, as torch's fused QAT convs
    approximate it). The BatchNorm is held outside the module tree (not a submodule), so state_dict and
    module paths are unchanged; deepcopy (EMA) still carries it to the copy's own BatchNorm.

    clip (qat.weight_range learnt): a learnt share of each channel's max |w| where the grid ends
    (clipped_quant_weight), a parameter the optimizer trains with the weights; None: the grid spans max |w|."""

    def __init__(self, bn: nn.BatchNorm2d | None = None, bits: int = 8, clip: torch.Tensor | None = None):
        super().__init__()
        object.__setattr__(self, "bn", bn)
        self.bits = bits
        self.clip = None if clip is None else nn.Parameter(clip.float())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        s = fold_scale(self.bn, w)
        folded = w if s is None else w * s
        q = fake_quant_weight(folded, self.bits) if self.clip is None else clipped_quant_weight(folded, self.clip, self.bits)
        return q if s is None else q / s

    def folded(self, w: torch.Tensor) -> torch.Tensor:
        """The weight with its BatchNorm folded in, before quantization."""
        s = fold_scale(self.bn, w)
        return w if s is None else w * s


def fake_quant_act(x: torch.Tensor, scale, zero) -> torch.Tensor:
    """x on the uint8 grid of (scale, zero point); no casts around it when x is float32, so an exported
    QuantizeLinear/DequantizeLinear pair sits on the very tensor onnxruntime quantizes."""
    if x.dtype == torch.float32:
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, ACT_QMIN, ACT_QMAX)
    scale = scale.float() if isinstance(scale, torch.Tensor) else scale
    return torch.fake_quantize_per_tensor_affine(x.float(), scale, zero, ACT_QMIN, ACT_QMAX).to(x.dtype)


class ActHooks(nn.Module):
    """A quantizer that sits on a module's input (pre_hook) or output (post_hook)."""

    def pre_hook(self, module: nn.Module, args: tuple):
        """A forward pre-hook: the module's first input quantized."""
        return (self(args[0]), *args[1:])

    def post_hook(self, module: nn.Module, args: tuple, output: torch.Tensor):
        """A forward hook: the module's output quantized."""
        return self(output)


class ActQuant(ActHooks):
    """uint8 fake quantization of one tensor, its range an exponential moving average of the batch minimum
    and maximum. `state` (set each training step by lcdistill.quantize.prepare.QatState, from its step count) says
    what it does: 0 watches only (the first steps: the range has no history yet), 1 watches and quantizes, 2
    quantizes with the range frozen. In eval it quantizes with the range it has (once it has one)."""

    def __init__(self, momentum: float):
        super().__init__()
        self.momentum, self.state = momentum, 0
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def qparams(self) -> tuple[float, int]:
        return act_qparams(self.lo.item(), self.hi.item())

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().min().float(), x.detach().max().float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # every process the same range
            torch.distributed.all_reduce(lo, torch.distributed.ReduceOp.MIN)
            torch.distributed.all_reduce(hi, torch.distributed.ReduceOp.MAX)
        if not self.ready():
            self.lo.copy_(lo), self.hi.copy_(hi)
        else:
            self.lo.lerp_(lo, self.momentum), self.hi.lerp_(hi, self.momentum)
        self.seen += 1

    def ready(self) -> bool:
        """Whether a range was seen (remembered on the Python side: no device sync per step once true)."""
        if not getattr(self, "_ready", False):
            self._ready = bool(self.seen > 0)
        return self._ready

    def quantizes(self) -> bool:
        return self.ready() and not (self.training and self.state == 0)

    def _scale(self) -> torch.Tensor:
        lo, hi = torch.clamp(self.lo, max=0.0), torch.clamp(self.hi, min=0.0)
        return torch.clamp((hi - lo) / (ACT_QMAX - ACT_QMIN), min=1e-12)

    def scale_now(self) -> torch.Tensor | None:
        """The scale it quantizes with now; None while it does not quantize."""
        return self._scale() if self.quantizes() else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.state < 2:
            self.observe(x)
            self._ready = True
        if not self.quantizes():
            return x
        scale = self._scale()
        zero = torch.clamp(torch.round(ACT_QMIN - torch.clamp(self.lo, max=0.0) / scale), ACT_QMIN, ACT_QMAX).to(torch.int32)
        return fake_quant_act(x, scale, zero)


class BiasRounding:
    """onnxruntime's quantized convolution holds its bias (the BatchNorm's folded in: beta - mean * s) in int32 on
    the grid of input scale x weight scale, per output channel (quant_utils.quantize_bias_static_impl rounds it
    there; for int4 weights, which meet float convolutions, its WeightBiasQuantization optimizer does the same
    when it loads the file). A forward hook on the conv adds that rounding's error: delta / s, which the BatchNorm after it
    turns into delta (BN(y + delta / s) = BN(y) + delta in eval), so a BatchNorm with its activation inside
    (timm's BatchNormAct2d) still gets it before the activation. Only where the folding is exact: BatchNorm in
    eval (running statistics), and once the conv's input is quantized. A constant per channel: no gradient."""

    def __init__(self, bn: nn.BatchNorm2d | None, quant: nn.Module, bits: int):
        self.bn, self.quant, self.bits = bn, quant, bits

    def hook(self, conv: nn.Module, args: tuple, output: torch.Tensor):
        bn, scale = self.bn, self.quant.scale_now()
        if scale is None or (isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.training):  # FrozenBatchNorm2d: always folded
            return output
        with torch.no_grad():
            w = conv.weight
            if bn is not None:
                s = fold_scale(bn, w)
                w = w * s
                s = s.flatten()
                b = (bn.bias if bn.bias is not None else torch.zeros_like(s)) - bn.running_mean * s
            else:
                b = conv.bias
            grid = scale * weight_scales(w, self.bits)
            delta = torch.round(b.float() / grid) * grid - b.float()
            if bn is not None:
                delta = delta / s
        return output + delta.to(output.dtype).view(1, -1, *([1] * (output.dim() - 2)))


class FixedQuant(ActHooks):
    """uint8 fake quantization with a fixed (scale, zero point): a baked run's activations, for export and eval."""

    def __init__(self, scale: float, zero_point: int):
        super().__init__()
        self.scale, self.zero_point = float(scale), int(zero_point)

    def scale_now(self) -> float:
        return self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_act(x, self.scale, self.zero_point)
