"""HieraDet as an MMDetection 3.x backbone.

``import hieradet_mmdet`` (or ``custom_imports=dict(imports=['hieradet_mmdet'])``) registers
``type='HieraDet'``, ``HieraDetLayerDecayConstructor``, ``AutocastOptimWrapper``,
``CheckedLoadImageFromFile`` and ``HieraDetCheckHook`` in MMDetection's registries, and lets
torch's weights-only loader read MMEngine's checkpoints. The model itself
(:mod:`hieradet_mmdet.models`) needs only PyTorch and stays importable without OpenMMLab.

    models/   the trunk (reference and fast path), the classifier, the registered backbone
    weights/  published weights, checkpoint reading and key conversion, loading into a model
    engine/   MMEngine / MMDetection integration
"""

from .models.hieradet import ARCH_NAMES, HieraDet

__version__ = "0.1.0"
__all__ = ["ARCH_NAMES", "HieraDet", "HieraDetBackbone", "check_detector"]

try:
    import mmdet  # noqa: F401
except ImportError:  # the pure-PyTorch model stays usable without OpenMMLab
    HieraDetBackbone = check_detector = None
else:
    from . import engine  # noqa: F401  (registers the optimizer constructor, wrapper, transform, hook)
    from .engine.checks import check_detector
    from .models.backbone import HieraDetBackbone
    from .weights.safe_globals import register_safe_globals

    register_safe_globals()  # MMDetection's own tools load checkpoints weights-only too
