"""configs/swap/: HieraDet put into MMDetection's own two-stage, one-stage and cascade configs."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_trains_and_predicts, load_config, random_detector

SWAPS = {
    "swap/faster-rcnn_hieradet-s_fpn_1x_coco.py": ("FasterRCNN", False),
    "swap/fcos_hieradet-s_fpn_1x_coco.py": ("FCOS", False),
    "swap/cascade-mask-rcnn_hieradet-s_fpn_1x_coco.py": ("CascadeRCNN", True),
    "swap/deformable-detr-refine-twostage_hieradet-s_50e_coco.py": ("DeformableDETR", False),
}


@pytest.mark.parametrize("name", sorted(SWAPS))
def test_swap_config_trains_and_predicts(name):
    detector, with_mask = SWAPS[name]
    cfg = load_config(name)
    assert cfg.model.type == detector
    if cfg.model.get("encoder") is not None:  # two-stage DETR: 300 queries need more tokens than small images have
        from narrow_configs import narrow_detector_config

        narrow_detector_config(cfg)
    model = random_detector(cfg)
    assert type(model.backbone).__name__ == "HieraDetBackbone"
    assert_trains_and_predicts(model, cfg.optim_wrapper, with_mask=with_mask)


@pytest.mark.parametrize("name", sorted(SWAPS))
def test_swap_config_matches_shared_settings(name):
    """The swaps take the shared HieraDet-S settings (they change the five things docs/configs.md lists)."""
    shared = load_config("_base_/hieradet_s.py")
    cfg = load_config(name)
    assert cfg.custom_imports == shared.custom_imports and cfg.custom_hooks == shared.custom_hooks
    backbone = dict(cfg.model.backbone)
    indices = backbone.pop("out_indices")
    assert backbone == {k: v for k, v in shared.hieradet_s_backbone.items() if k in backbone and k != "out_indices"}
    assert cfg.model.backbone.init_cfg == shared.hieradet_s_backbone.init_cfg
    assert cfg.model.neck.in_channels == [shared.hieradet_s_channels[i] for i in indices]
    pre = cfg.model.data_preprocessor
    assert np.allclose(pre.mean, shared.hieradet_data_preprocessor.mean)
    assert np.allclose(pre.std, shared.hieradet_data_preprocessor.std)
    assert pre.bgr_to_rgb is True
    assert cfg.optim_wrapper.constructor == shared.hieradet_optim_wrapper.constructor
    if cfg.model.get("encoder") is None:
        assert cfg.optim_wrapper.optimizer == shared.hieradet_optim_wrapper.optimizer
        assert cfg.auto_scale_lr == shared.hieradet_auto_scale_lr
    else:  # Deformable DETR's own optimizer settings: lr 2e-4 for a batch of 32, clipping, x0.1 offsets
        detr = shared.hieradet_detr_optim_wrapper
        assert cfg.optim_wrapper.optimizer == dict(detr.optimizer, lr=2e-4)
        assert cfg.optim_wrapper.clip_grad == detr.clip_grad and cfg.auto_scale_lr.base_batch_size == 32
        assert cfg.optim_wrapper.paramwise_cfg.custom_keys.sampling_offsets.lr_mult == 0.1


USER_SWAP = """
_base_ = 'mmdet::{base}'
custom_imports = dict(imports=['hieradet_mmdet'], allow_failed_imports=False)
custom_hooks = [dict(type='HieraDetCheckHook')]
model = dict(
    data_preprocessor=dict(mean=[0.5191 * 255, 0.5306 * 255, 0.4877 * 255],
                           std=[0.2316 * 255, 0.2304 * 255, 0.2588 * 255], bgr_to_rgb=True),
    backbone=dict(_delete_=True, type='HieraDet', arch='small', out_indices={indices}, drop_path_rate=0.2,
                  init_cfg=None),
    {takes})
optim_wrapper = dict(
    _delete_=True, type='OptimWrapper', constructor='HieraDetLayerDecayConstructor',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4),
    paramwise_cfg=dict(layer_decay_rate=0.85), clip_grad=dict(max_norm=0.1, norm_type=2))
"""
QUERY_BASED = {  # MMDetection config: (backbone stages, what takes them, predicts masks)
    "dino/dino-4scale_r50_8xb2-12e_coco.py": ((1, 2, 3), "neck=dict(in_channels=[192, 384, 768])", False),
    "deformable_detr/deformable-detr-refine-twostage_r50_16xb2-50e_coco.py":
        ((1, 2, 3), "neck=dict(in_channels=[192, 384, 768])", False),
    "mask2former/mask2former_r50_8xb2-lsj-50e_coco.py":
        ((0, 1, 2, 3), "panoptic_head=dict(in_channels=[96, 192, 384, 768])", True),
}


@pytest.mark.parametrize("base", sorted(QUERY_BASED))
def test_five_step_swap_into_mmdetections_query_based_configs(base, tmp_path):
    """docs/configs.md's five steps in a user's own config outside the repository, on MMDetection's
    DINO, Deformable DETR and Mask2Former configs (narrow, for a train step and a prediction)."""
    from mmengine.config import Config

    from narrow_configs import narrow_detector_config
    from hieradet_mmdet.engine.checks import check_detector

    indices, takes, with_mask = QUERY_BASED[base]
    path = tmp_path / "my_config.py"
    path.write_text(USER_SWAP.format(base=base, indices=indices, takes=takes))
    cfg = Config.fromfile(str(path))
    model = random_detector(narrow_detector_config(cfg))
    check_detector(model)  # what HieraDetCheckHook runs: the backbone's stages fit what takes them
    assert type(model.backbone).__name__ == "HieraDetBackbone"
    assert_trains_and_predicts(model, cfg.optim_wrapper, with_mask=with_mask)
