"""MMEngine / MMDetection integration: optimizer constructor, mixed precision, checks, data
loading, distributed setup. Importing it registers everything under the names configs use."""

from . import amp, checks, layer_decay, transforms  # noqa: F401  (registration)
from .amp import AutocastOptimWrapper
from .checks import HieraDetCheckHook, check_detector
from .layer_decay import HieraDetLayerDecayConstructor
from .transforms import CheckedLoadImageFromFile

__all__ = ["AutocastOptimWrapper", "CheckedLoadImageFromFile", "HieraDetCheckHook", "HieraDetLayerDecayConstructor",
           "check_detector"]
