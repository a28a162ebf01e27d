"""Inference-only fused CPU linears for the fast path, and the residual branch they end in.

oneDNN applies the bias, the GELU and the residual add inside the matmul (the kernels inductor
uses), which saves the addmm bias copy and two passes over the activations: in fp32, and in bf16
under CPU autocast (where they run in bf16 as autocast would). Whether this torch build has
working kernels is probed once per dtype.

They read the layers' weights directly; :class:`~.hieradet.HieraDet` takes the fast path only
while no hook waits for one of its modules to run. The two kernels are called through
:func:`fused_linear_kernel` and :func:`fused_linear_add_kernel`, so that tests can put a
plain-PyTorch stand-in there and run the fused branch on CPUs without oneDNN's bf16 kernels.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..torch_compat import cpu_autocast_dtype
from .layers import drop_path


def fused_linear_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gelu: bool) -> torch.Tensor:
    """gelu?(x @ weight.T + bias) for 2-D ``x``, in oneDNN's one pass."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [],
                                              "none" if gelu else "")


def fused_linear_add_kernel(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor) -> torch.Tensor:
    """residual + x @ weight.T + bias for 2-D ``x`` and ``residual``, in oneDNN's one pass."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")


@functools.cache
def fused_linear_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether both fused kernels run in ``dtype`` in this torch build on this CPU and give the
    plain ops' numbers (oneDNN has no bf16 kernels on CPUs without AVX-512 BF16 or AMX)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            x, w, b, r = (torch.randn(*s).to(dtype) for s in ((5, 8), (6, 8), (6,), (5, 6)))
            gelu = fused_linear_kernel(x, w, b, gelu=True)
            add = fused_linear_add_kernel(x, r, w, b)
            ref = F.linear(x.float(), w.float(), b.float())
            tol = 1e-5 if dtype == torch.float32 else 5e-2
            return (gelu.dtype == add.dtype == dtype and torch.allclose(gelu.float(), F.gelu(ref), atol=tol)
                    and torch.allclose(add.float(), r.float() + ref, atol=tol))
    except Exception:  # an op missing or refusing in this build: the plain path it is
        return False


def fused_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype the fused linears run in for input ``x`` here, or None for plain linears
    (autograd, other devices, other autocast dtypes, no oneDNN)."""
    if torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return None
    if cpu_autocast_dtype() is not None:
        dtype = cpu_autocast_dtype()
        if dtype != torch.bfloat16:
            return None
    else:
        dtype = x.dtype
    return dtype if fused_linear_available(dtype) else None


def linear(x: torch.Tensor, layer: nn.Linear, fused: Optional[torch.dtype], gelu: bool = False) -> torch.Tensor:
    if fused is not None:
        y = fused_linear_kernel(x.reshape(-1, x.shape[-1]).to(fused), layer.weight.to(fused),
                                layer.bias.to(fused), gelu)
        return y.view(*x.shape[:-1], -1)
    y = layer(x)
    return F.gelu(y) if gelu else y


def linear_residual(x: torch.Tensor, layer: nn.Linear, residual: torch.Tensor, fused: Optional[torch.dtype],
                    rate: float = 0.0, training: bool = False) -> torch.Tensor:
    """residual + drop_path(layer(x)), in the dtype type promotion gives (as under autocast)."""
    if fused is not None and residual.dtype == fused:
        return fused_linear_add_kernel(
            x.reshape(-1, x.shape[-1]).to(fused), residual.reshape(-1, residual.shape[-1]),
            layer.weight.to(fused), layer.bias.to(fused)).view(residual.shape)
    y = drop_path(linear(x, layer, fused), rate, training)
    if not torch.is_grad_enabled() and y.dtype == torch.result_type(y, residual):
        return y.add_(residual)  # y is ours; saves an allocation
    return residual + y
