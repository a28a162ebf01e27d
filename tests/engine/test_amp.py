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


def test_amp_on_a_gpu_machine_is_mmengines_fp16_amp_with_dynamic_loss_scaling(monkeypatch):
    """What `tools/train.py --amp` picks when torch sees a GPU (checked here by telling it so):
    MMEngine's AmpOptimWrapper in float16 (mmcv's CUDA RoIAlign has no bf16 kernel) with a
    dynamic loss scale, our layer-decay groups intact."""
    import copy

    from mmengine.optim import AmpOptimWrapper, build_optim_wrapper

    from hieradet_mmdet.engine.amp import use_mixed_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = load_config("maskrcnn_hieradet_s.py")
    wrapper_cfg = copy.deepcopy(cfg.optim_wrapper)
    message = use_mixed_precision(wrapper_cfg, torch.cuda.is_available())
    assert message.startswith("--amp on GPU") and wrapper_cfg.type == "AmpOptimWrapper"
    model = build_detector(cfg)
    wrapper = build_optim_wrapper(model, wrapper_cfg)
    assert isinstance(wrapper, AmpOptimWrapper) and wrapper.cast_dtype == torch.float16
    scaler = wrapper.loss_scaler
    assert scaler.is_enabled() and wrapper._scale_update_param is None  # dynamic: grows and backs off
    assert scaler.get_growth_factor() == 2.0 and scaler.get_backoff_factor() == 0.5
    decayed = {g["lr"] for g in wrapper.optimizer.param_groups}
    assert len(decayed) > 10  # the layer-wise lr decay groups came through

    again = copy.deepcopy(wrapper_cfg)
    assert "already enabled" in use_mixed_precision(again, True) and again == wrapper_cfg
    cpu_cfg = copy.deepcopy(cfg.optim_wrapper)
    assert use_mixed_precision(cpu_cfg, False).startswith("--amp on CPU")
    assert cpu_cfg.type == "AutocastOptimWrapper" and "loss_scale" not in cpu_cfg
