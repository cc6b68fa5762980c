"""Probe forwards: each module's output shape and stride on a random square input.

No-grad eval-mode forward passes at ``probe_size`` and ``probe_size - 64`` with a
hook on every named module.  A module's stride is ``64 / (H1 - H2)`` (exact for
every stride <= 64, padded or not; fixed-size outputs such as VGG's
``AdaptiveAvgPool2d((7, 7))`` and channels-last maps are rejected).  With a single
probe (a model that rejects the second size) the stride is probe / H, within a
quarter octave of a power of two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from lcdistill.models.taps import first_tensor, unwrap


@dataclass
class Stage:
    """A tappable stage: module path, output channels, and stride (input / output H). In a dilated
    encoder `stride` is the nominal one (what it would be without dilation, so stages pair by depth)
    and `map_stride` the map's real input / output H."""

    name: str
    channels: int
    stride: int
    map_stride: int | None = None  # None: the same as stride

    @property
    def real_stride(self) -> int:
        return self.map_stride or self.stride


def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


_MAX_STRIDE = 64
_STRIDE_TOL = 0.25  # octaves: H may deviate from probe/stride by up to ~19% (unpadded convs)


def _stride_of(shape: Optional[Tuple[int, ...]], probe_size: int, allow_one: bool = False) -> Optional[int]:
    """Stride of a 4D NCHW feature map for a square ``probe_size`` input, or None.

    Needs H == W >= 2 (a square input gives a square NCHW map; this rejects
    channels-last (N, H, W, C) tensors, whose "W" is C) and probe/H within a
    quarter octave of a power of two in [2, 64] ([1, 64] with ``allow_one``):
    unpadded convolutions (SqueezeNet, Inception) shrink maps a little below
    probe/stride.
    """
    if shape is None or len(shape) != 4:
        return None
    h, w = int(shape[2]), int(shape[3])
    if h < 2 or h != w:
        return None
    ratio = probe_size / h
    stride = 2 ** int(round(math.log2(ratio)))
    if abs(math.log2(ratio / stride)) > _STRIDE_TOL:
        return None
    if stride < (1 if allow_one else 2) or stride > _MAX_STRIDE:
        return None
    return stride


def check_size(probe_size: int) -> int:
    if not isinstance(probe_size, int) or probe_size < 32:
        raise ValueError(f"probe_size must be an int >= 32, got {probe_size!r}")
    return probe_size


def _second_size(probe_size: int) -> int:
    """Size of the cross-check probe: 64 pixels off, so every stride <= 64 divides the gap."""
    return probe_size - 64 if probe_size >= 128 else probe_size + 64


def _input_channels(model: nn.Module) -> int:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict):
        size = cfg.get("input_size")
        if isinstance(size, (tuple, list)) and len(size) == 3:
            return int(size[0])
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    return 3


def _param_device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    for b in model.buffers():
        if b.is_floating_point():
            return b.device, b.dtype
    return torch.device("cpu"), torch.float32


_Record = Tuple[str, Optional[Tuple[int, ...]], Tuple[int, ...]]  # (name, input shape, output shape)


def probe_forward(model: nn.Module, probe_size: int, names: Optional[Iterable[str]] = None) -> List[_Record]:
    """One no-grad eval-mode forward; returns ``(module path, input shape, output shape)``
    per module call, in hook-firing order.

    Only tensor outputs are recorded (first tensor of tuple/list/dict outputs).
    The root module '' is never hooked.  Every module's training flag is
    restored afterwards, and all hooks are removed even if the forward fails.
    Eval mode means BatchNorm running statistics are not touched; the input
    comes from a private generator, so the global RNG state is untouched.
    """
    model = unwrap(model)
    wanted = None if names is None else set(names)
    fired: List[_Record] = []

    def make_hook(name: str):
        def hook(_module, inp, out):
            t = first_tensor(out)
            if t is not None:
                i = first_tensor(inp)
                fired.append((name, None if i is None else tuple(i.shape), tuple(t.shape)))

        return hook

    modes = [(m, m.training) for m in model.modules()]
    handles = []
    try:
        for name, module in model.named_modules():
            if name == "" or (wanted is not None and name not in wanted):
                continue
            handles.append(module.register_forward_hook(make_hook(name)))
        device, dtype = _param_device_dtype(model)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, _input_channels(model), probe_size, probe_size, generator=gen)
        x = x.to(device=device, dtype=dtype)
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return fired


def unique_shapes(fired: Optional[Sequence[_Record]], which: int) -> Dict[str, Optional[Tuple[int, ...]]]:
    """Per module: its input (which=1) or output (which=2) shape, None if calls disagree."""
    shapes: Dict[str, set] = {}
    for rec in fired or ():
        shapes.setdefault(rec[0], set()).add(rec[which])
    return {n: (next(iter(v)) if len(v) == 1 else None) for n, v in shapes.items()}


def _scaling_stride(
    shape: Optional[Tuple[int, ...]],
    shape2: Optional[Tuple[int, ...]],
    probe_size: int,
    probe_size2: int,
    allow_one: bool = False,
) -> Optional[int]:
    """Stride from how a map's size changes between two probes 64 pixels apart.

    Every stride <= 64 divides the gap, so padded, unpadded, floor- and
    ceil-mode layers all shrink by exactly ``gap / stride`` rows.  A map that
    does not scale (``AdaptiveAvgPool2d((7, 7))``), is not square, or changes
    channels is rejected.
    """
    if shape is None or shape2 is None or len(shape) != 4 or len(shape2) != 4:
        return None
    if shape[1] != shape2[1] or shape[2] != shape[3] or shape2[2] != shape2[3]:
        return None
    if min(shape[2], shape2[2]) < 2:
        return None
    gap, dh = probe_size - probe_size2, int(shape[2]) - int(shape2[2])
    if dh == 0 or gap % dh:
        return None
    stride = gap // dh
    if stride < (1 if allow_one else 2) or stride > _MAX_STRIDE or not _is_pow2(stride):
        return None
    return stride


class ProbeResult:
    """Strides of every hooked module's input and output, from one or two probes."""

    def __init__(self, fired, probe_size, fired2=None, probe_size2=None):
        outs, outs2 = unique_shapes(fired, 2), unique_shapes(fired2, 2)
        ins, ins2 = unique_shapes(fired, 1), unique_shapes(fired2, 1)
        self.stages: Dict[str, Stage] = {}
        self.in_stride: Dict[str, Optional[int]] = {}
        self.out_stride: Dict[str, Optional[int]] = {}
        for name, shape in outs.items():
            if fired2 is not None and name in outs2:
                stride = _scaling_stride(shape, outs2[name], probe_size, probe_size2)
                in_stride = _scaling_stride(ins[name], ins2.get(name), probe_size, probe_size2, True)
            else:
                stride = _stride_of(shape, probe_size)
                in_stride = _stride_of(ins[name], probe_size, allow_one=True)
            self.out_stride[name] = stride
            self.in_stride[name] = in_stride
            if stride is not None:
                self.stages[name] = Stage(name=name, channels=int(shape[1]), stride=stride)

    def transition_interior(self) -> set:
        """Stages that sit inside a stride-changing module and still run at its input stride.

        Example: the 1x1 expansion conv of a downsampling inverted-residual block
        (torchvision ``features.4.conv.0``), or the BN/conv of a DenseNet transition
        before its pooling.  Such a module is the last one at its stride in firing
        order, but it starts the next stage rather than ending the current one.
        """
        interior = set()
        for name, st in self.stages.items():
            parts = name.split(".")
            for k in range(1, len(parts)):
                anc = ".".join(parts[:k])
                if anc not in self.out_stride:
                    continue
                if self.in_stride[anc] == st.stride and self.out_stride[anc] != st.stride:
                    interior.add(name)
                    break
        return interior


def probe_twice(model: nn.Module, probe_size: int, names: Optional[Iterable[str]] = None):
    """Probe at ``probe_size`` (errors propagate) and at the cross-check size.

    Returns ``(fired, fired2, size2)``; ``fired2`` is None when the model
    rejects the second size (e.g. a ViT with a fixed input size).
    """
    fired = probe_forward(model, probe_size, names)
    size2 = _second_size(probe_size)
    try:
        fired2 = probe_forward(model, size2, names)
    except Exception:
        fired2 = None
    return fired, fired2, size2


def named_modules(model: nn.Module, names: Sequence[str]) -> Dict[str, nn.Module]:
    """The model's modules by path, or ValueError naming those of `names` it lacks."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules or n == ""]
    if missing:
        raise ValueError(f"no module named {', '.join(map(repr, missing))} in the model")
    return modules


def probe_modules(model: nn.Module, names: Sequence[str], probe_size: int = 224) -> List[Stage]:
    """Stage info (channels, stride) for explicitly named modules, in the given order.

    Raises ValueError if a name is not a module of the model, or its output is
    not a 4D NCHW feature map with a power-of-two stride.
    """
    check_size(probe_size)
    model = unwrap(model)
    named_modules(model, names)
    fired, fired2, size2 = probe_twice(model, probe_size, names)
    table = ProbeResult(fired, probe_size, fired2, size2).stages
    out = []
    for n in names:
        if n not in table:
            raise ValueError(
                f"module {n!r} does not output a single 4D (N, C, H, W) feature map that scales "
                "with the input at a power-of-two stride; it cannot be used as a distillation stage"
            )
        out.append(table[n])
    return out
