"""Which layers are a detector's heads' output layers, found from what the heads compute.

A head is a module of the detector whose attribute name ends in "head" (MMDetection's convention:
rpn_head, bbox_head, roi_head.mask_head, panoptic_head, ...) or an element of a ModuleList of such
a name (Cascade R-CNN's stages), with parameters and no head inside it. Its outputs are what its
forward returns, and what its submodules return where something outside the head calls them
(DINO's decoder and encoder-output selection call the head's cls / reg branches). One probe
forward of the detector in tensor mode, on a small random image with autograd on, records which
Linear / Conv layer produced which tensor; from each head output the autograd graph is walked back
along every path to the first such layer: those are the output layers, the layers after which
only parameter-free or elementwise ops (FCOS's Scale, sigmoid, adding reference points) come.
Where a path to an output layer passes through a matrix product that is no layer (Mask2Former's
mask logits: an einsum of the mask embedding and the pixel decoder's mask features), the method
of the module that ran it (the nearest enclosing module method) is a composer: under
autocast_detector it runs in float32 as a whole.

Used by :func:`hieradet_mmdet.engine.amp.autocast_detector` (those layers and composers run in
float32 under bf16 autocast) and by the benchmark's neutral heads (those layers zeroed).
"""

from __future__ import annotations

import copy
import sys
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .. import mmengine_adapter as mmengine_api

# The probe: two images (GroupNorm wants more than one value per group on FCOS's 1 x 1 stride-128
# level) of the smallest of PROBE_SIZES px the detector runs at, so that the probe costs little next
# to one real forward: 64 px for most, 256 for DINO, which selects its 900 queries among the
# encoder's tokens (85 at 64 px, 1,360 at 256).
PROBE_SIZES = (64, 256, 512)
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
        for size in PROBE_SIZES:
            try:
                _DISCOVERED[model] = _probe(model, size)
                break
            except RuntimeError as error:  # too small for the detector (e.g. fewer tokens than queries)
                failure = error
        else:
            raise RuntimeError(f"cannot find the output layers of {type(model).__name__}'s heads: a forward of "
                               f"{PROBE_SIZES[-1]} x {PROBE_SIZES[-1]} px images failed: {failure}") from failure
    return _DISCOVERED[model]


def _probe(model: nn.Module, probe_size: int) -> HeadOutputs:
    from mmdet.structures import DetDataSample

    names = {m: n for n, m in model.named_modules()}
    head_modules = heads(model)
    head_of = {}
    for head_name, head in head_modules.items():
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
    for module in head_of:
        if module in head_modules.values():
            mmengine_api.override(module, "forward", head_forward(module, module.forward))
        else:
            hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    device = next(model.parameters()).device
    size = (probe_size, probe_size)
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
        for module in head_modules.values():
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
