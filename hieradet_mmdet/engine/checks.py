"""Checks of a detector with a HieraDet backbone, with errors that say what to change.

The usual mistake when swapping HieraDet into an existing MMDetection config is keeping the
neck of the ResNet config (``in_channels=[256, 512, 1024, 2048]``); MMDetection would only fail
at the first forward pass, deep inside a convolution. :func:`check_detector` catches it on a
built model: our tools call it, and ``custom_hooks=[dict(type='HieraDetCheckHook')]`` (in every
config shipped here) runs it in any MMEngine runner, MMDetection's own tools included.
"""

from __future__ import annotations

import logging
import warnings
from typing import Optional

from mmdet.registry import HOOKS
from mmengine.hooks import Hook
from mmengine.logging import print_log
from torch import nn

from .. import mmengine_adapter as mmengine_api
from ..archs import arch_name
from ..models.hieradet import HieraDet


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
    name = arch_name(backbone.arch)
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
    if mmengine_api.swaps_channels(pre) is False:
        out.append("data_preprocessor.bgr_to_rgb is False, but HieraDet weights were trained on RGB "
                   "images: set model.data_preprocessor.bgr_to_rgb=True")
    return out


def rgb_stats_mismatch(model: Optional[nn.Module], rgb_stats: Optional[dict]) -> Optional[str]:
    """The warning text when ``model``'s data_preprocessor does not normalise with ``rgb_stats``
    (a checkpoint's {"mean": (r, g, b), "std": (r, g, b)} in [0, 1]), or None if it does."""
    pre = getattr(model, "data_preprocessor", None)
    mean, std = getattr(pre, "mean", None), getattr(pre, "std", None)
    if mean is None or std is None or not rgb_stats or mmengine_api.normalizes(pre) is False:
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

    With ``warn``, preprocessing that does not fit the HieraDet weights (Caffe-style settings, or
    other statistics than the loaded checkpoint's ``rgb_stats``) is reported as a warning."""
    model = getattr(model, "module", model)  # inside (Distributed)DataParallel
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, HieraDet):
        return model
    msg = neck_mismatch(backbone, getattr(model, "neck", None))
    if msg:
        raise ValueError(msg)
    if warn:
        texts = preprocessing_warnings(model)
        mismatch = rgb_stats_mismatch(model, getattr(backbone, "pretrained_rgb_stats", None))
        for text in texts + ([mismatch] if mismatch else []):
            warnings.warn(text, stacklevel=2)
            print_log(text, logger="current", level=logging.WARNING)
    return model


class ConfigMergeError(ValueError):
    """A config's override of an inherited dict kept arguments its new ``type`` does not take."""


# Arguments of our hooks that MMEngine's hook of the same role does not take: a config that writes
# MMEngine's type over ours keeps them through MMEngine's dict merge, and MMEngine's CheckpointHook
# passes them on to Runner.save_checkpoint at the first save (a TypeError, hours into training).
OUR_HOOK_ARGUMENTS = {"CheckpointHook": ("SafeCheckpointHook", ("latest_interval_minutes", "latest_interval_iters"))}


def merged_hook_arguments(hooks) -> Optional[str]:
    """What is wrong (one line) when a built hook of MMEngine's carries one of our hook's arguments."""
    for hook in hooks:
        name = type(hook).__name__
        if name not in OUR_HOOK_ARGUMENTS:
            continue
        ours, arguments = OUR_HOOK_ARGUMENTS[name]
        kept = [a for a in arguments if a in getattr(hook, "args", {})]
        if kept:
            return (f"default_hooks.checkpoint is MMEngine's {name} with {ours}'s {', '.join(kept)} (kept from the "
                    f"inherited config by MMEngine's dict merge): write type='{ours}' to keep {kept[0]}, or "
                    f"default_hooks = dict(checkpoint=dict(_delete_=True, type='{name}', ...)) to drop it")
    return None


@HOOKS.register_module()
class HieraDetCheckHook(Hook):
    """Runs :func:`check_detector` in a runner: the neck against the backbone before anything
    runs, and the preprocessing against the loaded weights once they are loaded."""

    priority = "VERY_HIGH"

    def before_run(self, runner) -> None:
        check_detector(runner.model, warn=False)
        problem = merged_hook_arguments(getattr(runner, "hooks", []))
        if problem:
            raise ConfigMergeError(problem)

    def before_train(self, runner) -> None:
        check_detector(runner.model, warn=True)
