"""oneDNN's fused linears against the plain ops they fuse, and the probe that decides whether the
fast path may use them: on a CPU with the kernel for a dtype they must agree; on one without it
the probe must say no. Either way the test asserts something here, and a kernel that fails or
computes wrong numbers is refused (forced below on any CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hieradet_mmdet.models import fused_linear

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def operands(dtype):
    gen = torch.Generator().manual_seed(0)
    x, w, b, r = (torch.randn(*s, generator=gen).to(dtype) for s in ((37, 96), (64, 96), (64,), (37, 64)))
    return x, w, b, r


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_kernels_equal_the_plain_ops_where_the_probe_allows_them(dtype):
    available = fused_linear.fused_linear_available.__wrapped__(dtype)
    x, w, b, r = operands(dtype)
    with torch.no_grad():
        ref = F.linear(x.double(), w.double(), b.double())
        try:
            gelu = fused_linear.fused_linear_kernel(x, w, b, gelu=True)
            add = fused_linear.fused_linear_add_kernel(x, r, w, b)
            plain = fused_linear.fused_linear_kernel(x, w, b, gelu=False)
        except RuntimeError:
            assert not available  # no kernel for this dtype on this CPU: the probe said so
            return
    results = {"gelu": (gelu, F.gelu(ref)), "add": (add, r.double() + ref), "none": (plain, ref)}
    agree = all(out.dtype == dtype and ((out.double() - want).norm() / want.norm()).item() < TOLERANCE[dtype]
                for out, want in results.values())
    assert agree is available, {k: (o.double() - t).abs().max().item() for k, (o, t) in results.items()}


def test_the_probe_refuses_kernels_that_fail_or_compute_wrong_numbers(monkeypatch):
    assert fused_linear.fused_linear_available.__wrapped__(torch.float32) is torch.backends.mkldnn.is_available()

    def fails(*args):
        raise RuntimeError("could not create a primitive descriptor")

    monkeypatch.setattr(fused_linear, "fused_linear_kernel", fails)
    assert not fused_linear.fused_linear_available.__wrapped__(torch.float32)
    monkeypatch.setattr(fused_linear, "fused_linear_kernel", lambda x, w, b, gelu: F.linear(x, w, b))  # no GELU
    assert not fused_linear.fused_linear_available.__wrapped__(torch.float32)


def test_the_fused_branch_is_chosen_only_for_cpu_inference_in_float32_or_bf16(monkeypatch):
    monkeypatch.setattr(fused_linear, "fused_linear_available", lambda dtype=torch.float32: True)
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert fused_linear.fused_dtype(x) == torch.float32
        assert fused_linear.fused_dtype(x.bfloat16()) == torch.bfloat16
        assert fused_linear.fused_dtype(x.double()) is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert fused_linear.fused_dtype(x) == torch.bfloat16
        with torch.autocast("cpu", dtype=torch.float16):
            assert fused_linear.fused_dtype(x) is None
    assert fused_linear.fused_dtype(x) is None  # autograd: plain layers
    monkeypatch.setattr(fused_linear, "fused_linear_available", lambda dtype=torch.float32: False)
    with torch.no_grad():
        assert fused_linear.fused_dtype(x) is None
