"""Inference-only fused CPU linears, and the residual branch (with stochastic depth) they end in.

oneDNN applies the bias, the GELU and the residual add inside the matmul (the kernels inductor
uses), which saves the addmm bias copy and two passes over the activations: fp32, and bf16 under
CPU autocast (where they run in bf16 as autocast would). Probed once per dtype;
``HIERADET_FUSED_LINEAR=0`` or :func:`set_fused_linear` (False) turns them off.

They call the layer's weights directly, so forward hooks registered on those ``nn.Linear``
modules do not run in inference on CPU while the fused path is on (training, autograd and
other devices use the modules as usual).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


_FUSED_STATE: dict[object, bool] = {}


def fused_linear_available(dtype: torch.dtype = torch.float32) -> bool:
    if dtype not in _FUSED_STATE:
        ok = (_FUSED_STATE.get("enabled", True) and os.environ.get("HIERADET_FUSED_LINEAR", "1") != "0"
              and torch.backends.mkldnn.is_available())
        if ok:
            try:
                with torch.no_grad(), torch.autocast("cpu", enabled=False):
                    x, w, b, r = (torch.randn(*s).to(dtype) for s in ((5, 8), (6, 8), (6,), (5, 6)))
                    g = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "none")
                    a = torch.ops.mkldnn._linear_pointwise.binary(x, r, w, b, "add")
                    ref = F.linear(x.float(), w.float(), b.float())
                    tol = 1e-5 if dtype == torch.float32 else 5e-2
                    ok = (g.dtype == a.dtype == dtype and torch.allclose(g.float(), F.gelu(ref), atol=tol)
                          and torch.allclose(a.float(), r.float() + ref, atol=tol))
            except Exception:  # an op missing or refusing in this build: use the plain path
                ok = False
        _FUSED_STATE[dtype] = bool(ok)
    return _FUSED_STATE[dtype]


def set_fused_linear(enabled: Optional[bool]) -> Optional[bool]:
    """Turn the fused inference linears off (False) or back to auto-detection (None / True);
    returns the previous setting. E.g. FLOP counters only see plain aten linears."""
    previous = _FUSED_STATE.get("enabled", True)
    _FUSED_STATE.clear()
    _FUSED_STATE["enabled"] = enabled is not False
    return previous


def fused_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype the fused linears run in for input ``x`` here, or None for the plain path
    (autograd, other devices, other autocast dtypes, no oneDNN)."""
    if torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return None
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        if dtype != torch.bfloat16:
            return None
    else:
        dtype = x.dtype
    return dtype if fused_linear_available(dtype) else None


def linear(x: torch.Tensor, layer: nn.Linear, fused: Optional[torch.dtype], gelu: bool = False) -> torch.Tensor:
    if fused is not None:
        y = torch.ops.mkldnn._linear_pointwise(
            x.reshape(-1, x.shape[-1]).to(fused), layer.weight.to(fused), layer.bias.to(fused),
            "gelu" if gelu else "none", [], "none" if gelu else "")
        return y.view(*x.shape[:-1], -1)
    y = layer(x)
    return F.gelu(y) if gelu else y


def linear_residual(x: torch.Tensor, layer: nn.Linear, residual: torch.Tensor, fused: Optional[torch.dtype],
                     rate: float = 0.0, training: bool = False) -> torch.Tensor:
    """residual + drop_path(layer(x)), in the dtype type promotion gives (as under autocast)."""
    if fused is not None and residual.dtype == fused:
        return torch.ops.mkldnn._linear_pointwise.binary(
            x.reshape(-1, x.shape[-1]).to(fused), residual.reshape(-1, residual.shape[-1]),
            layer.weight.to(fused), layer.bias.to(fused), "add").view(residual.shape)
    y = drop_path(linear(x, layer, fused), rate, training)
    if not torch.is_grad_enabled() and y.dtype == torch.result_type(y, residual):
        return y.add_(residual)  # y is ours; saves an allocation
    return residual + y


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescaling the survivors."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)
