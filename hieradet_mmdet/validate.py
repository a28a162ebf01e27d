"""Build-time checks for detectors with a HieraDet backbone, with errors that say what to change.

The usual mistake when swapping HieraDet into an existing MMDetection config is keeping the
neck of the ResNet config (``in_channels=[256, 512, 1024, 2048]``); MMDetection would only fail
at the first forward pass, deep inside a convolution. :func:`check_detector` catches it on a
built model, and :func:`install_build_checks` (run by ``import hieradet_mmdet``) runs the same
check while any detector is being built, by MMDetection's tools, ``Runner`` or ``MODELS.build``:
a PyTorch module-registration hook fires when a detector assigns its ``neck`` (or ``backbone``)
and looks at the two only if the backbone is a HieraDet; nothing in MMDetection is patched.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Optional, Sequence

from torch import nn

from .hieradet import ARCH_NAMES, HieraDet, resolve_arch


def arch_name(backbone: HieraDet) -> str:
    """The arch name a HieraDet was built from ('small', 'd_small', ...), or 'custom'."""
    return next((name for name in ARCH_NAMES if resolve_arch(name) == backbone.arch), "custom")


def _first_neck(neck: nn.Module) -> nn.Module:
    """The neck that receives the backbone features (MMDetection chains a list of necks in a Sequential)."""
    while isinstance(neck, nn.Sequential) and len(neck) > 0:
        neck = neck[0]
    return neck


def neck_mismatch(backbone: nn.Module, neck: Optional[nn.Module]) -> Optional[str]:
    """The error text for a neck that cannot take this HieraDet's outputs, or None if it can."""
    if not isinstance(backbone, HieraDet) or neck is None:
        return None
    neck = _first_neck(neck)
    in_channels = getattr(neck, "in_channels", None)
    if not isinstance(in_channels, (list, tuple)):
        return None  # a neck without a per-level channel list; nothing we can compare
    expected = [int(c) for c in backbone.out_channels]
    got = [int(c) for c in in_channels]
    if got == expected:
        return None
    name = arch_name(backbone)
    msg = (f"neck.in_channels {got} do not match HieraDet({name}) outputs {expected} "
           f"(out_indices={list(backbone.out_indices)}); set model.neck.in_channels={expected}")
    start = getattr(neck, "start_level", 0)
    if isinstance(start, int) and start > 0 and got == expected[start:]:
        msg += (f" ({type(neck).__name__}.in_channels lists every backbone output, including the "
                f"{start} that start_level={start} skips)")
    elif len(got) < len(backbone.channels):
        # Fewer levels may be intended: name the out_indices that would give exactly this list.
        tail = tuple(range(len(backbone.channels)))[-len(got):]
        if [backbone.channels[i] for i in tail] == got:
            msg += f", or model.backbone.out_indices={tail} to feed only the last {len(got)} stages"
    return msg


def preprocessing_warnings(model: nn.Module) -> list[str]:
    """Warnings for data preprocessing that does not suit HieraDet's RGB-trained weights."""
    pre = getattr(model, "data_preprocessor", None)
    if pre is None:
        return []
    out = []
    std = getattr(pre, "std", None)
    if std is not None and hasattr(std, "flatten") and bool((std.flatten() == 1).all()):
        out.append("data_preprocessor std is 1 (a Caffe-style ResNet setting); HieraDet weights expect "
                   "normalised RGB input: set model.data_preprocessor mean/std to the checkpoint's "
                   "rgb_stats (x255) and bgr_to_rgb=True")
    if getattr(pre, "_channel_conversion", True) is False:
        out.append("data_preprocessor.bgr_to_rgb is False, but HieraDet weights were trained on RGB "
                   "images: set model.data_preprocessor.bgr_to_rgb=True")
    return out


def rgb_stats_mismatch(model: Optional[nn.Module], rgb_stats: Optional[dict]) -> Optional[str]:
    """The warning text when ``model``'s data_preprocessor does not normalise with ``rgb_stats``
    (a checkpoint's {"mean": (r, g, b), "std": (r, g, b)} in [0, 1]), or None if it does."""
    pre = getattr(model, "data_preprocessor", None)
    mean, std = getattr(pre, "mean", None), getattr(pre, "std", None)
    if mean is None or std is None or not rgb_stats or not getattr(pre, "_enable_normalize", True):
        return None
    want_mean = [round(255 * float(v), 4) for v in rgb_stats["mean"]]
    want_std = [round(255 * float(v), 4) for v in rgb_stats["std"]]
    got_mean, got_std = mean.flatten().tolist(), std.flatten().tolist()
    if len(got_mean) != 3 or len(got_std) != 3:
        return None
    if all(abs(a - b) <= 0.5 for a, b in zip(got_mean + got_std, want_mean + want_std)):
        return None
    return (f"model.data_preprocessor normalises with mean={[round(v, 4) for v in got_mean]} "
            f"std={[round(v, 4) for v in got_std]}, but the HieraDet weights were trained with rgb_stats "
            f"mean={want_mean} std={want_std} (x255): set model.data_preprocessor.mean={want_mean}, "
            f"std={want_std}, bgr_to_rgb=True")


def check_detector(model: nn.Module, warn: bool = True) -> nn.Module:
    """Raise ValueError if ``model.neck`` cannot take ``model.backbone``'s outputs; returns the model.

    With ``warn``, preprocessing that does not fit HieraDet weights is reported as a warning."""
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, HieraDet):
        return model
    msg = neck_mismatch(backbone, getattr(model, "neck", None))
    if msg:
        raise ValueError(msg)
    if warn:
        for text in preprocessing_warnings(model):
            warnings.warn(text, stacklevel=2)
    return model


# ---- automatic check while a detector is built ----------------------------------------------

_hook_handle = None


def _on_submodule(module: nn.Module, name: str, submodule: Optional[nn.Module]):
    # Called for every submodule assignment in the process: keep the common path to one compare.
    if name == "neck":
        msg = neck_mismatch(module.__dict__.get("_modules", {}).get("backbone"), submodule)
    elif name == "backbone" and isinstance(submodule, HieraDet):
        # Lets the backbone compare the data preprocessing with its checkpoint's rgb_stats once
        # init_weights has read them (weak: the backbone must not keep its detector alive).
        submodule.__dict__["_detector_ref"] = weakref.ref(module)
        msg = neck_mismatch(submodule, module.__dict__.get("_modules", {}).get("neck"))
    else:
        return None
    if msg:
        raise ValueError(msg)
    return None


def install_build_checks() -> None:
    """Check the neck against a HieraDet backbone whenever a model assigns them (idempotent)."""
    global _hook_handle
    if _hook_handle is None:
        _hook_handle = nn.modules.module.register_module_module_registration_hook(_on_submodule)


def uninstall_build_checks() -> None:
    global _hook_handle
    if _hook_handle is not None:
        _hook_handle.remove()
        _hook_handle = None


__all__: Sequence[str] = ["check_detector", "neck_mismatch", "preprocessing_warnings", "rgb_stats_mismatch",
                          "arch_name", "install_build_checks", "uninstall_build_checks"]
