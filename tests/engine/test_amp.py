"""AutocastOptimWrapper: what ``tools/train.py --amp`` uses without a GPU."""

from __future__ import annotations

import torch

from helpers import assert_trains_and_predicts, build_detector, load_config


def test_bf16_autocast_training_step():
    """What `tools/train.py --amp` runs on a machine without a GPU (AmpOptimWrapper on CUDA)."""
    from hieradet_mmdet.engine.amp import AutocastOptimWrapper

    cfg = load_config("maskrcnn_hieradet_s.py")
    model = build_detector(cfg)
    dtypes = []
    model.backbone.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    out = assert_trains_and_predicts(model, dict(cfg.optim_wrapper, type="AutocastOptimWrapper"))
    assert isinstance(out["optim_wrapper"], AutocastOptimWrapper)
    assert dtypes[0] == torch.bfloat16  # the training forward really ran in bf16
    assert "forward" not in vars(model.backbone) and "forward" not in vars(model.neck)
