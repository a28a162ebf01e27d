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

:func:`use_mixed_precision` is where ``tools/train.py --amp`` decides, on a GPU and on a CPU.
"""

from __future__ import annotations

import copy
import functools
import sys
import time
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS
from torch import nn
from torch.overrides import TorchFunctionMode

from .. import mmengine_adapter as mmengine_api

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


def use_mixed_precision(optim_wrapper: dict, cuda_available: bool) -> str:
    """Switch an ``optim_wrapper`` config to mixed precision (in place) where it pays, and say how.

    On a GPU: MMEngine's ``AmpOptimWrapper``, float16 autocast over the whole model with dynamic
    loss scaling. float16, not bfloat16, because mmcv 2.1's CUDA RoIAlign has float16 and float32
    kernels only. On a CPU with fast bf16 (:func:`cpu_mixed_precision`): :class:`AutocastOptimWrapper`
    (``AmpOptimWrapper`` asserts an accelerator); elsewhere the config stays float32. A config that
    already asks for either wrapper is kept."""
    current = optim_wrapper.get("type", "OptimWrapper")
    if current in MIXED_PRECISION_WRAPPERS:
        return f"mixed precision is already enabled in the config ({current})"
    if cuda_available:
        optim_wrapper["type"] = "AmpOptimWrapper"
        optim_wrapper.setdefault("dtype", "float16")
        optim_wrapper.setdefault("loss_scale", "dynamic")
        return "--amp on GPU: float16 autocast with dynamic loss scaling (AmpOptimWrapper)"
    dtype, reason = cpu_mixed_precision()
    if dtype is not None:
        optim_wrapper["type"] = "AutocastOptimWrapper"
        optim_wrapper.pop("loss_scale", None)
    return f"--amp on CPU: {reason}"


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
        composed = []
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


# ---- which layers are the heads' output layers: found from what the heads compute -------------
# A head is a module of the detector whose attribute name ends in "head" (MMDetection's convention:
# rpn_head, bbox_head, roi_head.mask_head, panoptic_head, ...) or an element of a ModuleList of such
# a name (Cascade R-CNN's stages), with parameters and no head inside it. Its outputs are what its
# forward returns, and what its submodules return where something outside the head calls them
# (DINO's decoder and encoder-output selection call the head's cls / reg branches). One probe
# forward of the detector in tensor mode, on a small random image with autograd on, records which
# Linear / Conv layer produced which tensor; from each head output the autograd graph is walked back
# along every path to the first such layer: those are the output layers, the layers after which
# only parameter-free or elementwise ops (FCOS's Scale, sigmoid, adding reference points) come.
# Where a path to an output layer passes through a matrix product that is no layer (Mask2Former's
# mask logits: an einsum of the mask embedding and the pixel decoder's mask features), the method
# of the module that ran it (the nearest enclosing module method) is a composer: under
# autocast_detector it runs in float32 as a whole.

# The probe: two images (GroupNorm wants more than one value per group on FCOS's 1 x 1 stride-128
# level) of PROBE_SIZE px, small enough that the probe costs little next to one real forward.
PROBE_SIZE = 64
MODULE_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
                "_forward_hooks_always_called")
LAYER_TYPES = (nn.Linear, nn.modules.conv._ConvNd)
# autograd nodes of the ops CPU / CUDA autocast runs in low precision (matrix products, convolutions)
LOW_PRECISION_NODES = ("MmBackward", "BmmBackward", "AddmmBackward", "BaddbmmBackward", "AddbmmBackward",
                       "ConvolutionBackward", "MvBackward", "DotBackward", "LinalgVecdotBackward",
                       "ScaledDotProductAttentionBackward", "ScaledDotProductFlashAttentionForCpuBackward")


@dataclass
class HeadOutputs:
    """What the probe found: output ``layers`` (module path -> module), for each head the paths of
    its output layers per output (``per_head``: head path -> [(output index, layer path)]) and the
    ``composers`` ((module path, method name) run in float32)."""
    layers: dict = field(default_factory=dict)
    per_head: dict = field(default_factory=dict)
    composers: list = field(default_factory=list)


_DISCOVERED: "weakref.WeakKeyDictionary[nn.Module, HeadOutputs]" = weakref.WeakKeyDictionary()


def output_layers(model: nn.Module) -> list[nn.Module]:
    """The heads' output layers of ``model`` (see above), in module order."""
    return list(discover_head_outputs(model).layers.values())


def heads(model: nn.Module) -> dict[str, nn.Module]:
    """The heads of a detector by module path (see above)."""
    lists = (nn.ModuleList, nn.ModuleDict)
    found = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        named = all(part.endswith("head") or (i > 0 and isinstance(model.get_submodule(".".join(parts[:i])), lists))
                    for i, part in enumerate(parts))
        if name and named and not isinstance(module, lists) and any(True for _ in module.parameters()):
            found[name] = module
    return {n: m for n, m in found.items() if not any(o.startswith(n + ".") for o in found)}


def discover_head_outputs(model: nn.Module) -> HeadOutputs:
    """The probe (see above), once per model."""
    model = getattr(model, "module", model)
    if model not in _DISCOVERED:
        _DISCOVERED[model] = _probe(model)
    return _DISCOVERED[model]


def _probe(model: nn.Module) -> HeadOutputs:
    from mmdet.structures import DetDataSample

    names = {m: n for n, m in model.named_modules()}
    head_of = {}
    for head_name, head in heads(model).items():
        for module in head.modules():
            head_of[module] = head_name
    produced, outputs, running = {}, [], {h: 0 for h in set(head_of.values())}
    frames = {}

    def pre(module, args):
        running[head_of[module]] += 1

    def post(module, args, out):
        head_name = head_of[module]
        running[head_name] -= 1
        if running[head_name] == 0:
            outputs.append((head_name, out))

    def head_forward(head, forward):  # detectors call some heads' forward directly, past the hooks
        def wrapped(*args, **kwargs):
            pre(head, args)
            out = forward(*args, **kwargs)
            post(head, args, out)
            return out
        return wrapped

    def layer_out(module, args, kwargs, out):
        """Every autograd node the layer made (a later in-place op on its output, as DETR heads add
        the reference points, goes back past the output's own node to the matrix product)."""
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            before = {a.grad_fn for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
            nodes = [out.grad_fn]
            while nodes:
                node = nodes.pop()
                if node is not None and node not in before and node not in produced:
                    produced[node] = names[module]
                    nodes.extend(parent for parent, _ in node.next_functions)

    # The model's own forward hooks (timers, recorders) are set aside: the probe is not a forward of theirs.
    own_hooks = {m: {a: getattr(m, a) for a in MODULE_HOOKS} for m in model.modules()}
    for module in own_hooks:
        for attribute in MODULE_HOOKS:
            setattr(module, attribute, OrderedDict())
    hooks = [m.register_forward_hook(layer_out, with_kwargs=True) for m in model.modules() if isinstance(m, LAYER_TYPES)]
    head_modules = heads(model).values()
    for module in head_of:
        if module in head_modules:
            mmengine_api.override(module, "forward", head_forward(module, module.forward))
        else:
            hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    device = next(model.parameters()).device
    size = (PROBE_SIZE, PROBE_SIZE)
    sample = DetDataSample(metainfo=dict(img_shape=size, ori_shape=size, pad_shape=size, batch_input_shape=size,
                                         scale_factor=(1.0, 1.0)))
    training = {m: m.training for m in model.modules()}
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast(device_type=device.type, enabled=False), _RecordFrames(names, frames):
            model.eval()
            inputs = torch.randn(2, 3, *size, device=device, requires_grad=True)
            model(inputs, [sample, copy.deepcopy(sample)], mode="tensor")
    finally:
        for hook in hooks:
            hook.remove()
        for module in head_modules:
            mmengine_api.restore(module, "forward")
        for module, saved in own_hooks.items():
            for attribute, value in saved.items():
                setattr(module, attribute, value)
        for module, mode in training.items():
            module.training = mode
    found, counts = HeadOutputs(), {}
    for head_name, out in outputs:
        per_output = found.per_head.setdefault(head_name, [])
        for tensor in _tensors(out):
            index = counts[head_name] = counts.get(head_name, -1) + 1
            for layer, composers in _walk_to_layers(tensor.grad_fn, produced, frames):
                per_output.append((index, layer))
                for composer in composers:
                    if composer not in found.composers:
                        found.composers.append(composer)
    paths = {layer for outs in found.per_head.values() for _, layer in outs}
    found.layers = {n: m for n, m in model.named_modules() if n in paths}
    return found


def _walk_to_layers(node, produced: dict, frames: dict):
    """(layer path, composers on the way) for the first layer on every path back from ``node``."""
    found, seen = {}, set()
    stack = [(node, None, ())]
    while stack:
        node, frame, composers = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in produced:
            found.setdefault(produced[node], set()).update(composers)
            continue
        frame = frames.get(node, frame)
        if frame is not None and type(node).__name__.startswith(LOW_PRECISION_NODES):
            composers = composers + (frame,)
        stack.extend((parent, frame, composers) for parent, _ in node.next_functions)
    return [(layer, sorted(c)) for layer, c in found.items()]


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() and out.grad_fn is not None else []
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


class _RecordFrames(TorchFunctionMode):
    """For each tensor a torch function makes: the module method that called it
    ((module path, method name) of the nearest enclosing frame whose ``self`` is a module of the
    model), keyed by the tensor's autograd node."""

    def __init__(self, names: dict, frames: dict) -> None:
        super().__init__()
        self.names, self.frames = names, frames

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.grad_fn is not None and out.grad_fn not in self.frames:
            frame = sys._getframe(1)
            while frame is not None:
                owner = frame.f_locals.get("self")
                if isinstance(owner, nn.Module) and owner in self.names:
                    self.frames[out.grad_fn] = (self.names[owner], frame.f_code.co_name)
                    break
                frame = frame.f_back
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
