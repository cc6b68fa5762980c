"""Resolve a model name, run folder or weights file to a module and its data config; find its stages.

Sources: timm (`timm:NAME`), torchvision (`tv:NAME`), a bare NAME (timm first, then
torchvision), a run folder written by lcdistill, or a weights file.

hub: which library builds a name, pretrained weights (offline-safe). factory: build() the module with a
head of num_classes, load_into, data_config, params. runs: Loaded, resolve/rebuild, run folders
and student files. stages/probe: stage discovery and pairing for LONDON. taps: FeatureTap.
"""

from lcdistill.models.factory import build, data_config, load_into, params
from lcdistill.models.hub import resolve_source, torchvision_names
from lcdistill.models.runs import Loaded, is_run, load_run, model_meta, read_meta, rebuild, resolve
from lcdistill.models.stages import Stage, describe_pairs, describe_stages, find_stages, pair_stages, probe_modules
from lcdistill.models.taps import FeatureTap

__all__ = [
    "Loaded", "resolve", "rebuild", "load_run", "build", "is_run", "read_meta", "model_meta", "data_config",
    "resolve_source", "load_into", "torchvision_names", "params",
    "Stage", "find_stages", "probe_modules", "pair_stages", "describe_pairs", "describe_stages", "FeatureTap",
]
