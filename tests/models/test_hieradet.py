"""The trunk against birder's own HieraDet: same weights, same numbers, on both paths; and what
the trunk accepts and refuses."""

import pytest
import torch

from helpers import assert_close_rel, birder_features, make_birder_model, ours_from_birder, rel_err
from hieradet_mmdet.models import ARCH_NAMES, HieraDet, resolve_arch
from hieradet_mmdet.models.hieradet import MIN_INPUT_SIZE
from hieradet_mmdet.weights.convert import birder_to_ours

PATHS = {"fast": True, "reference": False}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["small", "d_small"])
@pytest.mark.parametrize("hw", [(256, 256), (224, 320), (160, 416)])
def test_matches_birder_detection_features(path, layout, hw, birder_small, birder_d_small):
    ref_model = birder_small if layout == "small" else birder_d_small
    model = ours_from_birder(ref_model, layout, fast_path=PATHS[path])
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        ref = birder_features(ref_model, x)
        out = model(x)
    assert [o.shape[1] for o in out] == [96, 192, 384, 768]
    assert_close_rel(out, ref)


def _forward_backward(forward, params, x):
    """Outputs and the gradients of a fixed, sign-changing weighting of them (w.r.t. params and x)."""
    x = x.clone().requires_grad_()
    outs = forward(x)
    weights = [torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view(o.shape) for o in outs]
    grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights)), [x, *params.values()])
    return [o.detach() for o in outs], dict(zip(["input", *params], grads))


def _ours_and_birder(layout, dtype, fast_path):
    """Our model and birder's with the same weights, in ``dtype``. In eval mode: birder's models
    come with stochastic depth, which in training mode would drop blocks at random (a comparison
    in training mode depends on the random state, i.e. on which tests ran before)."""
    ref = make_birder_model(f"hieradet_{layout}", seed=3).to(dtype).eval()
    ours = ours_from_birder(ref, layout, fast_path=fast_path).to(dtype).eval()
    ref_params = dict(ref.named_parameters())
    ref_params = {name: ref_params[key] for key, name in
                  zip(ref_params, birder_to_ours(dict.fromkeys(ref_params)))}  # our names -> birder's tensors
    ours_params = {k: v for k, v in ours.named_parameters()}
    ref_params = {k: ref_params[k] for k in ours_params}
    return (lambda t: list(ours(t)), ours_params), (lambda t: birder_features(ref, t), ref_params)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["small", "d_small"])
def test_float64_outputs_and_gradients_equal_birders(path, layout):
    """In float64 rounding cannot hide a bug: every output and every gradient to ~1e-12."""
    x = torch.randn(1, 3, 128, 192, dtype=torch.float64)  # stage 3: 8 x 12 tokens in windows of 14
    (ours, ours_params), (ref, ref_params) = _ours_and_birder(layout, torch.float64, PATHS[path])
    outs, grads = _forward_backward(ours, ours_params, x)
    ref_outs, ref_grads = _forward_backward(ref, ref_params, x)
    assert_close_rel(outs, ref_outs, tol=1e-12)
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < 1e-10, name


def test_float32_gradients_are_within_float32_noise():
    """In float32 both models round; ours may deviate from the float64 truth by no more than a
    few times what birder's own float32 computation does, measured here, on this CPU."""
    x = torch.randn(1, 3, 128, 192, dtype=torch.float64)
    (ours64, p64), (_, _) = _ours_and_birder("small", torch.float64, True)
    _, truth = _forward_backward(ours64, p64, x)
    (ours32, p32), (ref32, r32) = _ours_and_birder("small", torch.float32, True)
    _, ours_grads = _forward_backward(ours32, p32, x.float())
    _, ref_grads = _forward_backward(ref32, r32, x.float())
    for name, exact in truth.items():
        noise = rel_err(ref_grads[name], exact)  # birder's own float32 error for this gradient
        assert rel_err(ours_grads[name], exact) <= 4 * noise + 1e-6, (name, noise)


@pytest.mark.parametrize("hw", [(200, 328), (32, 32), (77, 45), (29, 29)])
def test_sizes_birder_cannot_run(hw, birder_small):
    fast = ours_from_birder(birder_small, "small")
    reference = ours_from_birder(birder_small, "small", fast_path=False)
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        out, ref = fast(x), reference(x)
    h, w = (hw[0] - 1) // 4 + 1, (hw[1] - 1) // 4 + 1
    for o in out:
        assert o.shape[-2:] == (h, w) and torch.isfinite(o).all()
        h, w = h // 2, w // 2
    assert_close_rel(out, ref)


def test_position_embedding_is_birders_where_birder_works(birder_small):
    model = ours_from_birder(birder_small, "small")
    with torch.no_grad():
        ours = model.position_embedding(48, 80)
        ref = birder_small._get_pos_embed(torch.zeros(1, 48, 80, 96))
        assert model.position_embedding(50, 82).shape == (1, 50, 82, 96)  # and any other size
    assert torch.equal(ours, ref)


def test_tiny_layout_parity():
    ref_model = make_birder_model("hieradet_d_tiny", seed=3)
    model = ours_from_birder(ref_model, "d_tiny")
    x = torch.randn(1, 3, 192, 256)
    with torch.no_grad():
        assert_close_rel(model(x), birder_features(ref_model, x))


def test_arch_names_aliases_and_dicts():
    with pytest.raises(ValueError, match="d_small"):
        HieraDet("smal")
    with pytest.raises(ValueError, match="missing"):
        HieraDet(dict(depths=(1, 2, 3, 4)))
    assert resolve_arch("small", window_spec=(8, 4, 0, 0))["window_spec"] == (8, 4, 0, 0)
    assert set(ARCH_NAMES) >= {"small", "d_small", "tiny", "d_large", "base_plus"}
    assert resolve_arch("s") == resolve_arch("small") and resolve_arch("d_b+") == resolve_arch("d_base_plus")
    assert HieraDet(dict(resolve_arch("tiny"))).channels == [96, 192, 384, 768]


def test_out_indices_and_channels():
    model = HieraDet("small", out_indices=(1, -1)).eval()
    assert model.out_channels == [192, 768] and model.out_strides == [8, 32]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    assert [o.shape[1] for o in out] == [192, 768]
    for bad in [(0, 4), (), (1, -3)]:
        with pytest.raises(ValueError, match="out_indices"):
            HieraDet("small", out_indices=bad)


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


@pytest.mark.parametrize("path", PATHS)
def test_with_cp_same_outputs_and_gradients(path):
    plain = HieraDet("small", fast_path=PATHS[path]).train()
    ckpt = HieraDet("small", with_cp=True, fast_path=PATHS[path]).train()
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


@pytest.mark.parametrize("path", PATHS)
def test_every_size_gets_an_answer_or_a_clear_error(path):
    model = HieraDet("small", fast_path=PATHS[path]).eval()
    for hw in [(28, 64), (64, 28), (16, 16), (1, 2000)]:
        with pytest.raises(ValueError, match=f"at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels.*{hw[0]}x{hw[1]}"):
            model(torch.randn(1, 3, *hw))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        model(torch.randn(3, 64, 64))
    with torch.no_grad():
        out = model(torch.randn(1, 3, MIN_INPUT_SIZE, MIN_INPUT_SIZE))
        assert [tuple(o.shape[-2:]) for o in out] == [(8, 8), (4, 4), (2, 2), (1, 1)]
        empty = model(torch.randn(0, 3, 64, 96))  # an empty batch: empty maps of the right shape
    assert [tuple(o.shape) for o in empty] == [(0, 96, 16, 24), (0, 192, 8, 12), (0, 384, 4, 6), (0, 768, 2, 3)]


def test_drop_path_rate_is_checked_when_built():
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\)"):
            HieraDet("small", drop_path_rate=bad)
    model = HieraDet("small", drop_path_rate=0.99).train()  # nearly always dropped, never NaN
    out = model(torch.randn(2, 3, 64, 64))
    assert all(torch.isfinite(o).all() for o in out)


def test_layer_depths_for_layer_decay():
    model = HieraDet("small")
    n = len(model.blocks) + 2
    assert model.get_layer_depth("pos_embed") == (0, n) and model.get_layer_depth("patch_embed.weight") == (0, n)
    assert model.get_layer_depth("blocks.0.attn.qkv.weight") == (1, n)
    assert model.get_layer_depth("backbone.blocks.15.mlp.fc2.bias", prefix="backbone.") == (16, n)
    assert model.get_layer_depth("neck.convs.0.weight", prefix="backbone.") == (n - 1, n)
    names = [name for name, _ in model.named_parameters()]
    assert all(0 <= model.get_layer_depth(name)[0] < n - 1 for name in names)
