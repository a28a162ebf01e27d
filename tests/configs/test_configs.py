"""This repository's detection configs: they load, build, train one step on CPU and predict."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import assert_trains_and_predicts, load_config, random_detector

MAIN_CONFIGS = ["maskrcnn_hieradet_s.py", "retinanet_hieradet_s.py", "maskrcnn_hieradet_s_ms-3x.py"]
HAS_MASK = {"maskrcnn_hieradet_s.py": True, "retinanet_hieradet_s.py": False,
            "maskrcnn_hieradet_s_ms-3x.py": True}


@pytest.mark.parametrize("name", MAIN_CONFIGS)
def test_config_contents(name, tmp_path):
    from birder.data.transforms.classification import get_rgb_stats
    from mmengine.config import Config

    cfg = load_config(name)
    assert cfg.custom_imports == dict(imports=["hieradet_mmdet"], allow_failed_imports=False)
    assert dict(type="HieraDetCheckHook") in cfg.custom_hooks
    bb = cfg.model.backbone
    assert bb.type == "HieraDet" and bb.arch == "small" and 0.2 <= bb.drop_path_rate <= 0.3
    assert bb.init_cfg == dict(type="Pretrained", checkpoint="hieradet_d_small_dino-v2-imagenet12k")
    assert not {"depth", "style", "norm_eval", "norm_cfg", "num_stages"} & set(bb), "ResNet keys left over"
    neck = cfg.model.neck
    assert neck.type == "FPN" and neck.in_channels == [96, 192, 384, 768]
    assert neck.out_channels == 256 and neck.num_outs == 5
    pre = cfg.model.data_preprocessor
    assert pre.bgr_to_rgb is True
    # birder's own statistics (its "birder" rgb mode, the published recipe's), x255 for 0-255 pixels
    stats = get_rgb_stats("birder")
    assert np.allclose(pre.mean, [255 * v for v in stats["mean"]]) and np.allclose(pre.std, [255 * v for v in stats["std"]])

    ow = cfg.optim_wrapper
    assert ow.constructor == "HieraDetLayerDecayConstructor" and ow.type == "OptimWrapper"
    assert ow.optimizer == dict(type="AdamW", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05)
    assert 0.8 <= ow.paramwise_cfg.layer_decay_rate <= 0.9
    assert cfg.auto_scale_lr == dict(enable=True, base_batch_size=16)
    warmup = cfg.param_scheduler[0]
    assert warmup.type == "LinearLR" and warmup.by_epoch is False

    if name.startswith("retinanet"):
        assert cfg.model.type == "RetinaNet"
        assert neck.start_level == 1 and neck.add_extra_convs == "on_input"
    else:
        assert cfg.model.type == "MaskRCNN"
    if "3x" in name:
        train = cfg.train_dataloader.dataset
        assert train.type == "RepeatDataset" and train.times == 3
        assert any(t.type == "RandomResize" for t in train.dataset.pipeline)
        assert cfg.train_cfg.max_epochs == 12
    else:
        assert cfg.train_cfg.max_epochs == 12 and cfg.train_dataloader.dataset.type == "CocoDataset"

    # The Runner writes the merged config into the work dir; it must read back the same.
    cfg.dump(str(tmp_path / "dumped.py"))
    again = Config.fromfile(str(tmp_path / "dumped.py"))
    assert again.model.to_dict() == cfg.model.to_dict() and again.optim_wrapper == cfg.optim_wrapper


def test_maskrcnn_trains_and_predicts():
    cfg = load_config("maskrcnn_hieradet_s.py")
    model = random_detector(cfg.copy())
    assert model.backbone.out_channels == [96, 192, 384, 768]
    assert_trains_and_predicts(model, cfg.optim_wrapper, with_mask=True)


def test_retinanet_trains_and_predicts():
    cfg = load_config("retinanet_hieradet_s.py")
    model = random_detector(cfg)
    assert len(model.neck.fpn_convs) == 5
    assert_trains_and_predicts(model, cfg.optim_wrapper, with_mask=False)


def test_3x_config_is_the_1x_model():
    """The 3x config changes data, schedule and nothing in the model or optimizer, so the 1x
    Mask R-CNN test above covers its build, training step and prediction."""
    one, three = load_config("maskrcnn_hieradet_s.py"), load_config("maskrcnn_hieradet_s_ms-3x.py")
    assert three.model.to_dict() == one.model.to_dict()
    assert three.optim_wrapper == one.optim_wrapper and three.auto_scale_lr == one.auto_scale_lr
    milestones = next(s for s in three.param_scheduler if s.type == "MultiStepLR").milestones
    assert milestones == [9, 11]


def test_wrong_arch_fails_with_choices():
    cfg = load_config("maskrcnn_hieradet_s.py")
    cfg.model.backbone.arch = "smal"
    with pytest.raises(ValueError, match="Unknown HieraDet arch 'smal'; choose one of tiny, small"):
        random_detector(cfg)


def test_detector_roi_features_are_right():
    """mmcv's CPU RoIAlign reads its input as contiguous NCHW without checking: the backbone must
    hand MMDetection contiguous maps, or every RoI feature is scrambled."""
    cfg = load_config("maskrcnn_hieradet_s.py")
    model = random_detector(cfg).eval()
    with torch.no_grad():
        feats = model.extract_feat(torch.randn(1, 3, 96, 128))
        assert all(f.is_contiguous() for f in model.backbone(torch.randn(1, 3, 96, 128)))
        ext = model.roi_head.bbox_roi_extractor
        boxes = torch.tensor([[0, 8.0, 8.0, 60.0, 60.0], [0, 30.0, 20.0, 100.0, 90.0]])
        got = ext(feats[:ext.num_inputs], boxes)
        expected = ext([f.contiguous() for f in feats[:ext.num_inputs]], boxes)
    assert torch.allclose(got, expected)
