"""The fast path on a device other than the CPU, without a GPU: PyTorch's 'meta' device runs
every op for shapes and devices only, and refuses to mix its tensors with CPU ones. So a fast
path that made an index on the CPU for a GPU input, or took the CPU-only oneDNN linears for it,
fails here as it would on CUDA. By default another device runs the reference path (the fast path
has been measured on the CPU only); ``fast_path=True`` forces it. (The numbers on CUDA:
``tools/benchmark.py --device cuda``, docs/gpu.md.)"""

import pytest
import torch

from benchmarks.parity import plan_tensors
from hieradet_mmdet.models import HieraDet
from hieradet_mmdet.models import fast_path, fused_linear
from hieradet_mmdet.models import hieradet as reference_path


@pytest.fixture
def linear_dtypes(monkeypatch):
    """Every dtype the fast path chose for its linears (None: plain nn.Linear), with oneDNN's
    fused kernels reported available, as on any x86 CPU build of torch."""
    monkeypatch.setattr(fused_linear, "fused_linear_available", lambda dtype=torch.float32: True)
    chosen = []
    real = fast_path.fused_dtype
    monkeypatch.setattr(fast_path, "fused_dtype", lambda x: chosen.append(real(x)) or chosen[-1])
    return chosen


def test_other_devices_run_the_reference_path_unless_the_fast_path_is_forced():
    model = HieraDet("small").eval()
    assert model.takes_fast_path(torch.empty(1, 3, 64, 64))
    assert not model.takes_fast_path(torch.empty(1, 3, 64, 64, device="meta"))
    assert HieraDet("small", fast_path=True).takes_fast_path(torch.empty(1, 3, 64, 64, device="meta"))
    assert not HieraDet("small", fast_path=False).takes_fast_path(torch.empty(1, 3, 64, 64))


def test_other_devices_get_plain_linears(linear_dtypes):
    model = HieraDet("small", fast_path=True).eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        model(x)
    assert set(linear_dtypes) == {torch.float32}  # the fused path is live on the CPU...
    linear_dtypes.clear()
    model.to("meta")
    with torch.no_grad():
        outs = model(x.to("meta"))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # CPU autocast does not make a meta tensor CPU work
            model(x.to("meta"))
    assert linear_dtypes and set(linear_dtypes) == {None}  # ...and never chosen elsewhere
    assert [o.shape for o in outs] == [(1, 96, 24, 32), (1, 192, 12, 16), (1, 384, 6, 8), (1, 768, 3, 4)]
    assert all(o.device.type == "meta" for o in outs)
    assert fused_linear.fused_dtype(torch.empty(2, 8, device="meta")) is None


def test_plans_are_cached_per_device_with_their_indices_on_it():
    """96x128: windows of 14 and 7 need padding in stages 3-4, so the plan has every kind of gather."""
    model = HieraDet("small", fast_path=True).eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        model(x)
        model.to("meta")
        model(x.to("meta"))
    assert (24, 32, "cpu") in model.plans and (24, 32, "meta") in model.plans
    for device in ("cpu", "meta"):
        plan = model.plans.get(model.blocks, 24, 32, torch.device(device))
        assert any(step.to_windows is not None for step in plan)
        tensors = list(plan_tensors(plan))
        assert len(tensors) > 30 and {t.device.type for t in tensors} == {device}


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_training_with_checkpointing_and_stochastic_depth_on_another_device(fast, monkeypatch):
    model = HieraDet("small", with_cp=True, drop_path_rate=0.2, fast_path=fast).to("meta").train()
    calls = []
    module = fast_path if fast else reference_path
    real = module.checkpoint
    monkeypatch.setattr(module, "checkpoint", lambda *a, **k: calls.append(k) or real(*a, **k))
    outs = model(torch.randn(2, 3, 96, 128, device="meta"))
    sum(o.square().mean() for o in outs).backward()
    assert len(calls) == len(model.blocks) and all(k == {"use_reentrant": False} for k in calls)
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters())
