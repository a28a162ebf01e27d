"""MMDetection glue: registers the trunk as ``type='HieraDet'`` and loads ``init_cfg`` weights."""

from __future__ import annotations

import copy

from mmdet.registry import MODELS
from mmengine.logging import print_log
from mmengine.model import BaseModule

from .hieradet import HieraDet


@MODELS.register_module(name="HieraDet")
class HieraDetBackbone(HieraDet, BaseModule):
    """HieraDet for MMDetection configs: the arguments of :class:`HieraDet`, plus ``init_cfg``.

    ``init_cfg=dict(type='Pretrained', checkpoint=X)`` takes every checkpoint form of
    :func:`hieradet_mmdet.weights.load_backbone_weights` (docs/checkpoints.md), strictly.
    The checkpoint's ``rgb_stats``, when it has them, are kept as ``pretrained_rgb_stats`` for
    :func:`hieradet_mmdet.engine.checks.check_detector` to compare with the preprocessing.
    """

    def __init__(self, arch="small", *, init_cfg=None, **kwargs) -> None:
        HieraDet.__init__(self, arch, **kwargs)  # runs BaseModule.__init__ through the MRO
        self.init_cfg = copy.deepcopy(init_cfg)
        self.pretrained_rgb_stats = None

    def forward(self, x):
        # The fast path hands out NCHW views of channels-last memory. mmcv's CPU RoIAlign/RoIPool
        # index their input as contiguous NCHW without checking, so FPN maps derived from such
        # views would scramble every RoI feature: MMDetection gets contiguous maps.
        return tuple(out.contiguous() for out in super().forward(x))

    def init_weights(self) -> None:
        if not (self.init_cfg and self.init_cfg.get("type") == "Pretrained"):
            return super().init_weights()
        from ..weights import load_backbone_weights

        checkpoint = load_backbone_weights(self, self.init_cfg["checkpoint"])
        self._is_init = True
        self.pretrained_rgb_stats = checkpoint.metadata.get("rgb_stats")
        print_log(f"HieraDet: loaded trunk weights from {checkpoint.name} "
                  f"({checkpoint.metadata.get('format', 'unknown format')})", logger="current")
