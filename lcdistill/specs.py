"""How a model spec on the command line splits into its library prefix and its name (no torch here:
the recipe reads it at start-up)."""

from __future__ import annotations

PREFIXES = (("timm:", "timm"), ("tv:", "tv"), ("torchvision:", "tv"))


def split_source(spec: str) -> tuple[str, str]:
    """'timm:resnet18' -> ('timm', 'resnet18'); 'tv:resnet18' -> ('tv', ...); bare -> ('auto', ...)."""
    for prefix, source in PREFIXES:
        if spec.startswith(prefix):
            return source, spec[len(prefix):]
    return "auto", spec
