"""Tapping module outputs by path with forward hooks; models are never rewritten (torchdistill style)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn


def unwrap(model: nn.Module) -> nn.Module:
    """The original module behind torch.compile (``_orig_mod``) or DDP (``module``) wrappers, as
    timm.utils.unwrap_model finds it: module paths are always relative to it, so names found on a
    model stay valid after it is compiled."""
    from timm.utils import unwrap_model

    return unwrap_model(model)


def first_tensor(out) -> Optional[torch.Tensor]:
    """The output tensor of a module: itself, or the first tensor in a tuple/list/dict."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for item in out:
            t = first_tensor(item)
            if t is not None:
                return t
        return None
    if isinstance(out, dict):
        for item in out.values():
            t = first_tensor(item)
            if t is not None:
                return t
    return None


INPUT = ":in"  # suffix of a tap name that reads the module's input (FeatureTap)


class FeatureTap:
    """Taps module outputs by path with forward hooks.

    ``features[name]`` holds the latest output of each hooked module (first tensor
    if the module returns a tuple/list/dict), kept in the autograd graph.  Call
    ``clear()`` every step so no activations are kept across steps, and
    ``remove()`` when done.  Names are relative to the unwrapped model, so a
    tap made on a model keeps working after ``torch.compile(model)``.

    A name ending in ``:in`` (``layer1.1.act2:in``) taps the module's input instead, with a
    forward pre-hook: the pre-activation map of an activation module. The input is cloned, since
    an in-place activation overwrites it.
    """

    def __init__(self, model: nn.Module, module_names: Sequence[str]):
        base = unwrap(model)
        modules = dict(base.named_modules())
        names = list(dict.fromkeys(module_names))  # de-duplicate, keep order
        missing = [n for n in names if n.removesuffix(INPUT) not in modules]
        if missing:
            raise ValueError(f"cannot tap {', '.join(map(repr, missing))}: no such module in the model")
        self.names: List[str] = names
        self.features: Dict[str, torch.Tensor] = {}
        self._handles = [modules[n[: -len(INPUT)]].register_forward_pre_hook(self._make_pre_hook(n)) if n.endswith(INPUT)
                         else modules[n].register_forward_hook(self._make_hook(n)) for n in names]

    def _make_hook(self, name: str):
        features = self.features

        def hook(_module, _inp, out):
            t = first_tensor(out)
            if t is not None:
                features[name] = t

        return hook

    def _make_pre_hook(self, name: str):
        features = self.features

        def hook(_module, args):
            t = first_tensor(args)
            if t is not None:
                features[name] = t.clone()  # an in-place activation would overwrite it

        return hook

    def clear(self) -> None:
        self.features.clear()

    def get(self, names: Optional[Sequence[str]] = None) -> List[torch.Tensor]:
        """Tapped outputs in the given order (default: construction order)."""
        names = self.names if names is None else list(names)
        out = []
        for n in names:
            if n not in self.names:
                raise KeyError(f"module {n!r} is not tapped (tapped: {', '.join(self.names)})")
            t = self.features.get(n)
            if t is None:
                raise RuntimeError(
                    f"tapped module {n!r} produced no output: it did not run in the forward "
                    "pass since the last clear() (is it on the model's forward path?)"
                )
            out.append(t)
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.features.clear()

    def __enter__(self) -> "FeatureTap":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
