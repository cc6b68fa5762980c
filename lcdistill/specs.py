"""How a model spec on the command line splits into its library prefix and its name (no torch here:
the recipe reads it at start-up)."""

from __future__ import annotations

PREFIXES = (("timm:", "timm"), ("tv:", "tv"), ("torchvision:", "tv"), ("prune:", "prune"))  # prune:R, the teacher cut (lcdistill.prune)


def split_source(spec: str) -> tuple[str, str]:
    """'timm:resnet18' -> ('timm', 'resnet18'); 'tv:resnet18' -> ('tv', ...); 'prune:0.5' -> ('prune', '0.5'); bare -> ('auto', ...)."""
    for prefix, source in PREFIXES:
        if spec.startswith(prefix):
            return source, spec[len(prefix):]
    return "auto", spec
