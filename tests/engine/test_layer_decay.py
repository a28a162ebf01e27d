"""HieraDetLayerDecayConstructor: layer-wise lr decay over the model's own layers, weight decay
rules, frozen stages, and whatever optimizer wrapper the config names."""

from __future__ import annotations

import pytest
import torch

from helpers import ROOT, load_config, random_detector


@pytest.fixture(scope="module")
def maskrcnn():
    cfg = load_config("maskrcnn_hieradet_s.py")
    return cfg, random_detector(cfg.copy())


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
    model = random_detector(cfg)
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


def test_another_optimizer_merged_over_ours_is_refused_saying_what_to_write(maskrcnn, tmp_path):
    """A config inheriting ours that names SGD without _delete_ keeps AdamW's betas through MMEngine's dict
    merge: refused when the optimizer is built (before training starts), naming the keys and the fix."""
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper

    from hieradet_mmdet.engine.checks import ConfigMergeError

    _, model = maskrcnn
    user = tmp_path / "user.py"
    user.write_text(f"_base_ = ['{(ROOT / 'configs' / 'maskrcnn_hieradet_s.py').as_posix()}']\n"
                    "optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=1e-4))\n")
    merged = Config.fromfile(str(user)).optim_wrapper
    with pytest.raises(ConfigMergeError, match=r"SGD, which takes no betas .*_delete_=True") as error:
        build_optim_wrapper(model, merged)
    assert "\n" not in str(error.value)
    replaced = Config.fromfile(str(user))
    replaced.optim_wrapper = dict(merged, optimizer=dict(type="SGD", lr=0.02, momentum=0.9, weight_decay=1e-4))
    assert type(build_optim_wrapper(model, replaced.optim_wrapper).optimizer).__name__ == "SGD"
