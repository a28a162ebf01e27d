"""MMEngine / MMDetection integration: optimizer constructor, mixed precision, checks, safe
checkpoints and loss checks, data loading, distributed setup, COCO metrics. Importing it registers everything
under the names configs use."""

from .amp import AutocastOptimWrapper
from .checkpointing import SafeCheckpointHook
from .checks import HieraDetCheckHook, check_detector
from .coco_metric import FastCocoMetric
from .compile import CompileHook
from .datasets import CheckedCocoDataset
from .distributed import HeartbeatHook
from .finite_loss import FiniteLossHook, NonFiniteLossError
from .layer_decay import HieraDetLayerDecayConstructor
from .loops import ResumableEpochBasedTrainLoop, ResumableIterBasedTrainLoop
from .resumable_data import ResumableBatchSampler
from .transforms import CheckedLoadImageFromFile

__all__ = ["AutocastOptimWrapper", "CheckedCocoDataset", "CheckedLoadImageFromFile", "CompileHook", "FastCocoMetric",
           "FiniteLossHook", "HeartbeatHook", "HieraDetCheckHook", "HieraDetLayerDecayConstructor", "NonFiniteLossError",
           "ResumableBatchSampler", "ResumableEpochBasedTrainLoop", "ResumableIterBasedTrainLoop",
           "SafeCheckpointHook", "check_detector"]
