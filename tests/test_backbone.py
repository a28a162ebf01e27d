"""The trunk against birder's own HieraDet: same weights, same numbers."""

import pytest
import torch

from hieradet_mmdet.checkpoint import remap_birder_keys
from hieradet_mmdet.hieradet import ARCH_NAMES, HieraDet, resolve_arch


def ours_from_birder(birder_model, arch, **kwargs):
    model = HieraDet(arch, **kwargs).eval()
    state = remap_birder_keys(birder_model.state_dict(), model.arch["depths"])
    state = {k: v for k, v in state.items() if not k.startswith(("norm.", "head."))}
    model.load_state_dict(state, strict=True)
    return model


def assert_close_rel(ours, ref, tol=1e-5):
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err <= tol, err


@pytest.mark.parametrize("layout", ["small", "d_small"])
@pytest.mark.parametrize("hw", [(256, 256), (224, 320), (160, 416)])
def test_matches_birder_detection_features(layout, hw, birder_small, birder_d_small):
    ref_model = birder_small if layout == "small" else birder_d_small
    model = ours_from_birder(ref_model, layout)
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        ref = list(ref_model.detection_features(x).values())
        out = model(x)
    assert [o.shape[1] for o in out] == [96, 192, 384, 768]
    assert_close_rel(out, ref)


@pytest.mark.parametrize("hw", [(200, 328), (32, 32), (77, 45)])
def test_sizes_birder_cannot_run(hw, birder_small):
    model = ours_from_birder(birder_small, "small")
    with torch.no_grad():
        out = model(torch.randn(1, 3, *hw))
    h, w = (hw[0] - 1) // 4 + 1, (hw[1] - 1) // 4 + 1
    for i, o in enumerate(out):
        assert o.shape[-2:] == (h, w)
        assert torch.isfinite(o).all()
        h, w = h // 2, w // 2
    # The crop of the tiled window embedding is exactly birder's embedding on the region they share.
    pos = model.position_embedding(50, 82)
    assert pos.shape == (1, 50, 82, 96)


def test_tiny_layout_parity():
    from conftest import make_birder_model

    ref_model = make_birder_model("hieradet_d_tiny", seed=3)
    model = ours_from_birder(ref_model, "d_tiny")
    x = torch.randn(1, 3, 192, 256)
    with torch.no_grad():
        assert_close_rel(model(x), list(ref_model.detection_features(x).values()))


def test_arch_validation_lists_choices():
    with pytest.raises(ValueError, match="d_small"):
        HieraDet("smal")
    with pytest.raises(ValueError, match="missing"):
        HieraDet(dict(depths=(1, 2, 3, 4)))
    cfg = resolve_arch("small", window_spec=(8, 4, 0, 0))
    assert cfg["window_spec"] == (8, 4, 0, 0)
    assert set(ARCH_NAMES) >= {"small", "d_small", "tiny", "d_large", "base_plus"}
    assert HieraDet(dict(resolve_arch("tiny"))).channels == [96, 192, 384, 768]


def test_out_indices_and_channels():
    model = HieraDet("small", out_indices=(1, -1)).eval()
    assert model.out_channels == [192, 768] and model.out_strides == [8, 32]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    assert [o.shape[1] for o in out] == [192, 768]
    with pytest.raises(ValueError):
        HieraDet("small", out_indices=(0, 4))


@pytest.mark.parametrize("frozen", [0, 2])
def test_frozen_stages(frozen):
    model = HieraDet("small", frozen_stages=frozen, drop_path_rate=0.5)
    model.train()
    frozen_blocks = model.stage_ends[frozen - 1] + 1 if frozen > 0 else 0
    assert not model.patch_embed.weight.requires_grad and not model.pos_embed.requires_grad
    for i, block in enumerate(model.blocks):
        assert block.training == (i >= frozen_blocks)
        assert all(p.requires_grad == (i >= frozen_blocks) for p in block.parameters())
    out = model(torch.randn(1, 3, 64, 64))
    sum(o.sum() for o in out).backward()
    assert model.patch_embed.weight.grad is None and model.pos_embed.grad is None
    assert all(p.grad is None for b in model.blocks[:frozen_blocks] for p in b.parameters())
    assert model.blocks[-1].mlp.fc2.weight.grad is not None


def test_with_cp_same_outputs_and_gradients():
    torch.manual_seed(0)
    plain = HieraDet("small").train()
    ckpt = HieraDet("small", with_cp=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 96, 128)
    outs = []
    for model in (plain, ckpt):
        out = model(x)
        sum((o * o).mean() for o in out).backward()
        outs.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert_close_rel(outs[1][0], outs[0][0], tol=1e-6)
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_and_batch_sizes(dtype):
    model = HieraDet("d_small").eval()
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=dtype):
            out = model(x)
        single = model(x[1:2])
    for a, b in zip(out, ref):
        assert torch.isfinite(a).all()
        assert ((a.float() - b).norm() / b.norm()).item() < 5e-2
    assert_close_rel([s[0] for s in single], [r[1] for r in ref], tol=1e-4)
