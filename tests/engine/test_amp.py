"""Mixed precision without a GPU: the whole detector under bf16 autocast, float32 at the RoI ops
and the heads' output layers; and the measured choice between bf16 and float32."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from helpers import assert_trains_and_predicts, load_config, random_detector, synthetic_batch
from narrow_configs import narrow_detector_config

from hieradet_mmdet.engine import amp, head_outputs


def record_dtypes(model, names):
    seen = {}

    def hook(module, inputs, output, name):
        seen.setdefault(name, (inputs[0].dtype, output.dtype))

    for name in names:
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: hook(m, i, o, name))
    return seen


def test_bf16_training_step_over_the_whole_detector():
    """What `tools/train.py --amp` runs on a CPU with fast bf16 (AmpOptimWrapper on CUDA), on a
    narrow detector: bf16 is tens of times slower than fp32 on CPUs without bf16 instructions."""
    cfg = narrow_detector_config(load_config("maskrcnn_hieradet_s.py"))
    model = random_detector(cfg)
    seen = record_dtypes(model, ["backbone.blocks.0.attn.qkv", "neck.fpn_convs.0.conv", "rpn_head.rpn_conv",
                                 "rpn_head.rpn_reg", "roi_head.bbox_head.shared_fcs.0", "roi_head.bbox_head.fc_cls",
                                 "roi_head.mask_head.convs.0.conv", "roi_head.mask_head.conv_logits",
                                 "roi_head.bbox_roi_extractor.roi_layers.0"])
    out = assert_trains_and_predicts(model, dict(cfg.optim_wrapper, type="AutocastOptimWrapper"))
    assert isinstance(out["optim_wrapper"], amp.AutocastOptimWrapper)
    for name in ("backbone.blocks.0.attn.qkv", "neck.fpn_convs.0.conv", "rpn_head.rpn_conv",
                 "roi_head.bbox_head.shared_fcs.0", "roi_head.mask_head.convs.0.conv"):
        assert seen[name][1] == torch.bfloat16, name  # the training forward really ran in bf16
    for name in ("rpn_head.rpn_reg", "roi_head.bbox_head.fc_cls", "roi_head.mask_head.conv_logits"):
        assert seen[name] == (torch.bfloat16, torch.float32), name  # output layers compute in float32
    # mmcv's CPU RoIAlign takes float32 only: it gets its bf16 maps cast up and hands bf16 back
    assert seen["roi_head.bbox_roi_extractor.roi_layers.0"] == (torch.bfloat16, torch.bfloat16)
    assert not [n for n, m in model.named_modules() if "forward" in vars(m)]  # every wrapper removed again


def test_bf16_autocast_of_backbone_and_neck_only():
    cfg = narrow_detector_config(load_config("maskrcnn_hieradet_s.py"))
    model = random_detector(cfg)
    seen = record_dtypes(model, ["backbone.blocks.0.attn.qkv", "rpn_head.rpn_conv"])
    assert_trains_and_predicts(model, dict(cfg.optim_wrapper, type="AutocastOptimWrapper",
                                           autocast_modules=("backbone", "neck")))
    assert seen["backbone.blocks.0.attn.qkv"][1] == torch.bfloat16
    assert seen["rpn_head.rpn_conv"] == (torch.float32, torch.float32)


@pytest.mark.parametrize("config", ["retinanet_hieradet_s.py", "swap/fcos_hieradet-s_fpn_1x_coco.py",
                                    "swap/cascade-mask-rcnn_hieradet-s_fpn_1x_coco.py",
                                    "dino-4scale_hieradet-s_12e_coco.py", "mask2former_hieradet-s_lsj-50e_coco.py"])
def test_every_shipped_detector_predicts_under_bf16_close_to_float32(config, linear_kernels):
    """Heads whose output layers (and Mask2Former's mask logits) stay float32 give the same top
    detections as float32 inference; with the backbone's fused linears and with plain ones."""
    cfg = narrow_detector_config(load_config(config))
    with_mask = "mask" in config
    model = random_detector(cfg).eval()
    data = model.data_preprocessor(synthetic_batch(with_mask=with_mask), False)
    with torch.no_grad():
        ref = model(**data, mode="predict")
        with amp.autocast_detector(model):
            out = model(**data, mode="predict")
    which, kernel_dtypes = linear_kernels
    assert (torch.bfloat16 in kernel_dtypes) is (which == "fused")
    for r, o in zip(ref, out):
        a, b = r.pred_instances, o.pred_instances
        assert b.bboxes.dtype == b.scores.dtype == torch.float32
        if len(a) and len(b):
            assert torch.allclose(a.scores[:1], b.scores[:1], rtol=0.1, atol=1e-3)


# The last layers of the heads of the five convolutional families, by their MMDetection names: what
# discovery must find there.
SHIPPED_OUTPUT_LAYERS = ("rpn_cls", "rpn_reg", "retina_cls", "retina_reg", "conv_cls", "conv_reg", "conv_centerness",
                         "fc_cls", "fc_reg", "conv_logits")


@pytest.mark.parametrize("config", ["maskrcnn_hieradet_s.py", "retinanet_hieradet_s.py",
                                    "swap/fcos_hieradet-s_fpn_1x_coco.py", "swap/faster-rcnn_hieradet-s_fpn_1x_coco.py",
                                    "swap/cascade-mask-rcnn_hieradet-s_fpn_1x_coco.py"])
def test_the_output_layers_found_in_the_shipped_heads_are_their_last_layers(config):
    model = random_detector(narrow_detector_config(load_config(config)))
    expected = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in SHIPPED_OUTPUT_LAYERS]
    assert len(expected) >= 2
    found = head_outputs.discover_head_outputs(model)
    assert list(found.layers) == expected and found.composers == []
    assert list(found.layers.values()) == [model.get_submodule(n) for n in expected]


DECODER_LAYERS = 2  # narrow_detector_config's


@pytest.mark.parametrize("config", ["dino-4scale_hieradet-s_12e_coco.py", "mask2former_hieradet-s_lsj-50e_coco.py"])
def test_query_based_heads_give_float32_outputs_under_bf16(config):
    """DINO: every decoder layer's class branch and its box branch's last Linear, and those of the
    encoder's query selection (index num_layers); Mask2Former: the class embedding, the mask
    embedding's last Linear and the pixel decoder's mask features, the two operands of the mask
    logits, whose einsum (in the head's _forward_head) runs in float32 too."""
    cfg = narrow_detector_config(load_config(config))
    model = random_detector(cfg).eval()
    found = head_outputs.discover_head_outputs(model)
    if "dino" in config:
        head_name = "bbox_head"
        expected = ([f"bbox_head.cls_branches.{i}" for i in range(DECODER_LAYERS + 1)]
                    + [f"bbox_head.reg_branches.{i}.4" for i in range(DECODER_LAYERS + 1)])
        composers, low = [], ["decoder.layers.0.ffn.layers.0.0", "encoder.layers.0.self_attn.value_proj"]
    else:
        head_name = "panoptic_head"
        expected = ["panoptic_head.cls_embed", "panoptic_head.mask_embed.4", "panoptic_head.pixel_decoder.mask_feature"]
        composers = [("panoptic_head", "_forward_head")]
        low = ["panoptic_head.transformer_decoder.layers.0.ffn.layers.0.0",
               "panoptic_head.pixel_decoder.encoder.layers.0.self_attn.value_proj"]
    assert sorted(found.layers) == sorted(expected) and found.composers == composers
    given = []
    model.get_submodule(head_name).register_forward_hook(lambda m, i, o: given.append(o))
    seen = record_dtypes(model, ["backbone.blocks.0.attn.qkv", *low, *expected])
    data = model.data_preprocessor(synthetic_batch(with_mask="mask2former" in config), False)
    with torch.no_grad(), amp.autocast_detector(model):
        model(**data, mode="predict")
    for name in ["backbone.blocks.0.attn.qkv", *low]:
        assert seen[name][1] == torch.bfloat16, name  # the rest of the detector really ran in bf16
    for name in expected:
        assert seen[name][1] == torch.float32, name
    (scores, boxes_or_masks), = given
    assert len(scores) == len(boxes_or_masks) == DECODER_LAYERS + ("mask2former" in config)
    for out in (*scores, *boxes_or_masks):
        assert out.dtype == torch.float32
    assert not [n for n, m in model.named_modules() if "forward" in vars(m) or "_forward_head" in vars(m)]


def test_the_choice_between_bf16_and_float32_follows_the_measured_speed(monkeypatch):
    monkeypatch.setattr(amp, "bf16_speedup", lambda device="cpu": 3.2)
    dtype, reason = amp.cpu_mixed_precision()
    assert dtype == torch.bfloat16 and "3.2x as fast" in reason and "whole detector" in reason
    monkeypatch.setattr(amp, "bf16_speedup", lambda device="cpu": 0.7)
    dtype, reason = amp.cpu_mixed_precision()
    assert dtype is None and "0.70x as fast" in reason and "staying in float32" in reason


def test_the_speed_measurement_gives_a_ratio():
    """Only that it measures: how fast bf16 is depends on the processor (AMX, AVX-512 BF16, or
    none: emulated, ~100x slower than fp32), which the choice above is tested against both ways."""
    ratio = amp.matmul_speed_ratio("cpu", 64, repeats=1)
    assert math.isfinite(ratio) and ratio > 0


def test_the_measurement_stops_early_where_bf16_is_clearly_slow(monkeypatch):
    sizes = []

    def ratio(device, size, repeats=4):
        sizes.append(size)
        return measured[size]

    monkeypatch.setattr(amp, "matmul_speed_ratio", ratio)
    try:
        for measured, expected_sizes, expected in (({256: 0.01}, [256], 0.01),  # emulated bf16: done at 256
                                                   ({256: 0.9, 1024: 2.5}, [256, 1024], 2.5),  # AMX: 1024 decides
                                                   ({256: 1.1, 1024: 0.8}, [256, 1024], 0.8)):
            amp.bf16_speedup.cache_clear()
            sizes.clear()
            assert amp.bf16_speedup("cpu") == expected and sizes == expected_sizes
    finally:
        amp.bf16_speedup.cache_clear()  # no stubbed value left for other tests


def test_amp_on_a_gpu_machine_is_mmengines_fp16_amp_with_dynamic_loss_scaling(monkeypatch):
    """What `tools/train.py --amp` picks when torch sees a GPU (checked here by telling it so):
    MMEngine's AmpOptimWrapper in float16 (mmcv's CUDA RoIAlign has no bf16 kernel) with a
    dynamic loss scale, our layer-decay groups intact."""
    from mmengine.optim import AmpOptimWrapper, build_optim_wrapper

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # MMLogger looks up the device id
    cfg = load_config("maskrcnn_hieradet_s.py")
    wrapper_cfg = copy.deepcopy(cfg.optim_wrapper)
    message = amp.use_mixed_precision(wrapper_cfg, torch.cuda.is_available())
    assert message.startswith("--amp on GPU") and wrapper_cfg.type == "AmpOptimWrapper"
    model = random_detector(cfg)
    wrapper = build_optim_wrapper(model, wrapper_cfg)
    assert isinstance(wrapper, AmpOptimWrapper) and wrapper.cast_dtype == torch.float16
    scaler = wrapper.loss_scaler
    assert scaler.is_enabled() and wrapper._scale_update_param is None  # dynamic: grows and backs off
    assert scaler.get_growth_factor() == 2.0 and scaler.get_backoff_factor() == 0.5
    decayed = {g["lr"] for g in wrapper.optimizer.param_groups}
    assert len(decayed) > 10  # the layer-wise lr decay groups came through

    again = copy.deepcopy(wrapper_cfg)
    assert "already enabled" in amp.use_mixed_precision(again, True) and again == wrapper_cfg


def test_amp_on_a_cpu_follows_the_measured_bf16_speed(monkeypatch):
    cfg = load_config("maskrcnn_hieradet_s.py")
    monkeypatch.setattr(amp, "bf16_speedup", lambda device="cpu": 3.2)
    fast = copy.deepcopy(cfg.optim_wrapper)
    assert amp.use_mixed_precision(fast, cuda_available=False).startswith("--amp on CPU: bf16")
    assert fast.type == "AutocastOptimWrapper" and "loss_scale" not in fast
    monkeypatch.setattr(amp, "bf16_speedup", lambda device="cpu": 0.7)
    slow = copy.deepcopy(cfg.optim_wrapper)
    assert "staying in float32" in amp.use_mixed_precision(slow, cuda_available=False)
    assert slow == cfg.optim_wrapper


@pytest.mark.parametrize("speedup", [3.2, 0.2], ids=["fast-bf16-cpu", "slow-bf16-cpu"])
def test_amp_bf16_and_fp32_force_the_choice_and_say_when_the_measurement_disagrees(monkeypatch, speedup):
    """`--amp bf16` / `--amp fp32` on a CPU where bf16 is measured fast and on one where it is slow."""
    cfg = load_config("maskrcnn_hieradet_s.py")
    monkeypatch.setattr(amp, "bf16_speedup", lambda device="cpu": speedup)
    fast = speedup >= amp.FAST_BF16
    forced_bf16 = copy.deepcopy(cfg.optim_wrapper)
    line = amp.use_mixed_precision(forced_bf16, cuda_available=False, mode="bf16")
    assert forced_bf16.type == "AutocastOptimWrapper" and "loss_scale" not in forced_bf16
    assert line.startswith("--amp bf16 on CPU: bfloat16 autocast over the whole detector")
    assert ("the measurement disagrees" in line) is not fast
    if not fast:
        assert line.endswith(f"run {speedup:.2f}x as fast as float32 on this CPU, so --amp alone would stay in float32")
    forced_fp32 = copy.deepcopy(cfg.optim_wrapper)
    line = amp.use_mixed_precision(forced_fp32, cuda_available=False, mode="fp32")
    assert forced_fp32 == cfg.optim_wrapper and line.startswith("--amp fp32 on CPU: float32, as asked")
    assert ("the measurement disagrees" in line) is fast
    if fast:
        assert line.endswith("so --amp alone would choose bf16")
    assert amp.choose_mixed_precision("auto", False)[0] == (torch.bfloat16 if fast else None)


def test_amp_modes_on_a_gpu_machine(monkeypatch):
    monkeypatch.setattr(amp, "bf16_speedup", lambda device="cpu": pytest.fail("no CPU measurement on a GPU"))
    assert amp.choose_mixed_precision("auto", True)[0] == torch.float16
    dtype, line = amp.choose_mixed_precision("bf16", True)
    assert dtype == torch.bfloat16 and line.startswith("--amp bf16 on GPU") and "disagrees" not in line
    assert amp.choose_mixed_precision("fp32", True) == (None, "--amp fp32 on GPU: float32, as asked")
    wrapper = dict(type="OptimWrapper")
    amp.use_mixed_precision(wrapper, True, "bf16")
    assert wrapper == dict(type="AutocastOptimWrapper")  # RoIAlign in float32: mmcv's CUDA kernel has no bf16
    with pytest.raises(ValueError, match="--amp takes one of"):
        amp.choose_mixed_precision("fp16", False)
