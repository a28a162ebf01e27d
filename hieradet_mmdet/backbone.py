"""MMDetection glue: registers the trunk as ``type='HieraDet'`` and loads ``init_cfg`` weights."""

from __future__ import annotations

import copy

from mmengine.model import BaseModule
from mmdet.registry import MODELS

from .hieradet import HieraDet


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

    def forward(self, x):
        # The trunk hands out NCHW views of channels-last memory. Convolutions keep that layout,
        # and mmcv's CPU RoIAlign/RoIPool index their input as contiguous NCHW without checking,
        # so FPN maps derived from views would scramble every RoI feature: hand MMDetection
        # contiguous maps.
        return tuple(out.contiguous() for out in super().forward(x))

    def init_weights(self) -> None:
        if self.init_cfg and self.init_cfg.get("type") == "Pretrained":
            from .checkpoint import load_backbone_weights

            load_backbone_weights(self, self.init_cfg["checkpoint"])
            self._is_init = True
        else:
            super().init_weights()
