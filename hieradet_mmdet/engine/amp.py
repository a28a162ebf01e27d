"""Mixed precision for detectors where MMEngine's ``AmpOptimWrapper`` does not reach: on CPUs.

bfloat16 pays off on a CPU only where its matrix products are faster than float32's: with AMX
(Intel Xeon from Sapphire Rapids on) or full-rate AVX-512 BF16 dot products (AMD Zen 4 on); with
AVX-512 BF16 alone (earlier Intel Xeons) they are slower than float32. :func:`bf16_speedup`
measures it once per process, and the tools choose bf16 or float32 from it and say so.

:func:`autocast_detector` runs a whole detector under bf16 autocast: backbone, neck and heads do
their convolutions and matrix products in bf16, and the ops that need float32 get it. mmcv's CPU
RoIAlign / RoIPool kernels take float32 only: their inputs are cast up there. The heads' output
layers (class scores, box deltas, centerness, mask logits, DETR-style query classes and boxes),
found from what each head computes (:func:`discover_head_outputs`, any MMDetection head), run in
float32, and so do the methods that compose a head's outputs from them by matrix products
(Mask2Former's mask logits), so decoding, score thresholds, matching and NMS see float32 numbers,
as without autocast.

:func:`choose_mixed_precision` is where ``tools/train.py --amp`` and ``tools/test.py --amp`` decide, on
a GPU and on a CPU; ``--amp bf16`` / ``--amp fp32`` force either choice on any machine.
"""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager
from typing import Iterable, Optional

import torch
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS
from torch import nn

from .. import mmengine_adapter as mmengine_api
from .head_outputs import discover_head_outputs

FAST_BF16 = 1.3  # bf16 must run matrix products at least this much faster than fp32 to be chosen


FIRST_SIZE, FULL_SIZE = 256, 1024  # matrix sizes of the speed measurement (see bf16_speedup)
CLEARLY_SLOW = 0.5  # a bf16 / fp32 ratio at FIRST_SIZE below this ends the measurement there


@functools.lru_cache(maxsize=None)
def bf16_speedup(device: str = "cpu") -> float:
    """How many times faster bf16 matrix products run than float32 ones here (measured once per
    process, in well under a second on any CPU).

    Products of FIRST_SIZE matrices first: where bf16 has no native support (AVX2-only CPUs, or
    AVX-512 without BF16), bf16 is tens of times slower already there and the answer is clear.
    Otherwise products of FULL_SIZE matrices decide, which small ones under-state on fast bf16
    units (AMX)."""
    ratio = matmul_speed_ratio(device, FIRST_SIZE)
    if ratio < CLEARLY_SLOW:
        return ratio
    return matmul_speed_ratio(device, FULL_SIZE)


def matmul_speed_ratio(device: str, size: int, repeats: int = 4) -> float:
    """fp32 time / bf16 time of a ``size`` x ``size`` matrix product (best of ``repeats`` after one warm-up)."""
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        runs = []
        for i in range(repeats + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            a @ b
            if device == "cuda":
                torch.cuda.synchronize()
            if i > 0:
                runs.append(time.perf_counter() - start)
        times[dtype] = min(runs)
    return times[torch.float32] / times[torch.bfloat16]


def cpu_mixed_precision() -> tuple[Optional[torch.dtype], str]:
    """(bf16 or None, the reason in a sentence) for mixed precision on this CPU."""
    speedup = bf16_speedup("cpu")
    if speedup >= FAST_BF16:
        return torch.bfloat16, (f"bf16 matrix products run {speedup:.1f}x as fast as float32 on this CPU (measured): "
                                "bfloat16 autocast over the whole detector, float32 at the RoI ops and the heads' "
                                "output layers")
    return None, (f"bf16 matrix products run {speedup:.2f}x as fast as float32 on this CPU (measured; no AMX or "
                  "full-rate AVX-512 BF16): staying in float32")


MIXED_PRECISION_WRAPPERS = ("AmpOptimWrapper", "AutocastOptimWrapper")
AMP_MODES = ("auto", "bf16", "fp32")  # --amp (the measured choice), --amp bf16, --amp fp32


def add_amp_option(parser, what: str) -> None:
    """The tools' ``--amp [bf16|fp32]`` option; ``what``: 'training' or 'evaluation'."""
    parser.add_argument(
        "--amp", nargs="?", const="auto", choices=AMP_MODES, metavar="bf16|fp32",
        help=f"mixed precision {what}: alone, fp16 on a GPU and on a CPU bf16 autocast over the whole detector "
             "where bf16 is faster (measured), else float32 (it says which); 'bf16' or 'fp32' forces either on any "
             "device, saying so where the measurement disagrees")


def choose_mixed_precision(mode: str, cuda_available: bool) -> tuple[Optional[torch.dtype], str]:
    """The autocast dtype for ``--amp MODE`` (None: float32) and the line that says why.

    ``auto``: float16 on a GPU (:func:`use_mixed_precision` says why not bf16), on a CPU the measured
    choice of :func:`cpu_mixed_precision`. ``bf16`` / ``fp32`` force that choice; on a CPU the line says
    when the measurement would have chosen otherwise, so that a forced bf16 on a CPU without fast bf16
    units (slow but real: every bf16 code path runs) is never mistaken for the automatic choice."""
    if mode not in AMP_MODES:
        raise ValueError(f"--amp takes one of {AMP_MODES[1:]} or nothing, got {mode!r}")
    device = "GPU" if cuda_available else "CPU"
    if cuda_available and mode == "auto":
        return torch.float16, "--amp on GPU: float16 autocast with dynamic loss scaling (AmpOptimWrapper)"
    if not cuda_available and mode == "auto":
        dtype, reason = cpu_mixed_precision()
        return dtype, f"--amp on CPU: {reason}"
    dtype = torch.bfloat16 if mode == "bf16" else None
    line = (f"--amp bf16 on {device}: bfloat16 autocast over the whole detector, float32 at the RoI ops and the "
            "heads' output layers, as asked" if dtype else f"--amp fp32 on {device}: float32, as asked")
    if not cuda_available:
        speedup = bf16_speedup("cpu")
        if (speedup >= FAST_BF16) != (dtype is not None):
            line += (f"; the measurement disagrees: bf16 matrix products run {speedup:.2f}x as fast as float32 on "
                     f"this CPU, so --amp alone would {'choose bf16' if speedup >= FAST_BF16 else 'stay in float32'}")
    return dtype, line


def use_mixed_precision(optim_wrapper: dict, cuda_available: bool, mode: str = "auto") -> str:
    """Switch an ``optim_wrapper`` config to the mixed precision ``--amp MODE`` chooses
    (:func:`choose_mixed_precision`; in place) and say how.

    float16: MMEngine's ``AmpOptimWrapper``, autocast over the whole model with dynamic loss
    scaling (float16, not bfloat16, by default on a GPU because mmcv 2.1's CUDA RoIAlign has
    float16 and float32 kernels only). bfloat16: :class:`AutocastOptimWrapper` on either device
    (``AmpOptimWrapper`` asserts an accelerator; ours runs the RoI ops in float32). A config that
    already asks for either wrapper is kept."""
    current = optim_wrapper.get("type", "OptimWrapper")
    if current in MIXED_PRECISION_WRAPPERS:
        return f"mixed precision is already enabled in the config ({current})"
    dtype, line = choose_mixed_precision(mode, cuda_available)
    if dtype == torch.float16:
        optim_wrapper["type"] = "AmpOptimWrapper"
        optim_wrapper.setdefault("dtype", "float16")
        optim_wrapper.setdefault("loss_scale", "dynamic")
    elif dtype == torch.bfloat16:
        optim_wrapper["type"] = "AutocastOptimWrapper"
        optim_wrapper.pop("loss_scale", None)
    return line


@contextmanager
def autocast_detector(model: nn.Module, dtype: torch.dtype = torch.bfloat16,
                      parts: Optional[Iterable[str]] = None):
    """Autocast ``model`` to ``dtype`` (module docstring); ``parts`` (e.g. ``("backbone", "neck")``)
    limits autocast to those submodules, which then hand float32 outputs on."""
    model = getattr(model, "module", model)
    device = next(model.parameters()).device.type
    composed = []
    if parts is not None:
        wrapped = [getattr(model, name) for name in parts if hasattr(model, name)]
        for module in wrapped:
            mmengine_api.override(module, "forward", _cast_outputs(_with_autocast(module.forward, device, dtype)))
    else:
        found = discover_head_outputs(model)
        wrapped = list(found.layers.values())
        for module in wrapped:
            mmengine_api.override(module, "forward", _in_float32(module.forward, device))
        for path, method in found.composers:
            module = model.get_submodule(path)
            mmengine_api.override(module, method, _in_float32(getattr(module, method), device))
            composed.append((module, method))
        roi_ops = [m for m in model.modules() if _is_roi_op(m)]
        for module in roi_ops:
            mmengine_api.override(module, "forward", _in_float32(module.forward, device, same_dtype_out=True))
        wrapped += roi_ops
    try:
        if parts is None:
            with torch.autocast(device_type=device, dtype=dtype):
                yield
        else:
            yield
    finally:
        for module in wrapped:
            mmengine_api.restore(module, "forward")
        for module, method in composed:
            mmengine_api.restore(module, method)


def _is_roi_op(module: nn.Module) -> bool:
    return type(module).__name__ in ("RoIAlign", "RoIPool") and type(module).__module__.startswith("mmcv")


def _with_autocast(forward, device: str, dtype: torch.dtype):
    def wrapped(*args, **kwargs):
        with torch.autocast(device_type=device, dtype=dtype):
            return forward(*args, **kwargs)
    return wrapped


def _in_float32(forward, device: str, same_dtype_out: bool = False):
    """Run ``forward`` without autocast on float32 inputs; ``same_dtype_out``: hand the result back
    in the first input's dtype (the RoI extractors write it into a tensor of that dtype)."""
    def wrapped(*args, **kwargs):
        with torch.autocast(device_type=device, enabled=False):
            out = forward(*_to_float32(args), **{k: _to_float32(v) for k, v in kwargs.items()})
        return out.to(args[0].dtype) if same_dtype_out else out
    return wrapped


def _cast_outputs(forward):
    return lambda *args, **kwargs: _to_float32(forward(*args, **kwargs))


def _to_float32(out):
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, (tuple, list)):
        return type(out)(_to_float32(o) for o in out)
    return out


@OPTIM_WRAPPERS.register_module()
class AutocastOptimWrapper(OptimWrapper):
    """bfloat16 autocast for training where MMEngine's ``AmpOptimWrapper`` (which asserts an
    accelerator) does not apply. bfloat16 keeps float32's exponent range: no loss scaling.
    ``autocast_modules=None`` autocasts the whole detector (:func:`autocast_detector`); a list
    of submodule names (e.g. ``('backbone', 'neck')``) only those. ``tools/train.py --amp``
    chooses it on CPUs with fast bf16."""

    def __init__(self, optimizer, dtype: str = "bfloat16", autocast_modules: Optional[Iterable[str]] = None,
                 **kwargs) -> None:
        super().__init__(optimizer, **kwargs)
        self.cast_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.autocast_modules = None if autocast_modules is None else tuple(autocast_modules)

    @contextmanager
    def optim_context(self, model: nn.Module):
        with super().optim_context(model), autocast_detector(model, self.cast_dtype, self.autocast_modules):
            yield
