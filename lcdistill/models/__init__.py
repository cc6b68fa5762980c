"""Models: resolve a name, run folder or weights file to a module and its data config; find its stages.

loaded: Loaded and the weights-file loader (no family, no task). registry: the per-task family registry
(parse a name, build, data config, stages, Hub card code). classifiers, segmentation, detection: the families,
registered on import; pruned: students cut from their teacher, rebuilt from a JSON shape description. hub: which library builds a name, pretrained weights (offline-safe). runs:
run folders and student files as models, resolve/rebuild. stages/probe: stage discovery and pairing
for LONDON. taps: FeatureTap.
"""

from lcdistill.models import classifiers, detection, pruned, segmentation  # noqa: F401  (each registers its family)
from lcdistill.models.classifiers import data_config
from lcdistill.models.registry import build, families, family_of, parse
from lcdistill.models.hub import resolve_source, torchvision_names
from lcdistill.models.loaded import Loaded, load_into, params
from lcdistill.models.runs import is_run, load_run, model_meta, read_meta, rebuild, resolve
from lcdistill.models.stages import Stage, describe_pairs, describe_stages, find_stages, pair_stages, probe_modules
from lcdistill.models.taps import FeatureTap

__all__ = [
    "Loaded", "resolve", "rebuild", "load_run", "build", "is_run", "read_meta", "model_meta", "data_config", "families", "family_of",
    "parse", "resolve_source", "load_into", "torchvision_names", "params",
    "Stage", "find_stages", "probe_modules", "pair_stages", "describe_pairs", "describe_stages", "FeatureTap",
]
