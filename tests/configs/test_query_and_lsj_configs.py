"""DINO, Mask2Former and the LSJ-100e R-CNN recipe: what each config says, and each one trained,
tested and evaluated with COCO metrics on the synthetic set (narrow forms, a few iterations)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from helpers import ROOT, fail_text, load_config, mmdet_tool, random_detector, run_tool, tiny_any_config

TRAINED = {  # config: (detector, COCO metrics its evaluator reports)
    "dino-4scale_hieradet-s_12e_coco.py": ("DINO", ("bbox",)),
    "dino-5scale_hieradet-s_12e_coco.py": ("DINO", ("bbox",)),
    "mask2former_hieradet-s_lsj-50e_coco.py": ("Mask2Former", ("bbox", "segm")),
    "mask-rcnn_hieradet-s_lsj-100e_coco.py": ("MaskRCNN", ("bbox", "segm")),
    "cascade-mask-rcnn_hieradet-s_lsj-100e_coco.py": ("CascadeRCNN", ("bbox", "segm")),
}
PANOPTIC = "mask2former_hieradet-s_lsj-50e_coco-panoptic.py"
CONFIGS = sorted([*TRAINED, PANOPTIC])


def backbone_channels(cfg) -> list[int]:
    shared = load_config("_base_/hieradet_s.py").hieradet_s_channels
    return [shared[i] for i in cfg.model.backbone.out_indices]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_takes_the_shared_settings_and_resumes_anywhere(name):
    shared = load_config("_base_/hieradet_s.py")
    cfg = load_config(name)
    assert cfg.custom_imports == shared.custom_imports and cfg.custom_hooks == shared.custom_hooks
    backbone = dict(cfg.model.backbone)
    expected = dict(shared.hieradet_s_backbone)
    if name.startswith("dino-4scale"):
        expected["out_indices"] = (1, 2, 3)  # strides 8-32; ChannelMapper adds stride 64
    assert backbone == expected
    pre = cfg.model.data_preprocessor
    assert np.allclose(pre.mean, shared.hieradet_data_preprocessor.mean) and pre.bgr_to_rgb is True
    assert np.allclose(pre.std, shared.hieradet_data_preprocessor.std)
    takes = cfg.model.panoptic_head.in_channels if "mask2former" in name else cfg.model.neck.in_channels
    assert takes == backbone_channels(cfg)
    ow = cfg.optim_wrapper
    assert ow.constructor == "HieraDetLayerDecayConstructor" and ow.optimizer.type == "AdamW"
    assert cfg.default_hooks.checkpoint.type == "SafeCheckpointHook"
    assert not {"latest_interval_minutes", "latest_interval_iters"} & set(cfg.default_hooks.checkpoint)  # MMEngine's hook takes the rest
    iteration_based = "mask2former" in name
    assert cfg.train_cfg.type == ("ResumableIterBasedTrainLoop" if iteration_based else "ResumableEpochBasedTrainLoop")


def test_dino_keeps_dinos_optimizer_and_levels():
    four, five = load_config("dino-4scale_hieradet-s_12e_coco.py"), load_config("dino-5scale_hieradet-s_12e_coco.py")
    for cfg in (four, five):
        assert cfg.optim_wrapper.optimizer.weight_decay == 1e-4 and cfg.optim_wrapper.clip_grad.max_norm == 0.1
        assert cfg.train_cfg.max_epochs == 12 and cfg.model.num_queries == 900
    assert four.model.encoder.layer_cfg.self_attn_cfg.num_levels == 4 and four.model.neck.num_outs == 4
    assert five.model.num_feature_levels == 5 and five.model.neck.num_outs == 5
    assert five.model.encoder.layer_cfg.self_attn_cfg.num_levels == 5
    assert five.model.decoder.layer_cfg.cross_attn_cfg.num_levels == 5


def test_mask2former_keeps_its_schedule_and_clipping():
    for name in ("mask2former_hieradet-s_lsj-50e_coco.py", PANOPTIC):
        cfg = load_config(name)
        assert cfg.train_cfg.max_iters == 368750 and cfg.optim_wrapper.clip_grad.max_norm == 0.01
        keys = cfg.optim_wrapper.paramwise_cfg.custom_keys
        assert all(keys[k].decay_mult == 0.0 for k in ("query_embed", "query_feat", "level_embed"))
        assert cfg.default_hooks.checkpoint.by_epoch is False


@pytest.mark.parametrize("name", ["mask-rcnn_hieradet-s_lsj-100e_coco.py", "cascade-mask-rcnn_hieradet-s_lsj-100e_coco.py"])
def test_lsj_recipe_is_vitdets(name):
    cfg = load_config(name)
    train = cfg.train_dataloader.dataset
    assert train.type == "RepeatDataset" and train.times * cfg.train_cfg.max_epochs == 100
    jitter = next(t for t in train.dataset.pipeline if t.type == "RandomResize")
    assert jitter.scale == (1024, 1024) and jitter.ratio_range == (0.1, 2.0)
    assert cfg.model.data_preprocessor.batch_augments[0].size == (1024, 1024)
    ow = cfg.optim_wrapper
    assert ow.optimizer.lr == 1e-4 and ow.optimizer.weight_decay == 0.1 and cfg.auto_scale_lr.base_batch_size == 64
    assert ow.paramwise_cfg.layer_decay_rate == 0.75
    heads = cfg.model.roi_head.bbox_head
    for head in heads if isinstance(heads, list) else [heads]:
        assert head.type == "Shared4Conv1FCBBoxHead" and head.norm_cfg.type == "GN"
    assert cfg.model.rpn_head.num_convs == 2 and cfg.model.neck.norm_cfg.type == "GN"


# The two configs of test_train_py_resumes_..._and_evaluates are trained and evaluated there.
RESUMED = {"dino-4scale_hieradet-s_12e_coco.py": "ours", "mask2former_hieradet-s_lsj-50e_coco.py": "mmdetection's"}


@pytest.mark.parametrize("name", sorted(set(TRAINED) - set(RESUMED)))
def test_config_trains_tests_and_evaluates_with_coco_metrics(name, tmp_path):
    """MMDetection's own Runner through our prepare_config, as tools/train.py and tools/test.py run it."""
    from hieradet_mmdet.engine.runner import build_runner, prepare_config

    cfg = load_config(tiny_any_config(tmp_path, name, with_mask="segm" in TRAINED[name][1]))
    cfg.work_dir = str(tmp_path / "work")
    prepare_config(cfg)
    runner = build_runner(cfg)
    assert type(runner.model).__name__ == TRAINED[name][0]
    runner.train()
    assert runner.iter == 2
    metrics = runner.test()
    for kind in TRAINED[name][1]:
        value = metrics[f"coco/{kind}_mAP"]
        assert math.isfinite(value) and 0.0 <= value <= 1.0, metrics


@pytest.mark.parametrize("name, tool", sorted(RESUMED.items()))
def test_train_py_resumes_an_epoch_and_an_iteration_config_and_evaluates(name, tool, tmp_path):
    """Our tools/train.py on the epoch-based DINO, MMDetection's own on the iteration-based
    Mask2Former: train, resume, and the validation's COCO metrics."""
    config = tiny_any_config(tmp_path, name, with_mask="segm" in TRAINED[name][1])
    train = ROOT / "tools" / "train.py" if tool == "ours" else mmdet_tool("train.py")
    work = tmp_path / "work"
    iteration_based = "mask2former" in name
    length = "train_cfg.max_iters" if iteration_based else "train_cfg.max_epochs"
    proc = run_tool(train, config, "--work-dir", work, "--cfg-options", f"{length}=1", cwd=tmp_path)
    assert proc.returncode == 0, fail_text(proc)
    proc = run_tool(train, config, "--work-dir", work, "--resume", "--cfg-options", f"{length}=2", cwd=tmp_path)
    assert proc.returncode == 0, fail_text(proc)
    log = proc.stdout + proc.stderr
    resumed = "resumed epoch: 0, iter: 1" if iteration_based else "resumed epoch: 1, iter: 2"
    assert resumed in log, fail_text(proc)
    for kind in TRAINED[name][1]:
        values = [float(v) for v in re.findall(rf"coco/{kind}_mAP: ([0-9.]+)", log)]
        assert values and all(0.0 <= v <= 1.0 for v in values), fail_text(proc)


def panoptic_batch(num_things: int, seed: int = 0):
    """synthetic_batch's images and things, with a stuff region (class ``num_things``) in the
    bottom rows of each semantic map and everything else unlabelled (255)."""
    from mmengine.structures import PixelData

    from helpers import synthetic_batch

    batch = synthetic_batch(seed=seed)
    for sample in batch["data_samples"]:
        h, w = sample.img_shape
        sem = torch.full((1, h, w), 255, dtype=torch.long)
        sem[:, h - h // 4:] = num_things
        sample.gt_sem_seg = PixelData(sem_seg=sem)
    return batch


def test_panoptic_mask2former_trains_and_predicts_panoptic_segments():
    """One training step on an in-memory panoptic batch (things and a stuff class) and a panoptic
    prediction with the config's 80 thing and 53 stuff classes (narrow form); the dataset, PQ and the tools end
    to end: test_panoptic_config.py."""
    from mmengine.optim import build_optim_wrapper

    from narrow_configs import narrow_detector_config

    cfg = narrow_detector_config(load_config(PANOPTIC))
    head = cfg.model.panoptic_head
    things, stuff = head.num_things_classes, head.num_stuff_classes
    for augment in cfg.model.data_preprocessor.batch_augments:
        augment.size = (128, 128)
    model = random_detector(cfg)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    data = model.data_preprocessor(panoptic_batch(things), True)
    loss, log_vars = model.parse_losses(model(**data, mode="loss"))
    assert torch.isfinite(loss) and "loss_mask" in log_vars and "loss_dice" in log_vars, log_vars
    before = model.backbone.blocks[0].attn.qkv.weight.detach().clone()
    wrapper.update_params(loss)
    assert not torch.equal(before, model.backbone.blocks[0].attn.qkv.weight)

    model.eval()
    with torch.no_grad():
        results = model(**model.data_preprocessor(panoptic_batch(things, seed=1), False), mode="predict")
    for result in results:
        segments = result.pred_panoptic_seg.sem_seg
        assert tuple(segments.shape[-2:]) == result.ori_shape
        labels = segments % 1000  # MMDetection's panoptic ids: label + instance * INSTANCE_OFFSET
        assert int(labels.max()) <= things + stuff  # num_classes is the void label
