"""FLOPs of one step with torch's FlopCounterMode, plus what it does not know on CPU: flash
attention and the fast path's fused oneDNN linears. A multiply-add counts as two FLOPs here
(MMEngine's and fvcore's counters count it as one)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def _attention_flops(q_shape, k_shape, v_shape) -> int:
    b, h, sq, d = q_shape
    sk, dv = k_shape[-2], v_shape[-1]
    return 2 * b * h * sq * sk * d + 2 * b * h * sq * sk * dv


def _linear_flops(x_shape, w_shape) -> int:
    rows = 1
    for n in x_shape[:-1]:
        rows *= n
    return 2 * rows * w_shape[0] * w_shape[1]


def _extra_formulas() -> dict:
    aten, mkldnn = torch.ops.aten, torch.ops.mkldnn
    extra = {}

    def attention_fwd(query, key, value, *args, out=None, **kwargs):
        return _attention_flops(query.shape, key.shape, value.shape)

    def attention_bwd(grad_out, query, key, value, *args, out=None, **kwargs):
        return 2 * _attention_flops(query.shape, key.shape, value.shape)  # dQ, dK, dV, dP: 2x forward

    def fused_linear(x, *args, out=None, **kwargs):
        # default: (x, weight, bias, ...); binary: (x, other, weight, bias, ...) with a 2-d weight
        weight = args[1] if len(args) > 1 and torch.is_tensor(args[1]) and args[1].ndim == 2 else args[0]
        return _linear_flops(x.shape, weight.shape)

    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", attention_fwd),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", attention_bwd)):
        if hasattr(aten, name):
            extra[getattr(aten, name)] = formula
    if hasattr(mkldnn, "_linear_pointwise"):  # keys are op packets: one formula for both overloads
        extra[mkldnn._linear_pointwise] = fused_linear
    for formula in extra.values():
        formula._get_raw = True
    return extra


def count_flops(step: Callable[[], Any]) -> int:
    """FLOPs of one call of ``step`` (forward and, if it runs one, backward)."""
    counter = FlopCounterMode(display=False, custom_mapping=_extra_formulas())
    with counter:
        step()
    return int(counter.get_total_flops())
