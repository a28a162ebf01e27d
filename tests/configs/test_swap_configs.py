"""configs/swap/: HieraDet put into MMDetection's own two-stage, one-stage and cascade configs."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_trains_and_predicts, load_config, random_detector

SWAPS = {
    "swap/faster-rcnn_hieradet-s_fpn_1x_coco.py": ("FasterRCNN", False),
    "swap/fcos_hieradet-s_fpn_1x_coco.py": ("FCOS", False),
    "swap/cascade-mask-rcnn_hieradet-s_fpn_1x_coco.py": ("CascadeRCNN", True),
}


@pytest.mark.parametrize("name", sorted(SWAPS))
def test_swap_config_trains_and_predicts(name):
    detector, with_mask = SWAPS[name]
    cfg = load_config(name)
    assert cfg.model.type == detector
    model = random_detector(cfg)
    assert type(model.backbone).__name__ == "HieraDetBackbone"
    assert_trains_and_predicts(model, cfg.optim_wrapper, with_mask=with_mask)


@pytest.mark.parametrize("name", sorted(SWAPS))
def test_swap_config_matches_shared_settings(name):
    """The swaps take the shared HieraDet-S settings (they change the five things docs/configs.md lists)."""
    shared = load_config("_base_/hieradet_s.py")
    cfg = load_config(name)
    assert cfg.custom_imports == shared.custom_imports and cfg.custom_hooks == shared.custom_hooks
    assert {k: v for k, v in cfg.model.backbone.items()} == {
        k: v for k, v in shared.hieradet_s_backbone.items() if k in cfg.model.backbone}
    assert cfg.model.backbone.init_cfg == shared.hieradet_s_backbone.init_cfg
    assert cfg.model.neck.in_channels == shared.hieradet_s_channels
    pre = cfg.model.data_preprocessor
    assert np.allclose(pre.mean, shared.hieradet_data_preprocessor.mean)
    assert np.allclose(pre.std, shared.hieradet_data_preprocessor.std)
    assert pre.bgr_to_rgb is True
    assert cfg.optim_wrapper.optimizer == shared.hieradet_optim_wrapper.optimizer
    assert cfg.optim_wrapper.constructor == shared.hieradet_optim_wrapper.constructor
    assert cfg.auto_scale_lr == shared.hieradet_auto_scale_lr
