"""MMDetection glue: registers the trunk as ``type='HieraDet'`` and loads ``init_cfg`` weights."""

from __future__ import annotations

import copy
import logging
import warnings

from mmdet.registry import MODELS
from mmengine.logging import print_log
from mmengine.model import BaseModule

from .hieradet import HieraDet
from .validate import rgb_stats_mismatch


@MODELS.register_module(name="HieraDet")
class HieraDetBackbone(HieraDet, BaseModule):
    """HieraDet for MMDetection configs.

    ``init_cfg=dict(type='Pretrained', checkpoint=X)`` accepts everything
    :func:`hieradet_mmdet.checkpoint.load_backbone_weights` does: a published weights name, an
    http(s) URL, a birder ``.pt``/``.safetensors`` file, a SAM2 checkpoint, an MMDetection
    checkpoint of a HieraDet detector or a plain state dict. Loading is strict about shapes.
    """

    def __init__(self, arch="small", *, init_cfg=None, **kwargs) -> None:
        HieraDet.__init__(self, arch, **kwargs)  # runs BaseModule.__init__ through the MRO
        self.init_cfg = copy.deepcopy(init_cfg)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_detector_ref", None)  # a weakref does not pickle
        return state

    def forward(self, x):
        # The trunk hands out NCHW views of channels-last memory. Convolutions keep that layout,
        # and mmcv's CPU RoIAlign/RoIPool index their input as contiguous NCHW without checking,
        # so FPN maps derived from views would scramble every RoI feature: hand MMDetection
        # contiguous maps.
        return tuple(out.contiguous() for out in super().forward(x))

    def init_weights(self) -> None:
        if self.init_cfg and self.init_cfg.get("type") == "Pretrained":
            from .checkpoint import load_backbone_weights

            checkpoint = load_backbone_weights(self, self.init_cfg["checkpoint"])
            self._is_init = True
            # In the run's log (checkpoint.py logs to Python logging, which MMEngine does not show).
            print_log(f"HieraDet: loaded trunk weights from {checkpoint.name} "
                      f"({checkpoint.metadata.get('format', 'unknown format')})", logger="current")
            self.pretrained_rgb_stats = checkpoint.metadata.get("rgb_stats")
            ref = self.__dict__.get("_detector_ref")
            msg = rgb_stats_mismatch(ref() if ref else None, self.pretrained_rgb_stats)
            if msg:
                warnings.warn(msg, stacklevel=2)
                print_log(msg, logger="current", level=logging.WARNING)
        else:
            super().init_weights()
