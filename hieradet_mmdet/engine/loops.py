"""Training loops that resume anywhere, at once, and repeat the uninterrupted run.

``train_cfg = dict(type='ResumableEpochBasedTrainLoop', max_epochs=12)`` (every config shipped
here; ``tools/train.py`` swaps MMEngine's ``EpochBasedTrainLoop`` / ``IterBasedTrainLoop`` for these
in any config) trains exactly as MMEngine's loops do, over the resumable data of
:mod:`.resumable_data`. What differs is resuming: from a checkpoint written inside an epoch
(:class:`~.checkpointing.SafeCheckpointHook` writes one every few minutes) the loop continues at
the next batch of that epoch, with the same remaining batches in the same order and the same
augmentation, without loading the batches already trained on; MMEngine's epoch loop can only
restart the epoch and its iteration loop loads every trained batch again.

A checkpoint of another number of processes or another batch size per process cannot be
continued exactly (each process's share of an epoch depends on both): resuming it is refused,
unless ``train_cfg.allow_inexact_resume=True``, which continues at the same share of the epoch in
the new layout (see :meth:`ResumableTrainLoop.resume_data`).
"""

from __future__ import annotations

import time
from typing import Optional

from mmdet.registry import LOOPS
from mmengine.dist import get_rank
from mmengine.logging import print_log
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop

from .. import mmengine_adapter as mmengine_api
from ..weights.errors import CheckpointError
from .resumable_data import ResumableBatchSampler, preserved_randomness, real_sampler, resumable_dataloader_config


class InexactResumeError(CheckpointError):
    """The checkpoint's data layout (processes x batch size) differs from this run's."""


class ResumableTrainLoop:
    """What both resumable loops add to MMEngine's: where they are in their data (mixin)."""

    def _resumable_setup(self, runner, dataloader, allow_inexact_resume: bool):
        self.allow_inexact_resume = bool(allow_inexact_resume)
        self.pass_index = 0        # passes over the data begun before the current one
        self.trained_in_pass = 0   # batches of the current pass trained on
        self.validation_due = False  # set on resuming from an epoch's end whose validation did not finish
        if isinstance(dataloader, dict):
            dataloader = resumable_dataloader_config(dataloader, runner.seed, get_rank())
        return dataloader

    @property
    def batch_sampler(self) -> Optional[ResumableBatchSampler]:
        sampler = getattr(self.dataloader, "batch_sampler", None)
        return sampler if isinstance(sampler, ResumableBatchSampler) else None

    def data_state(self) -> dict:
        """Where the data stands after the batches trained so far (for a checkpoint)."""
        return self.batch_sampler.state(self.pass_index, self.trained_in_pass)

    def resume_data(self, saved: list, world_size: int) -> Optional[str]:
        """Continue the data where the checkpoint's (one state per process) left it. Returns a
        note for the log when the resume is not exact (allow_inexact_resume), raises
        InexactResumeError when it cannot be and that was not allowed."""
        rank = get_rank()
        batch_size = self.batch_sampler.batch_size
        old_world, old_batch = len(saved), saved[0]["batch_size"]
        if (old_world, old_batch) == (world_size, batch_size):
            self._continue_at(saved[rank])
            return None
        layout = (f"the checkpoint was written by {old_world} process(es) with {old_batch} images each per "
                  f"batch, this run has {world_size} with {batch_size}")
        state = saved[0]
        share = state["batch"] * old_world * old_batch  # images of the epoch all processes trained on
        batch = min(share // (world_size * batch_size), len(self.dataloader))
        instead = (f"continues pass {state['pass']} at batch {batch} of {len(self.dataloader)} in the new layout "
                   f"(the same share of its images), with other images in each batch and without the checkpoint's "
                   f"random states, so it does not repeat the interrupted run")
        if not self.allow_inexact_resume:
            raise InexactResumeError(
                f"cannot resume exactly: {layout}, and every process's share of an epoch depends on both. Resume "
                f"with the same number of processes and train_dataloader.batch_size, or set "
                f"train_cfg.allow_inexact_resume=True (--cfg-options train_cfg.allow_inexact_resume=True): the "
                f"run then {instead}.")
        self._continue_at({"pass": state["pass"], "batch": batch, "seed": state.get("seed")}, replay=True)
        return f"resuming inexactly (allow_inexact_resume): {layout}; the run {instead}"

    def _continue_at(self, state: dict, replay: bool = False) -> None:
        self.pass_index, self.trained_in_pass = state["pass"], state["batch"]
        if state.get("seed") is not None:  # the run's seed, where the config sets none
            self.batch_sampler.seed = state["seed"]
        self.batch_sampler.resume_at(state, replay=replay)
        sampler = real_sampler(self.dataloader)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.pass_index)

    def run_iter_counted(self, idx, data_batch) -> None:
        """MMEngine's run_iter, counting the batch as trained before the after_train_iter hooks
        (where checkpoints are written) run."""
        self.runner.call_hook("before_train_iter", batch_idx=idx, data_batch=data_batch)
        outputs = self.runner.model.train_step(data_batch, optim_wrapper=self.runner.optim_wrapper)
        self.trained_in_pass += 1
        self.runner.call_hook("after_train_iter", batch_idx=idx, data_batch=data_batch, outputs=outputs)
        self._iter += 1

    def validate(self) -> None:
        """The validation loop, taking nothing from the training's random states (its data loader
        draws from them): training goes on as if it had not run, so a run resumed after a
        validation repeats the uninterrupted one."""
        with preserved_randomness():
            self.runner.val_loop.run()

    def _validate_if_due(self) -> None:
        if self.validation_due and self.runner.val_loop is not None:
            print_log("the validation after the checkpoint this run resumed from did not finish: running it first",
                      logger="current")
            self.validate()
        self.validation_due = False


@LOOPS.register_module()
class ResumableEpochBasedTrainLoop(ResumableTrainLoop, EpochBasedTrainLoop):
    """MMEngine's ``EpochBasedTrainLoop`` (same arguments) that resumes inside an epoch (module docstring)."""

    def __init__(self, runner, dataloader, max_epochs: int, val_begin: int = 1, val_interval: int = 1,
                 dynamic_intervals=None, allow_inexact_resume: bool = False) -> None:
        dataloader = self._resumable_setup(runner, dataloader, allow_inexact_resume)
        super().__init__(runner, dataloader, max_epochs, val_begin, val_interval, dynamic_intervals)
        mmengine_api.require_loop_state(self)

    def run(self):
        self.runner.call_hook("before_train")
        self._validate_if_due()
        while self._epoch < self._max_epochs and not self.stop_training:
            self.run_epoch()
            self._decide_current_val_interval()
            if (self.runner.val_loop is not None and self._epoch >= self.val_begin
                    and (self._epoch % self.val_interval == 0 or self._epoch == self._max_epochs)):
                self.validate()
        self.runner.call_hook("after_train")
        return self.runner.model

    def run_epoch(self) -> None:
        self.runner.call_hook("before_train_epoch")
        self.runner.model.train()
        if self.pass_index != self._epoch:  # resumed from an epoch's end: the next epoch starts afresh
            self.trained_in_pass = 0
        self.pass_index = self.batch_sampler.pass_index = self._epoch  # one pass over the data per epoch
        for idx, data_batch in enumerate(self.dataloader, self.trained_in_pass):
            self.run_iter(idx, data_batch)
        self.runner.call_hook("after_train_epoch")
        self._epoch += 1
        self.trained_in_pass = 0

    run_iter = ResumableTrainLoop.run_iter_counted

    def validation_due_at_checkpoint(self, epoch_end: bool) -> bool:
        """Whether the loop validates right after a checkpoint written now (at an epoch's end)."""
        epoch = self._epoch + 1
        return (epoch_end and self.runner.val_loop is not None and epoch >= self.val_begin
                and (epoch % self.val_interval == 0 or epoch == self._max_epochs))


@LOOPS.register_module()
class ResumableIterBasedTrainLoop(ResumableTrainLoop, IterBasedTrainLoop):
    """MMEngine's ``IterBasedTrainLoop`` (same arguments) that resumes without loading the batches
    it already trained on (module docstring)."""

    def __init__(self, runner, dataloader, max_iters: int, val_begin: int = 1, val_interval: int = 1000,
                 dynamic_intervals=None, allow_inexact_resume: bool = False) -> None:
        dataloader = self._resumable_setup(runner, dataloader, allow_inexact_resume)
        super().__init__(runner, dataloader, max_iters, val_begin, val_interval, dynamic_intervals)
        mmengine_api.require_loop_state(self)
        self._batches = None
        self.dataloader_iterator = None  # MMEngine's: replaced by _next_batch (no loader iterator made twice)

    def run(self):
        self.runner.call_hook("before_train")
        self.runner.call_hook("before_train_epoch")  # the whole run is one "epoch", as in MMEngine
        self._validate_if_due()
        while self._iter < self._max_iters and not self.stop_training:
            self.runner.model.train()
            self.run_iter(self._iter, self._next_batch())
            self._decide_current_val_interval()
            if (self.runner.val_loop is not None and self._iter >= self.val_begin
                    and (self._iter % self.val_interval == 0 or self._iter == self._max_iters)):
                self.validate()
        self.runner.call_hook("after_train_epoch")
        self.runner.call_hook("after_train")
        return self.runner.model

    run_iter = ResumableTrainLoop.run_iter_counted

    def _next_batch(self):
        """The next batch; at the end of a pass the next pass begins (new sampler epoch), as
        MMEngine's infinite dataloader iterator does."""
        if self._batches is None:
            self.batch_sampler.pass_index = self.pass_index
            self._batches = iter(self.dataloader)
        try:
            return next(self._batches)
        except StopIteration:
            self.pass_index += 1
            self.trained_in_pass = 0
            sampler = real_sampler(self.dataloader)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.pass_index)
            time.sleep(2)  # as MMEngine's loop: "prevent possible deadlock during epoch transition"
            self.batch_sampler.pass_index = self.pass_index
            self._batches = iter(self.dataloader)
            return next(self._batches)

    def validation_due_at_checkpoint(self, epoch_end: bool) -> bool:
        """Whether the loop validates right after a checkpoint written now (after an iteration)."""
        iteration = self._iter + 1
        return (self.runner.val_loop is not None and iteration >= self.val_begin
                and (iteration % self.val_interval == 0 or iteration == self._max_iters))

