"""Kept so that ``from hieradet_mmdet.checkpoint import ...`` still works: see :mod:`hieradet_mmdet.weights`."""

from .weights import CheckpointError, LoadedCheckpoint, load_backbone_weights, read_checkpoint  # noqa: F401
