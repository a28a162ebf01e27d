"""Module hooks see HieraDet's modules run, in training and inference, in float32 and bf16, with
the fast path's fused linears and its plain ones forced on any CPU: feature extractors, FLOP
counters, quantization observers and visualisers attach this way. With no hook anywhere in the
backbone, the fast path (and its fused kernels where chosen) runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules import module as nn_module

from hieradet_mmdet.models import HieraDet, fast_path

LINEARS_IN_SMALL = 16 * 4 + 3  # qkv, proj, fc1, fc2 per block, and the three stage-opening projections


@pytest.fixture(scope="module")
def small():
    model = HieraDet("small").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def run(model, x, dtype):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        return [o.float() for o in model(x)]


@pytest.fixture
def fast_path_calls(monkeypatch):
    calls = []
    real = fast_path.fast_forward
    monkeypatch.setattr(fast_path, "fast_forward", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_hooks_on_every_linear_fire_in_inference(small, dtype, linear_kernels, fast_path_calls):
    which, kernel_dtypes = linear_kernels
    x = torch.randn(1, 3, 64, 96)
    plain = run(small, x, dtype)  # no hooks: the fast path, fused where forced
    assert fast_path_calls == [1]
    assert bool(kernel_dtypes) is (which == "fused") and set(kernel_dtypes) <= {dtype}
    kernel_dtypes.clear()

    fired, pre_fired = {}, {}
    linears = {name: m for name, m in small.named_modules() if isinstance(m, nn.Linear)}
    assert len(linears) == LINEARS_IN_SMALL
    handles = []
    for name, m in linears.items():
        handles.append(m.register_forward_hook(lambda m, i, o, name=name: fired.__setitem__(name, o.dtype)))
        handles.append(m.register_forward_pre_hook(lambda m, i, name=name: pre_fired.__setitem__(name, True)))
    try:
        hooked = run(small, x, dtype)
    finally:
        for h in handles:
            h.remove()
    assert sorted(fired) == sorted(pre_fired) == sorted(linears)  # every Linear, each seen running
    assert set(fired.values()) == {dtype}
    assert fast_path_calls == [1] and not kernel_dtypes  # the modules ran, not the fast path
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    for a, b in zip(hooked, plain):
        assert ((a - b).norm() / b.norm()).item() < tol
    run(small, x, dtype)
    assert fast_path_calls == [1, 1]  # hooks gone: the fast path again


def test_global_module_hooks_and_hooks_on_other_modules_are_respected(small, fast_path_calls):
    x = torch.randn(1, 3, 64, 64)
    seen = []
    handle = nn_module.register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    try:
        run(small, x, torch.float32)
    finally:
        handle.remove()
    assert seen.count("Linear") == LINEARS_IN_SMALL and seen.count("MultiScaleBlock") == 16
    assert seen.count("Conv2d") == 1 and not fast_path_calls

    attn = []
    handle = small.blocks[2].attn.register_forward_hook(lambda m, i, o: attn.append(o.shape))
    try:
        run(small, x, torch.float32)
    finally:
        handle.remove()
    assert attn == [(4, 4, 4, 192)] and not fast_path_calls  # stage 2's 4x4 windows of a 16x16 map


def test_hooks_fire_in_training_with_checkpointing(small, fast_path_calls):
    model = HieraDet("small", with_cp=True).train()
    model.load_state_dict(small.state_dict())
    fired, grads = [], []
    model.blocks[3].mlp.fc1.register_forward_hook(lambda m, i, o: fired.append(o.shape))
    model.blocks[3].mlp.fc1.register_full_backward_hook(lambda m, gi, go: grads.append(go[0].shape))
    outs = model(torch.randn(1, 3, 64, 64))
    sum(o.square().mean() for o in outs).backward()
    assert fired and grads and not fast_path_calls
