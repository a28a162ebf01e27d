"""HieraDet as an MMDetection 3.x backbone.

``import hieradet_mmdet`` (or ``custom_imports=dict(imports=['hieradet_mmdet'])``) registers
``type='HieraDet'`` in MMDetection's model registry. The model itself lives in
:mod:`hieradet_mmdet.hieradet` and needs only PyTorch.
"""

from .hieradet import ARCH_NAMES, HieraDet

__version__ = "0.1.0"
__all__ = ["ARCH_NAMES", "HieraDet", "HieraDetBackbone"]

try:
    from .backbone import HieraDetBackbone
    from .safe_load import register_safe_globals
    from . import optim  # noqa: F401  (registers HieraDetLayerDecayConstructor)
    from .validate import check_detector, install_build_checks

    register_safe_globals()
    install_build_checks()  # neck vs. HieraDet channels, checked while any detector is built
except ImportError as err:  # the pure-PyTorch model stays usable without OpenMMLab
    if err.name not in ("mmdet", "mmengine", "mmcv") and not str(err.name).startswith(("mmdet.", "mmengine.", "mmcv.")):
        raise
    HieraDetBackbone = None
