"""Mixed precision: what ``tools/train.py --amp`` picks (:func:`use_mixed_precision`), and
bfloat16 autocast over the detector's feature extractor for machines without a GPU."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Optional

import torch
from torch import nn

from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS


MIXED_PRECISION_WRAPPERS = ("AmpOptimWrapper", "AutocastOptimWrapper")


def use_mixed_precision(optim_wrapper: dict, cuda_available: bool) -> str:
    """Switch an ``optim_wrapper`` config to mixed precision (in place) and say how.

    On a GPU: MMEngine's ``AmpOptimWrapper``, float16 autocast over the whole model with dynamic
    loss scaling. float16, not bfloat16, because mmcv 2.1's CUDA RoIAlign has float16 and float32
    kernels only (the RoI heads would get bfloat16 maps). Without one: :class:`AutocastOptimWrapper`
    (AmpOptimWrapper asserts an accelerator). A config that already asks for either is kept."""
    current = optim_wrapper.get("type", "OptimWrapper")
    if current in MIXED_PRECISION_WRAPPERS:
        return f"mixed precision is already enabled in the config ({current})"
    if cuda_available:
        optim_wrapper["type"] = "AmpOptimWrapper"
        optim_wrapper.setdefault("dtype", "float16")
        optim_wrapper.setdefault("loss_scale", "dynamic")
        return "--amp on GPU: float16 autocast with dynamic loss scaling (AmpOptimWrapper)"
    optim_wrapper["type"] = "AutocastOptimWrapper"
    optim_wrapper.pop("loss_scale", None)
    return "--amp on CPU: bfloat16 autocast over backbone and neck (AutocastOptimWrapper)"


@OPTIM_WRAPPERS.register_module()
class AutocastOptimWrapper(OptimWrapper):
    """Mixed precision on any device: bfloat16 autocast over the detector's feature extractor.

    MMEngine's ``AmpOptimWrapper`` needs an accelerator (it asserts CUDA/NPU/MLU). bfloat16 keeps
    fp32's exponent range, so no loss scaling is needed and this wrapper also runs on CPU
    (AVX-512 BF16); ``tools/train.py --amp`` picks it when there is no GPU. mmcv's CPU kernels
    (nms, RoIAlign) take only float32, so only ``autocast_modules`` (the backbone and neck, where
    nearly all the compute is) run under autocast and hand float32 maps to the heads;
    ``autocast_modules=None`` autocasts the whole model."""

    def __init__(self, optimizer, dtype: str = "bfloat16",
                 autocast_modules: Optional[Iterable[str]] = ("backbone", "neck"), **kwargs) -> None:
        super().__init__(optimizer, **kwargs)
        self.cast_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.autocast_modules = None if autocast_modules is None else tuple(autocast_modules)

    @contextmanager
    def optim_context(self, model: nn.Module):
        with super().optim_context(model), autocast_parts(model, self.autocast_modules, self.cast_dtype):
            yield


@contextmanager
def autocast_parts(model: nn.Module, names: Optional[Iterable[str]] = ("backbone", "neck"),
                   dtype: torch.dtype = torch.bfloat16):
    """Autocast the named submodules of ``model`` (all of it for ``names=None``) to ``dtype``,
    handing float32 outputs on to the rest."""
    device = next(model.parameters()).device.type
    if names is None:
        with torch.autocast(device_type=device, dtype=dtype):
            yield
        return
    modules = [getattr(model, name) for name in names if hasattr(model, name)]
    for module in modules:
        module.forward = _autocast_to_float32(module.forward, device, dtype)
    try:
        yield
    finally:
        for module in modules:
            del module.forward  # back to the class's forward


def _autocast_to_float32(forward, device: str, dtype: torch.dtype):
    def wrapped(*args, **kwargs):
        with torch.autocast(device_type=device, dtype=dtype):
            out = forward(*args, **kwargs)
        return _to_float32(out)
    return wrapped


def _to_float32(out):
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, (tuple, list)):
        return type(out)(_to_float32(o) for o in out)
    return out
