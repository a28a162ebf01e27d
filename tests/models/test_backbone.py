"""The registered backbone: init_cfg through a real MMDetection detector, and that detector's own
checkpoint read back."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch

from helpers import assert_close_rel
from hieradet_mmdet.engine.checks import check_detector

SIZE = (96, 160)


@pytest.fixture(scope="module")
def reference_features(birder_pair):
    x = torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return x, list(birder_pair["d_small"].detection_features(x).values())


def small_retinanet(init_cfg, mean=(0, 0, 0), std=(1, 1, 1), bgr_to_rgb=False):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules()
    return MODELS.build(dict(
        type="RetinaNet",
        data_preprocessor=dict(type="DetDataPreprocessor", mean=list(mean), std=list(std), bgr_to_rgb=bgr_to_rgb,
                               pad_size_divisor=32),
        backbone=dict(type="HieraDet", arch="d_small", out_indices=(1, 2, 3), init_cfg=init_cfg),
        neck=dict(type="FPN", in_channels=[192, 384, 768], out_channels=32, num_outs=3),
        bbox_head=dict(
            type="RetinaHead", num_classes=2, in_channels=32, stacked_convs=1, feat_channels=32,
            anchor_generator=dict(type="AnchorGenerator", octave_base_scale=4, scales_per_octave=1,
                                  ratios=[1.0], strides=[8, 16, 32]),
            bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
            loss_cls=dict(type="FocalLoss", use_sigmoid=True), loss_bbox=dict(type="L1Loss")),
        test_cfg=dict(nms_pre=100, score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5), max_per_img=10)))


def test_detector_init_cfg_and_its_saved_checkpoint(birder_files, reference_features, tmp_path):
    from mmengine.runner.checkpoint import get_state_dict, save_checkpoint, weights_to_cpu

    x, ref = reference_features
    detector = small_retinanet(dict(type="Pretrained", checkpoint=str(birder_files["pt"])))
    stats = birder_files["rgb_stats"]
    want_mean = [round(255 * v, 4) for v in stats["mean"]]
    detector.init_weights()
    with pytest.warns(UserWarning, match="trained with rgb_stats") as record:
        check_detector(detector)  # mean 0 / std 1 is not what the checkpoint's rgb_stats say
    message = next(str(w.message) for w in record if "trained with rgb_stats" in str(w.message))
    assert f"set model.data_preprocessor.mean={want_mean}" in message
    assert {k: list(v) for k, v in detector.backbone.pretrained_rgb_stats.items()} == \
        {k: list(v) for k, v in stats.items()}
    detector.eval()
    with torch.no_grad():
        assert_close_rel(detector.backbone(x), ref[1:])

    # What mmengine's Runner writes for this detector, read back through another init_cfg.
    path = tmp_path / "epoch_1.pth"
    save_checkpoint({"meta": {"epoch": 1}, "state_dict": weights_to_cpu(get_state_dict(detector))}, str(path))
    fresh = small_retinanet(dict(type="Pretrained", checkpoint=str(path)))
    fresh.init_weights()  # an MMDetection checkpoint carries no rgb_stats: nothing to compare
    assert fresh.backbone.pretrained_rgb_stats is None
    fresh.eval()
    with torch.no_grad():
        assert_close_rel(fresh.backbone(x), ref[1:])

    # Preprocessing as the checkpoint says: no warning (any warning would fail this block).
    matching = small_retinanet(dict(type="Pretrained", checkpoint=str(birder_files["safetensors"])),
                               mean=[255 * v for v in stats["mean"]], std=[255 * v for v in stats["std"]], bgr_to_rgb=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        matching.init_weights()
        check_detector(matching)
    pickle.dumps(matching)
    matching.eval()
    with torch.no_grad():
        assert_close_rel(matching.backbone(x), ref[1:])
