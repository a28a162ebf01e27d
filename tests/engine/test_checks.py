"""check_detector and HieraDetCheckHook: a neck left at ResNet's channels or Caffe-style
preprocessing is caught before anything runs, in any runner."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers import load_config, random_detector
from hieradet_mmdet.engine.checks import HieraDetCheckHook, check_detector

RESNET_NECK_ERROR = ("neck.in_channels [256, 512, 1024, 2048] do not match HieraDet(small) outputs "
                     "[96, 192, 384, 768]")


def resnet_neck_detector():
    """The faster-rcnn swap with the one line users forget: the neck keeps R50's channels."""
    cfg = load_config("swap/faster-rcnn_hieradet-s_fpn_1x_coco.py")
    cfg.model.neck.in_channels = [256, 512, 1024, 2048]
    return random_detector(cfg)


def test_neck_mismatch_is_refused_by_check_detector_and_the_hook():
    model = resnet_neck_detector()
    with pytest.raises(ValueError, match=r"set model\.neck\.in_channels=\[96, 192, 384, 768\]") as err:
        check_detector(model)
    assert RESNET_NECK_ERROR in str(err.value)
    hook = HieraDetCheckHook()
    with pytest.raises(ValueError, match=r"set model\.neck\.in_channels=\[96, 192, 384, 768\]"):
        hook.before_run(SimpleNamespace(model=model))  # what every runner calls first
    wrapped = torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.parallel.DistributedDataParallel)
    torch.nn.Module.__init__(wrapped)
    wrapped.module = model
    with pytest.raises(ValueError, match="do not match"):
        check_detector(wrapped)  # inside a data-parallel wrapper too


def test_neck_mismatch_with_start_level_and_out_indices():
    # RetinaNet's FPN skips level 0 but still lists it: listing only the used levels is wrong.
    cfg = load_config("retinanet_hieradet_s.py")
    cfg.model.neck.in_channels = [192, 384, 768]
    with pytest.raises(ValueError, match="including the 1 that start_level=1 skips"):
        check_detector(random_detector(cfg.copy()))
    # Or the three-level list is intended, and the backbone should return three levels.
    cfg.model.neck.start_level = 0
    with pytest.raises(ValueError, match=r"model\.backbone\.out_indices=\(1, 2, 3\)"):
        check_detector(random_detector(cfg.copy()))
    cfg.model.backbone.out_indices = (1, 2, 3)
    assert check_detector(random_detector(cfg.copy()), warn=False) is not None


def test_models_without_hieradet_pass_untouched():
    from mmengine.registry import init_default_scope

    from mmdet.registry import MODELS

    init_default_scope("mmdet")
    model = torch.nn.Module()
    model.backbone = torch.nn.Conv2d(3, 8, 1)
    model.neck = MODELS.build(dict(type="FPN", in_channels=[8, 16], out_channels=8, num_outs=2))
    assert check_detector(model) is model  # a mismatched neck, but not on our backbone: not ours to judge
    HieraDetCheckHook().before_run(SimpleNamespace(model=model))


def test_preprocessing_warning_for_caffe_style():
    cfg = load_config("swap/faster-rcnn_hieradet-s_fpn_1x_coco.py")
    cfg.model.data_preprocessor.update(mean=[103.53, 116.28, 123.675], std=[1.0, 1.0, 1.0], bgr_to_rgb=False)
    model = random_detector(cfg)
    with pytest.warns(UserWarning, match="std is 1") as record:
        HieraDetCheckHook().before_train(SimpleNamespace(model=model))
    assert any("bgr_to_rgb is False" in str(w.message) for w in record), [str(w.message) for w in record]
