"""MMEngine's private API, behind one door.

What this package needs from MMEngine 0.10 beyond its documented API goes through here: private
attributes of the Runner, the training loops, the optimizer wrapper and the data preprocessor;
the private method of ``CheckpointHook`` that :class:`~hieradet_mmdet.engine.SafeCheckpointHook`
overrides; the pickle layout of MMEngine's log buffers in checkpoints; and the instance
attributes set over bound methods that MMEngine looks up on the instance. Each contact has a test
of its own (tests/test_mmengine_adapter.py) against the installed MMEngine, so an MMEngine release
that changes one fails there, by name, with a :class:`MMEngineChanged` that says what changed and
which version this package was written against -- not somewhere inside a training run.

This module imports MMEngine only (no other module of this package).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import mmengine

TESTED_WITH = "0.10.7"  # the MMEngine release every contact below is tested against


class MMEngineChanged(RuntimeError):
    """MMEngine no longer has something this package relies on."""

    def __init__(self, contact: str, detail: str) -> None:
        super().__init__(
            f"MMEngine {mmengine.__version__} changed {contact}: {detail}. hieradet-mmdet relies on it and is "
            f"tested with mmengine {TESTED_WITH} (pip install mmengine=={TESTED_WITH}); the contact is in "
            "hieradet_mmdet/mmengine_adapter.py")


def _attribute(obj: Any, name: str, contact: str) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError:
        raise MMEngineChanged(contact, f"{type(obj).__name__} has no attribute {name!r}") from None


def _require_method(cls: type, name: str, params: tuple[str, ...], contact: str) -> None:
    method = getattr(cls, name, None)
    if not callable(method):
        raise MMEngineChanged(contact, f"{cls.__name__}.{name} does not exist")
    got = tuple(inspect.signature(method).parameters)[1:]
    if got[:len(params)] != params:
        raise MMEngineChanged(contact, f"{cls.__name__}.{name} takes {got}, not {params}")


# ---- Runner: what --resume and load_from asked for --------------------------------------------------
# Runner.__init__ keeps cfg.resume / cfg.load_from as _resume / _load_from and reads them in
# load_or_resume(), after the hooks' before_run: a hook may choose the checkpoint there.

def resume_requested(runner) -> bool:
    return bool(_attribute(runner, "_resume", "Runner._resume"))


def checkpoint_to_load(runner) -> Optional[str]:
    return _attribute(runner, "_load_from", "Runner._load_from")


def set_checkpoint_to_load(runner, path: Optional[str]) -> None:
    _attribute(runner, "_load_from", "Runner._load_from")
    runner._load_from = path


# ---- CheckpointHook: the method that writes every periodic checkpoint ------------------------------
# after_train_iter / after_train_epoch and _save_best_checkpoint all end in
# _save_checkpoint_with_step(runner, step, meta); overriding it changes how checkpoints are written
# while the hook's schedule (interval, by_epoch, save_last, max_keep_ckpts) stays MMEngine's.

CHECKPOINT_WRITER = "_save_checkpoint_with_step"
# The hook's state that an override of the writer uses, set by CheckpointHook.__init__ / before_train.
# (keep_ckpt_ids, the rotation's queue, only exists with max_keep_ckpts > 0.)
CHECKPOINT_HOOK_STATE = ("filename_tmpl", "out_dir", "file_backend", "file_client_args", "backend_args", "args",
                         "save_optimizer", "save_param_scheduler", "by_epoch", "max_keep_ckpts", "last_ckpt")


def require_checkpoint_writer() -> None:
    """Raise MMEngineChanged unless CheckpointHook still writes through CHECKPOINT_WRITER."""
    from mmengine.hooks import CheckpointHook

    _require_method(CheckpointHook, CHECKPOINT_WRITER, ("runner", "step", "meta"), "CheckpointHook's writer")


def checkpoint_hook_state(hook) -> dict:
    """The CheckpointHook attributes a writer override needs (after before_train), by name."""
    names = CHECKPOINT_HOOK_STATE + (("keep_ckpt_ids",) if getattr(hook, "max_keep_ckpts", -1) > 0 else ())
    return {name: _attribute(hook, name, "CheckpointHook's state") for name in names}


# ---- OptimWrapper: gradient clipping ----------------------------------------------------------------
# OptimWrapper.step() calls self._clip_grad() when clip_grad is set; _clip_grad writes the norm into
# the message hub under 'train/grad_norm'.

GRAD_NORM_KEY = "train/grad_norm"


def wrap_gradient_clipping(wrapper, around: Callable[[Callable[[], None]], None]) -> None:
    """From now on ``wrapper`` clips its gradients through ``around(clip)``, ``clip`` being MMEngine's."""
    clip = _attribute(wrapper, "_clip_grad", "OptimWrapper._clip_grad")
    override(wrapper, "_clip_grad", lambda: around(clip))


def last_gradient_norm(message_hub) -> float:
    try:
        return float(message_hub.get_scalar(GRAD_NORM_KEY).current())
    except KeyError:
        raise MMEngineChanged("OptimWrapper._clip_grad", f"no {GRAD_NORM_KEY!r} in the message hub after clipping") \
            from None


# ---- data preprocessors: what they do to the pixels ----------------------------------------------
# ImgDataPreprocessor keeps bgr_to_rgb / rgb_to_bgr as _channel_conversion and whether mean and std
# were given as _enable_normalize.

def swaps_channels(preprocessor) -> Optional[bool]:
    """Whether an image preprocessor swaps BGR and RGB; None for other preprocessors."""
    if not _is_image_preprocessor(preprocessor):
        return None
    return bool(_attribute(preprocessor, "_channel_conversion", "ImgDataPreprocessor._channel_conversion"))


def normalizes(preprocessor) -> Optional[bool]:
    """Whether an image preprocessor subtracts ``mean`` and divides by ``std``; None for others."""
    if not _is_image_preprocessor(preprocessor):
        return None
    return bool(_attribute(preprocessor, "_enable_normalize", "ImgDataPreprocessor._enable_normalize"))


def _is_image_preprocessor(preprocessor) -> bool:
    from mmengine.model import ImgDataPreprocessor

    return isinstance(preprocessor, ImgDataPreprocessor)


# ---- instance attributes over bound methods ------------------------------------------------------
# MMEngine calls model.parse_losses, model.test_step, optim_wrapper.update_params and
# optim_wrapper._clip_grad through the instance (and torch calls module.forward so), so an instance
# attribute of that name replaces the method for that one object.

def override(obj, name: str, replacement: Callable) -> Callable:
    """Replace the method ``name`` of this one object by ``replacement``; returns the method it replaced."""
    original = _attribute(obj, name, f"{type(obj).__name__}.{name}")
    setattr(obj, name, replacement)
    return original


def is_overridden(obj, name: str) -> bool:
    return name in vars(obj)


def restore(obj, name: str) -> None:
    """Back to the class's method after :func:`override`."""
    vars(obj).pop(name, None)


# ---- IterBasedTrainLoop: its data iterator -------------------------------------------------------
# IterBasedTrainLoop builds dataloader_iterator (an _InfiniteDataloaderIterator over its dataloader)
# in __init__ and draws every batch from it; EpochBasedTrainLoop iterates its dataloader directly.

def loop_data_iterator(loop) -> Optional[Any]:
    """The iterator an iteration-based loop draws batches from; None for an epoch-based loop."""
    return getattr(loop, "dataloader_iterator", None)


def set_loop_data_iterator(loop, iterator) -> None:
    _attribute(loop, "dataloader_iterator", "IterBasedTrainLoop.dataloader_iterator")
    loop.dataloader_iterator = iterator


def restart_loop_data_iterator(loop) -> None:
    """A new iterator over the loop's dataloader (e.g. after the sampler's seed changed)."""
    current = _attribute(loop, "dataloader_iterator", "IterBasedTrainLoop.dataloader_iterator")
    loop.dataloader_iterator = type(current)(loop.dataloader)


# ---- the log buffers MMEngine pickles into checkpoints -------------------------------------------
# meta['message_hub'] holds HistoryBuffer objects, which pickle their statistics methods as
# getattr(HistoryBuffer, name) for the names registered by _set_default_statistics.

HISTORY_BUFFER_STATISTICS = ("min", "max", "current", "mean")


def history_buffer_class() -> type:
    from mmengine.logging.history_buffer import HistoryBuffer

    return HistoryBuffer
