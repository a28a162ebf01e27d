"""HieraDet weights: published ones, reading every checkpoint form safely, loading into a model."""

from .errors import CheckpointError
from .load import load_backbone_weights
from .published import PRETRAINED, PretrainedWeights, WeightsUnavailableError, get_pretrained
from .reader import LoadedCheckpoint, load_file, read_checkpoint

__all__ = ["PRETRAINED", "CheckpointError", "LoadedCheckpoint", "PretrainedWeights", "WeightsUnavailableError",
           "get_pretrained", "load_backbone_weights", "load_file", "read_checkpoint"]
