"""This repo's detection configs: they load, build, train one step on CPU, predict; plus the
layer-decay optimizer constructor.

The helpers at the top (building a detector from a config without weights, a tiny synthetic
COCO-like batch, one real optimisation step) are shared with test_swap.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")

# Small train/test sizes so a two-stage step takes a fraction of a second on CPU.
FAST_RPN_PROPOSALS = dict(nms_pre=200, max_per_img=100)


def load_config(name: str):
    from mmengine.config import Config

    return Config.fromfile(os.path.join(CONFIGS, name))


def shrink_two_stage(cfg) -> None:
    """Fewer proposals and RoI samples; the model is unchanged, only its train/test settings."""
    tr, te = cfg.model.get("train_cfg"), cfg.model.get("test_cfg")
    if tr is not None and "rpn_proposal" in tr:
        tr.rpn_proposal.update(FAST_RPN_PROPOSALS)
        stages = tr.rcnn if isinstance(tr.rcnn, list) else [tr.rcnn]
        for stage in stages:
            stage.sampler.num = 64
    if te is not None and "rpn" in te:
        te.rpn.update(FAST_RPN_PROPOSALS)


def build_detector(cfg):
    """The config's detector on CPU with random backbone weights (no checkpoint in tests)."""
    from mmengine.registry import init_default_scope
    from mmdet.registry import MODELS

    import hieradet_mmdet  # noqa: F401  (what custom_imports does in the tools)

    init_default_scope(cfg.get("default_scope", "mmdet"))
    cfg.model.backbone.init_cfg = None
    shrink_two_stage(cfg)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model


IMAGE_SIZES = ((64, 96), (96, 64))  # (h, w); small keeps a two-stage step around a second or two


def synthetic_batch(sizes=IMAGE_SIZES, with_mask=True, seed=0):
    """A data batch as a dataloader gives it: uint8 CHW images and packed DetDataSamples,
    each image with two boxes (and their masks) of classes 0 and 3."""
    from mmengine.structures import InstanceData
    from mmdet.structures import DetDataSample
    from mmdet.structures.bbox import HorizontalBoxes
    from mmdet.structures.mask import BitmapMasks

    gen = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for i, (h, w) in enumerate(sizes):
        inputs.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen))
        boxes = torch.tensor([[8.0, 10.0, w * 0.6, h * 0.7], [w * 0.4, h * 0.3, w - 4.0, h - 6.0]])
        sample = DetDataSample(metainfo=dict(img_id=i, img_shape=(h, w), ori_shape=(h, w),
                                             scale_factor=(1.0, 1.0), flip=False, flip_direction=None))
        gt = InstanceData(bboxes=HorizontalBoxes(boxes), labels=torch.tensor([0, 3]))
        if with_mask:
            masks = np.zeros((2, h, w), dtype=np.uint8)
            for m, (x1, y1, x2, y2) in zip(masks, boxes.round().int().tolist()):
                m[y1:y2, x1:x2] = 1
            gt.masks = BitmapMasks(masks, h, w)
        sample.gt_instances = gt
        sample.ignored_instances = InstanceData(bboxes=HorizontalBoxes(torch.zeros(0, 4)),
                                                labels=torch.zeros(0, dtype=torch.long))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def train_step_and_predict(model, optim_wrapper_cfg, with_mask=True):
    """One optimisation step with the config's optimizer, then predict; returns facts to assert on."""
    from mmengine.optim import build_optim_wrapper

    optim_wrapper = build_optim_wrapper(model, optim_wrapper_cfg)
    model.train()
    data = model.data_preprocessor(synthetic_batch(with_mask=with_mask), True)
    optim_wrapper.zero_grad()
    with optim_wrapper.optim_context(model):  # autocast under AmpOptimWrapper
        losses = model(**data, mode="loss")
    loss, log_vars = model.parse_losses(losses)
    optim_wrapper.backward(loss)  # loss scaling under AmpOptimWrapper
    bb = model.backbone
    grads = {
        "patch_embed": bb.patch_embed.weight.grad,
        "block0": bb.blocks[0].attn.qkv.weight.grad,
        "last_block": bb.blocks[-1].mlp.fc2.weight.grad,
    }
    before = bb.blocks[0].attn.qkv.weight.detach().clone()
    optim_wrapper.step()
    moved = not torch.equal(before, bb.blocks[0].attn.qkv.weight.detach())

    model.eval()
    with torch.no_grad():
        data = model.data_preprocessor(synthetic_batch(with_mask=with_mask, seed=1), False)
        results = model(**data, mode="predict")
    return dict(loss=loss.detach(), log_vars=log_vars, grads=grads, moved=moved, results=results,
                optim_wrapper=optim_wrapper)


def assert_trains_and_predicts(model, optim_wrapper_cfg, with_mask=True):
    out = train_step_and_predict(model, optim_wrapper_cfg, with_mask=with_mask)
    assert torch.isfinite(out["loss"]), out["log_vars"]
    for name, grad in out["grads"].items():
        assert grad is not None and torch.isfinite(grad).all(), f"no finite gradient at backbone {name}"
        assert grad.abs().sum() > 0, f"zero gradient at backbone {name}"
    assert out["moved"], "the optimizer step did not change backbone block 0"
    results = out["results"]
    assert len(results) == 2
    for r, (h, w) in zip(results, IMAGE_SIZES):
        pred = r.pred_instances
        assert pred.bboxes.shape[-1] == 4 and len(pred.scores) == len(pred.labels) == len(pred.bboxes)
        assert r.ori_shape == (h, w)
        if with_mask:
            assert "masks" in pred and tuple(pred.masks.shape[-2:]) == (h, w)
    return out


# ---------------------------------------------------------------------------------------------
# tests

MAIN_CONFIGS = ["maskrcnn_hieradet_s.py", "retinanet_hieradet_s.py", "maskrcnn_hieradet_s_ms-3x.py"]
HAS_MASK = {"maskrcnn_hieradet_s.py": True, "retinanet_hieradet_s.py": False,
            "maskrcnn_hieradet_s_ms-3x.py": True}
BIRDER_MEAN = [0.5191 * 255, 0.5306 * 255, 0.4877 * 255]
BIRDER_STD = [0.2316 * 255, 0.2304 * 255, 0.2588 * 255]


@pytest.fixture(scope="module")
def maskrcnn():
    cfg = load_config("maskrcnn_hieradet_s.py")
    return cfg, build_detector(cfg.copy())


@pytest.mark.parametrize("name", MAIN_CONFIGS)
def test_config_contents(name, tmp_path):
    from mmengine.config import Config

    cfg = load_config(name)
    assert cfg.custom_imports == dict(imports=["hieradet_mmdet"], allow_failed_imports=False)
    bb = cfg.model.backbone
    assert bb.type == "HieraDet" and bb.arch == "small" and 0.2 <= bb.drop_path_rate <= 0.3
    assert bb.init_cfg == dict(type="Pretrained", checkpoint="hieradet_d_small_dino-v2-imagenet12k")
    assert not {"depth", "style", "norm_eval", "norm_cfg", "num_stages"} & set(bb), "ResNet keys left over"
    neck = cfg.model.neck
    assert neck.type == "FPN" and neck.in_channels == [96, 192, 384, 768]
    assert neck.out_channels == 256 and neck.num_outs == 5
    pre = cfg.model.data_preprocessor
    assert pre.bgr_to_rgb is True
    assert np.allclose(pre.mean, BIRDER_MEAN) and np.allclose(pre.std, BIRDER_STD)

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


def test_maskrcnn_trains_and_predicts(maskrcnn):
    cfg, model = maskrcnn
    assert model.backbone.out_channels == [96, 192, 384, 768]
    assert_trains_and_predicts(model, cfg.optim_wrapper, with_mask=True)


def test_retinanet_trains_and_predicts():
    cfg = load_config("retinanet_hieradet_s.py")
    model = build_detector(cfg)
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


def group_of(optim_wrapper, param):
    # optim_wrapper.param_groups would add MMEngine's parameter-less "base" group at the end.
    return next(g for g in optim_wrapper.optimizer.param_groups if any(p is param for p in g["params"]))


def test_layer_decay_param_groups(maskrcnn):
    from mmengine.optim import build_optim_wrapper

    cfg, model = maskrcnn
    ow = build_optim_wrapper(model, cfg.optim_wrapper)
    base_lr, base_wd = 1e-4, 0.05
    rate = cfg.optim_wrapper.paramwise_cfg.layer_decay_rate
    bb = model.backbone
    n = len(bb.blocks) + 1
    assert len(bb.blocks) == 16

    def lr_wd(param):
        g = group_of(ow, param)
        return g["lr"], g["weight_decay"]

    # Embeddings: deepest decay; position embeddings without weight decay.
    assert lr_wd(bb.patch_embed.weight) == pytest.approx((base_lr * rate ** n, base_wd))
    assert lr_wd(bb.patch_embed.bias) == pytest.approx((base_lr * rate ** n, 0.0))
    assert lr_wd(bb.pos_embed) == pytest.approx((base_lr * rate ** n, 0.0))
    assert lr_wd(bb.pos_embed_window) == pytest.approx((base_lr * rate ** n, 0.0))
    # Block i: rate ** (n - (i + 1)); norms and biases without weight decay.
    for i in (0, 7, 15):
        blk = bb.blocks[i]
        assert lr_wd(blk.attn.qkv.weight) == pytest.approx((base_lr * rate ** (n - i - 1), base_wd))
        assert lr_wd(blk.attn.qkv.bias) == pytest.approx((base_lr * rate ** (n - i - 1), 0.0))
        assert lr_wd(blk.norm1.weight) == pytest.approx((base_lr * rate ** (n - i - 1), 0.0))
    assert lr_wd(bb.blocks[15].mlp.fc1.weight)[0] == pytest.approx(base_lr * rate)
    # Neck and heads: full lr.
    neck_conv = model.neck.lateral_convs[0].conv
    assert lr_wd(neck_conv.weight) == pytest.approx((base_lr, base_wd))
    assert lr_wd(neck_conv.bias) == pytest.approx((base_lr, 0.0))
    assert lr_wd(model.roi_head.bbox_head.fc_cls.weight) == pytest.approx((base_lr, base_wd))
    # Every trainable parameter exactly once; the logged (first) group has the full lr.
    groups = ow.optimizer.param_groups
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped})
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters() if p.requires_grad}
    assert groups[0]["lr"] == pytest.approx(base_lr) and ow.get_lr()["lr"][0] == pytest.approx(base_lr)
    assert groups[-1]["lr"] == pytest.approx(base_lr * rate ** n)
    # Parameters sharing (lr, weight decay) share a group: 2 per layer at most, not 1 per tensor.
    assert len(groups) <= 2 * (n + 1)
    assert type(ow.optimizer).__name__ == "AdamW"


def test_layer_decay_options_and_frozen_stages():
    from mmengine.optim import build_optim_wrapper

    cfg = load_config("retinanet_hieradet_s.py")
    cfg.model.backbone.frozen_stages = 1
    model = build_detector(cfg)
    ow_cfg = cfg.optim_wrapper.copy()
    ow_cfg.paramwise_cfg = dict(layer_decay_rate=0.5, num_layers=4, custom_keys={"bbox_head": dict(lr_mult=2.0)})
    ow = build_optim_wrapper(model, ow_cfg)
    bb = model.backbone
    grouped = {id(p) for g in ow.optimizer.param_groups for p in g["params"]}
    # Frozen: patch embedding, position embeddings and block 0 (stage 1) are not optimised.
    assert id(bb.patch_embed.weight) not in grouped and id(bb.pos_embed) not in grouped
    assert id(bb.blocks[0].attn.qkv.weight) not in grouped
    # num_layers=4: block 1 is layer 2 -> 0.5**2, blocks from 3 on are clamped to layer 4 -> 1.
    assert group_of(ow, bb.blocks[1].attn.qkv.weight)["lr"] == pytest.approx(1e-4 * 0.25)
    assert group_of(ow, bb.blocks[10].attn.qkv.weight)["lr"] == pytest.approx(1e-4)
    # Defaults when not given: norms/biases still without weight decay.
    assert group_of(ow, bb.blocks[1].norm2.bias)["weight_decay"] == 0.0
    assert group_of(ow, model.bbox_head.retina_cls.weight)["lr"] == pytest.approx(2e-4)

    with pytest.raises(ValueError, match="unknown paramwise_cfg keys \\['bias_lr_mult'\\]"):
        build_optim_wrapper(model, dict(cfg.optim_wrapper, paramwise_cfg=dict(bias_lr_mult=2.0)))
    with pytest.raises(ValueError, match="layer_decay_rate"):
        build_optim_wrapper(model, dict(cfg.optim_wrapper, paramwise_cfg=dict(layer_decay_rate=0.0)))


def test_constructor_builds_amp_wrapper(maskrcnn, monkeypatch):
    """`tools/train.py --amp` only swaps optim_wrapper.type; our groups must come through."""
    from mmengine.optim import AmpOptimWrapper, build_optim_wrapper
    import mmengine.optim.optimizer.amp_optimizer_wrapper as amp_mod

    cfg, model = maskrcnn
    if not torch.cuda.is_available():  # AmpOptimWrapper refuses to build without an accelerator
        monkeypatch.setattr(amp_mod, "is_cuda_available", lambda: True)
    ow = build_optim_wrapper(model, dict(cfg.optim_wrapper, type="AmpOptimWrapper", dtype="bfloat16"))
    assert isinstance(ow, AmpOptimWrapper)
    rate, n = cfg.optim_wrapper.paramwise_cfg.layer_decay_rate, len(model.backbone.blocks) + 1
    assert group_of(ow, model.backbone.patch_embed.weight)["lr"] == pytest.approx(1e-4 * rate ** n)


def test_bf16_autocast_training_step():
    """What `tools/train.py --amp` runs on a machine without a GPU (AmpOptimWrapper on CUDA)."""
    from hieradet_mmdet.optim import AutocastOptimWrapper

    cfg = load_config("maskrcnn_hieradet_s.py")
    model = build_detector(cfg)
    dtypes = []
    model.backbone.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    out = assert_trains_and_predicts(model, dict(cfg.optim_wrapper, type="AutocastOptimWrapper"))
    assert isinstance(out["optim_wrapper"], AutocastOptimWrapper)
    assert dtypes[0] == torch.bfloat16  # the training forward really ran in bf16
    assert "forward" not in vars(model.backbone) and "forward" not in vars(model.neck)


def test_wrong_arch_fails_with_choices():
    cfg = load_config("maskrcnn_hieradet_s.py")
    cfg.model.backbone.arch = "smal"
    with pytest.raises(ValueError, match="Unknown HieraDet arch 'smal'; choose one of tiny, small"):
        build_detector(cfg)


def test_detector_roi_features_are_right_without_any_tool_guard():
    """Built by plain MMDetection (no tools/ code): RoIAlign must see correctly laid-out maps."""
    cfg = load_config("maskrcnn_hieradet_s.py")
    model = build_detector(cfg).eval()
    with torch.no_grad():
        feats = model.extract_feat(torch.randn(1, 3, 96, 128))
        assert all(f.is_contiguous() for f in model.backbone(torch.randn(1, 3, 96, 128)))
        ext = model.roi_head.bbox_roi_extractor
        boxes = torch.tensor([[0, 8.0, 8.0, 60.0, 60.0], [0, 30.0, 20.0, 100.0, 90.0]])
        got = ext(feats[:ext.num_inputs], boxes)
        expected = ext([f.contiguous() for f in feats[:ext.num_inputs]], boxes)
    assert torch.allclose(got, expected)
