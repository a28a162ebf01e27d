"""The fast path (token layouts, fused oneDNN linears, the plan cache) against the reference path."""

import copy

import pytest
import torch

from helpers import assert_close_rel, assert_fp32_within_reference_noise, force_fused_linears, rel_err
from hieradet_mmdet.models import HieraDet
from hieradet_mmdet.models import fast_path
from hieradet_mmdet.models.hieradet import PLAN_CACHE_SIZE
from hieradet_mmdet.models.token_layout import TokenLayout

# Small and quick, but with every kind of block HieraDet-S has: windows that tile (8, 4), windows
# that need padding (14, 7), q-pools in tiling and padded windows, global blocks.
MINI = dict(depths=(1, 2, 3, 2), embed_dim=32, num_heads=1, global_pos_size=(7, 7), global_att_blocks=(4,),
            window_spec=(8, 4, 14, 7))


def perturbed(model):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval()


@pytest.fixture(params=[(8, 4, 14, 7), (8, 4, 0, 0)], ids=["windowed", "global"])
def mini(request):
    return perturbed(HieraDet(dict(MINI, window_spec=request.param)))


def reference(model, x):
    model.fast_path = False
    try:
        return model(x)
    finally:
        model.fast_path = True


@pytest.mark.parametrize("hw", [(200, 136), (112, 144), (96, 160), (45, 77)])
def test_fast_path_equals_the_reference_path(mini, hw, monkeypatch):
    """In float32, each of the fast path's variants is as close to the float64 reference path as
    the float32 reference path is (within 4x its error + 1e-6, whatever this CPU's kernels)."""
    x = torch.randn(2, 3, *hw)  # 200x136: stage 3 (13 x 8) pads windows of 14 in both directions
    with torch.no_grad():
        truth = reference(copy.deepcopy(mini).double(), x.double())
        ref = reference(mini, x)
        here = mini(x)  # oneDNN's fused fp32 linears where this build has them
        kernel_dtypes = force_fused_linears(monkeypatch, True)
        fused = mini(x)
        force_fused_linears(monkeypatch, False)
        plain = mini(x)
    assert set(kernel_dtypes) == {torch.float32}
    grad = mini(x.requires_grad_())  # autograd path: plain ops, gathers with gather backward
    for variant in (here, fused, plain, grad):
        assert_fp32_within_reference_noise(variant, ref, truth)
    sum(o.square().mean() for o in grad).backward()
    assert torch.isfinite(x.grad).all()


def test_fast_path_gradients_equal_the_reference_path_in_float64(mini):
    model = mini.double()
    x = torch.randn(1, 3, 112, 144, dtype=torch.float64)
    grads = []
    for fast in (True, False):
        model.fast_path = fast
        model.zero_grad()
        xg = x.clone().requires_grad_()
        sum((o * o.detach().sign()).sum() for o in model(xg)).backward()
        grads.append({"input": xg.grad, **{n: p.grad.clone() for n, p in model.named_parameters()}})
    for name, grad in grads[0].items():
        assert rel_err(grad, grads[1][name]) < 1e-11, name


def test_bf16_autocast_fused_matches_plain_autocast(mini, monkeypatch):
    """bf16 inference with the fused linears and with plain ones, both forced whatever this CPU
    offers (and as this CPU chooses), against float32."""
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        ref = mini(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            here = mini(x)
            kernel_dtypes = force_fused_linears(monkeypatch, True)
            fused = mini(x)
            force_fused_linears(monkeypatch, False)
            plain = mini(x)
    assert kernel_dtypes and set(kernel_dtypes) == {torch.bfloat16}  # the fused branch ran, in bf16
    for h, f, p, r in zip(here, fused, plain, ref):
        assert h.dtype == f.dtype == p.dtype
        for out in (h, f, p):
            assert ((out.float() - r).norm() / r.norm()).item() < 5e-2
    assert fused[-1].dtype == torch.bfloat16  # as under autocast, the stream is bf16 after the first q-pool


def test_bf16_autocast_trains_with_checkpointing(mini):
    model = HieraDet(mini.arch, with_cp=True, drop_path_rate=0.1).train()
    model.load_state_dict(mini.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 64, 96))
        loss = sum(o.float().square().mean() for o in out)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("h,w,window,levels", [(50, 84, 14, 1), (25, 42, 7, 0), (200, 336, 8, 2), (7, 9, 0, 2)])
def test_token_layouts_hold_every_position_once(h, w, window, levels):
    layout = TokenLayout(h, w, window, levels)
    real = torch.ones(layout.n, dtype=torch.bool)
    if layout.has_pad:
        real[layout.pad_mask[:, 0]] = False
    assert sorted(layout.src[real].tolist()) == list(range(h * w))
    assert torch.equal(layout.src[layout.inv], torch.arange(h * w))
    assert sum(b - a for a, b in layout.pad_runs) == layout.n - h * w
    if levels:  # the first plane level pools exactly the floor-mode 2x2 cells
        pooled = layout.pooled()
        m = layout.pooled_per_group()
        grid = torch.arange(h * w, dtype=torch.float).view(1, h * w, 1)
        cells = torch.nn.functional.max_pool2d(grid.view(1, 1, h, w), 2).flatten()
        slots = grid[0, layout.src, 0].view(layout.groups, -1)[:, :4 * m].view(layout.groups, 4, m).amax(1)
        real = ~pooled.pad_mask[:, 0] if pooled.has_pad else torch.ones(pooled.n, dtype=torch.bool)
        assert torch.equal(slots.flatten()[pooled.inv], cells)
        assert real.sum() == cells.numel()


def test_q_pool_needs_even_windows():
    with pytest.raises(ValueError, match="odd"):
        HieraDet(dict(MINI, window_spec=(7, 4, 14, 7)))
    HieraDet(dict(MINI, window_spec=(8, 4, 14, 7)))  # the last stage's window may be odd


def test_plan_cache_keeps_the_sizes_used_last(mini):
    """Multi-scale training meets many input sizes: the per-size plans must not pile up."""
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        first = mini(x)
        for i in range(PLAN_CACHE_SIZE + 4):
            mini(torch.randn(1, 3, 64 + 32 * (i % 5), 160 + 32 * (i // 5)))
        assert len(mini.plans) == PLAN_CACHE_SIZE
        assert (96 // 4, 128 // 4, "cpu") not in mini.plans  # evicted, rebuilt on the next call
        again = mini(x)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_traced_and_compiled_models_run_the_reference_path(mini, monkeypatch):
    """Tracers and exporters must not see the caches, index plans or oneDNN-only ops."""
    calls = []
    monkeypatch.setattr(fast_path, "fast_forward", lambda *a: calls.append(1) or None)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        traced = torch.jit.trace(mini, x, check_trace=False)
        assert_close_rel(traced(x), reference(mini, x), tol=1e-5)
    assert not calls
