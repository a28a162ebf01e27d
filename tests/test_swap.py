"""configs/swap/: HieraDet put into MMDetection's own two-stage, one-stage and cascade configs;
and the build-time check that catches a neck left at ResNet's channels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_configs import assert_trains_and_predicts, build_detector, load_config

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
    model = build_detector(cfg)
    assert type(model.backbone).__name__ == "HieraDetBackbone"
    assert_trains_and_predicts(model, cfg.optim_wrapper, with_mask=with_mask)


@pytest.mark.parametrize("name", sorted(SWAPS))
def test_swap_config_matches_shared_settings(name):
    """The swap examples are self-contained for copying; they must not drift from configs/_base_."""
    shared = load_config("_base_/hieradet_s.py")
    cfg = load_config(name)
    assert cfg.custom_imports == shared.custom_imports
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


def resnet_neck_config():
    """The faster-rcnn swap with the one line users forget: the neck keeps R50's channels."""
    cfg = load_config("swap/faster-rcnn_hieradet-s_fpn_1x_coco.py")
    cfg.model.neck.in_channels = [256, 512, 1024, 2048]
    return cfg


def test_neck_mismatch_fails_at_build():
    expected = ("neck.in_channels [256, 512, 1024, 2048] do not match HieraDet(small) outputs "
                "[96, 192, 384, 768]")
    with pytest.raises(ValueError, match=r"set model\.neck\.in_channels=\[96, 192, 384, 768\]") as err:
        build_detector(resnet_neck_config())
    assert expected in str(err.value)


def test_neck_mismatch_with_start_level_and_out_indices():
    from hieradet_mmdet.validate import check_detector, uninstall_build_checks, install_build_checks

    # RetinaNet's FPN skips level 0 but still lists it: listing only the used levels is wrong.
    cfg = load_config("retinanet_hieradet_s.py")
    cfg.model.neck.in_channels = [192, 384, 768]
    with pytest.raises(ValueError, match="including the 1 that start_level=1 skips"):
        build_detector(cfg)
    # Or the three-level list is intended, and the backbone should return three levels.
    cfg.model.neck.start_level = 0
    with pytest.raises(ValueError, match=r"model\.backbone\.out_indices=\(1, 2, 3\)"):
        build_detector(cfg)
    cfg.model.backbone.out_indices = (1, 2, 3)
    check_detector(build_detector(cfg))

    # check_detector alone (e.g. when the automatic check is switched off) says the same.
    uninstall_build_checks()
    try:
        model = build_detector(resnet_neck_config())
    finally:
        install_build_checks()
    with pytest.raises(ValueError, match=r"set model\.neck\.in_channels=\[96, 192, 384, 768\]"):
        check_detector(model)


def test_build_check_ignores_other_backbones():
    """Models without HieraDet are untouched by the hook, whatever their neck."""
    from mmengine.registry import init_default_scope
    from mmdet.registry import MODELS

    init_default_scope("mmdet")
    neck = MODELS.build(dict(type="FPN", in_channels=[8, 16], out_channels=8, num_outs=2))
    parent = torch.nn.Module()
    parent.backbone = torch.nn.Conv2d(3, 8, 1)
    parent.neck = neck  # no error: not our backbone


def test_preprocessing_warning_for_caffe_style():
    from hieradet_mmdet.validate import check_detector

    cfg = load_config("swap/faster-rcnn_hieradet-s_fpn_1x_coco.py")
    cfg.model.data_preprocessor.update(mean=[103.53, 116.28, 123.675], std=[1.0, 1.0, 1.0], bgr_to_rgb=False)
    model = build_detector(cfg)
    with pytest.warns(UserWarning, match="std is 1") as record:
        check_detector(model)
    assert any("bgr_to_rgb is False" in str(w.message) for w in record), [str(w.message) for w in record]
