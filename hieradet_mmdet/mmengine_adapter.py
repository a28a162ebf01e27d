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

def skip_config_formatting(cfg) -> None:
    """Config text (``pretty_text``, ``dump``) without yapf formatting: MMEngine 0.10's
    ``Config.fromfile`` drops its ``format_python_code`` argument for ordinary config files, so the
    flag is set on the config itself."""
    _attribute(cfg, "_format_python_code", "Config._format_python_code")
    object.__setattr__(cfg, "_format_python_code", False)


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
# _save_best_checkpoint(runner, metrics) writes save_best's checkpoints (after_val_epoch): through
# runner.save_checkpoint, removing the previous best with file_backend.remove, keeping its path in
# best_ckpt_path.
BEST_WRITER = "_save_best_checkpoint"
# The hook's state that an override of the writer uses, set by CheckpointHook.__init__ / before_train.
# (keep_ckpt_ids, the rotation's queue, only exists with max_keep_ckpts > 0.)
CHECKPOINT_HOOK_STATE = ("filename_tmpl", "out_dir", "file_backend", "file_client_args", "backend_args", "args",
                         "save_optimizer", "save_param_scheduler", "by_epoch", "max_keep_ckpts", "last_ckpt")


def require_checkpoint_writers() -> None:
    """Raise MMEngineChanged unless CheckpointHook still writes through CHECKPOINT_WRITER and BEST_WRITER."""
    from mmengine.hooks import CheckpointHook

    _require_method(CheckpointHook, CHECKPOINT_WRITER, ("runner", "step", "meta"), "CheckpointHook's writer")
    _require_method(CheckpointHook, BEST_WRITER, ("runner", "metrics"), "CheckpointHook's best writer")


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


# ---- samplers: their index order, to start it anywhere ------------------------------------------
# InfiniteSampler concatenates permutations of range(size) drawn from one torch.Generator seeded
# with its seed (or range(size) itself without shuffle) and takes every world_size-th index from
# its rank on. DefaultSampler's epoch is a finite list (iter(sampler) computes it at once).

def is_default_sampler(sampler) -> bool:
    from mmengine.dataset import DefaultSampler

    return isinstance(sampler, DefaultSampler)


def is_infinite_sampler(sampler) -> bool:
    from mmengine.dataset import InfiniteSampler

    return isinstance(sampler, InfiniteSampler)


def infinite_sampler_indices(sampler, start: int):
    """``iter(sampler)`` of an InfiniteSampler from its ``start``-th index on, drawing only the
    permutations before that position (not the indices)."""
    import torch

    contact = "InfiniteSampler's order"
    size, world, rank, shuffle, seed = (_attribute(sampler, name, contact)
                                        for name in ("size", "world_size", "rank", "shuffle", "seed"))
    generator = torch.Generator()
    generator.manual_seed(seed)
    permutation, offset = divmod(rank + start * world, size)
    for _ in range(permutation if shuffle else 0):
        torch.randperm(size, generator=generator)
    while True:
        order = torch.randperm(size, generator=generator) if shuffle else torch.arange(size)
        yield from order[offset::world].tolist()
        offset += world * -(-(size - offset) // world) - size  # where the rank's next index falls in the next one


# ---- batch samplers: what they hold back between batches -----------------------------------------
# MMDetection's AspectRatioBatchSampler (and its subclasses) keep the indices not yet batched in
# _aspect_ratio_buckets (two lists: portrait and landscape images).

def held_back(batch_sampler, handed_out: Optional[list] = None) -> Optional[list]:
    """The indices a batch sampler holds back for later batches (a copy), or None when it holds none
    we know of (torch's BatchSampler holds none; other kinds are not known). ``handed_out``: the
    batch it has just yielded -- AspectRatioBatchSampler empties the bucket it yielded only when
    the next batch is asked for, so that bucket counts as empty."""
    buckets = getattr(batch_sampler, "_aspect_ratio_buckets", None)
    if buckets is None:
        return None
    return [[] if handed_out is not None and list(bucket) == list(handed_out) else list(bucket) for bucket in buckets]


def set_held_back(batch_sampler, buckets: Optional[list]) -> None:
    if buckets is not None:
        _attribute(batch_sampler, "_aspect_ratio_buckets", "AspectRatioBatchSampler._aspect_ratio_buckets")
        batch_sampler._aspect_ratio_buckets = [list(bucket) for bucket in buckets]


# ---- the training loops' state ------------------------------------------------------------------
# The resumable loops (engine/loops.py) subclass EpochBasedTrainLoop / IterBasedTrainLoop and run
# their epochs and iterations as MMEngine's do, with the same state: Runner.resume() sets _epoch and
# _iter from the checkpoint's meta, EarlyStoppingHook sets stop_training, and
# _decide_current_val_interval() updates val_interval.

LOOP_STATE = ("_epoch", "_iter", "_max_epochs", "_max_iters", "stop_training", "val_begin", "val_interval",
              "_decide_current_val_interval")


def require_loop_state(loop) -> None:
    """Raise MMEngineChanged unless the training loop has the state its subclasses here use."""
    for name in LOOP_STATE:
        _attribute(loop, name, f"{type(loop).__mro__[-3].__name__}'s state")


# ---- Runner._maybe_compile: what compile=True did to the model -------------------------------------
# Runner.train() calls _maybe_compile('train_step') before the training loop: with cfg.compile set it
# replaces the method by torch.compile(model.train_step, **options), as an instance attribute.

COMPILED_TARGET = "train_step"


def undo_train_step_compile(model) -> bool:
    """Back to the model's own (eager) train_step after Runner._maybe_compile; whether it had been compiled."""
    compiled = vars(model).get(COMPILED_TARGET)
    if compiled is None:
        return False
    if not hasattr(compiled, "_torchdynamo_orig_callable") and not hasattr(compiled, "__wrapped__"):
        raise MMEngineChanged("Runner._maybe_compile", f"model.{COMPILED_TARGET} is set on the instance but is not "
                              f"what torch.compile returns ({type(compiled).__name__})")
    restore(model, COMPILED_TARGET)
    return True
