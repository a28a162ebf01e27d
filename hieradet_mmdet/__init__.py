"""HieraDet as an MMDetection 3.x backbone.

``import hieradet_mmdet`` (or ``custom_imports=dict(imports=['hieradet_mmdet'])``) registers
``type='HieraDet'``, ``HieraDetLayerDecayConstructor``, ``AutocastOptimWrapper``,
``CheckedLoadImageFromFile`` and ``HieraDetCheckHook`` in MMDetection's registries, and lets
torch's weights-only loader read MMEngine's checkpoints. The model itself
(:mod:`hieradet_mmdet.models`) needs only PyTorch and stays importable without OpenMMLab; the
MMDetection names here (``HieraDetBackbone``, ``check_detector``) then raise an ImportError that
says what to install.

    archs.py             sizes and layouts as plain data
    cpu.py               which instructions ATen's and oneDNN's CPU kernels use
    mmengine_adapter.py  every use of MMEngine's private API, behind one door
    weights/             published weights, checkpoint reading and key conversion, loading into a
                         model, tensor digests, whether a checkpoint fits a whole detector
    models/              the trunk (reference and fast path), the classifier, the registered backbone
    engine/              MMEngine / MMDetection integration (training)
    detectors.py         configs and the detectors built from them, for the tools, export and tests
    export/              ONNX and torch.export programs, and running them without MMDetection
    demo/                the demo: its dataset, short training runs, feature pictures

Each imports only from the lines above it (engine/, detectors.py and export/ side by side; export/
never imports engine/). The measuring tools and birder, the reference the tests compare with, live
outside the package, in the repository's ``benchmarks/``."""

from .archs import ARCH_NAMES
from .models.hieradet import HieraDet

__version__ = "0.1.0"
MMDETECTION_NAMES = ("HieraDetBackbone", "check_detector")

try:
    import mmdet  # noqa: F401
except ImportError as err:  # the pure-PyTorch model stays usable without OpenMMLab
    _mmdet_missing = f"{type(err).__name__}: {err}"
    __all__ = ["ARCH_NAMES", "HieraDet"]
else:
    _mmdet_missing = None
    from . import engine  # noqa: F401  (registers the optimizer constructor, wrapper, transform, hook)
    from .engine.checks import check_detector
    from .models.backbone import HieraDetBackbone
    from .weights.safe_globals import register_safe_globals

    register_safe_globals()  # MMDetection's own tools load checkpoints weights-only too
    __all__ = ["ARCH_NAMES", "HieraDet", *MMDETECTION_NAMES]


def __getattr__(name: str):
    """Only reached for names this module does not have: the MMDetection ones when mmdet is missing."""
    if name in MMDETECTION_NAMES:
        raise ImportError(
            f"hieradet_mmdet.{name} needs MMDetection, which cannot be imported here ({_mmdet_missing}). Install "
            "mmdet>=3.3,<3.4 with mmengine>=0.10.7 and mmcv>=2.1,<2.2 built with its ops (docs/installation.md); "
            "the plain PyTorch model, hieradet_mmdet.models.HieraDet, works without them.", name=name)
    raise AttributeError(f"module 'hieradet_mmdet' has no attribute {name!r}")
