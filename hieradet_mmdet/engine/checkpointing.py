"""Checkpoints that a crash, a kill or a full disk cannot take away, and that resume exactly.

``default_hooks = dict(checkpoint=dict(type='SafeCheckpointHook', ...))`` (the arguments of
MMEngine's ``CheckpointHook``) changes how checkpoints are written and found again:

* written to a temporary file in the same folder, flushed to disk (fsync) and renamed, so a file
  named ``iter_N.pth`` is always complete; then the ``last_checkpoint`` pointer the same way,
  holding a path relative to the work dir (a moved work dir still resumes); only then are old
  checkpoints rotated away. A failed write (a full disk) stops training, removes the partial
  file and says which checkpoint is intact.
* every checkpoint carries a SHA-256 digest of its tensors (``meta['hieradet_digest']``), checked
  before resuming or loading; ``--resume`` without a path takes the newest checkpoint that
  verifies, and says so loudly when that is not the newest file.
* every checkpoint carries the random states in play (Python, NumPy, torch CPU and CUDA, for every
  rank, and the data sampler's seed); resuming restores them where the uninterrupted run would
  have had them, so a resumed run repeats the uninterrupted one bit for bit on CPU.
"""

from __future__ import annotations

import os
import os.path as osp
import random
import re
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from mmdet.registry import HOOKS
from mmengine.fileio.backends import LocalBackend
from mmengine.hooks import CheckpointHook
from mmengine.logging import print_log

from .. import mmengine_adapter as mmengine_api
from ..weights.digest import DIGEST_KEY, named_arrays, tensor_digest, verify_checkpoint
from ..weights.errors import CheckpointError
from ..weights.reader import load_file
from .finite_loss import NonFiniteLossError
from .loops import ResumableTrainLoop
from .resumable_data import real_sampler

RNG_KEY = "hieradet_rng"
DATA_KEY = "hieradet_data"
VALIDATION_KEY = "hieradet_validation_due"
POINTER = "last_checkpoint"
VALIDATED = "last_validated"  # the iteration after which the last validation finished
LATEST = "latest.pth"  # the rolling checkpoint written inside epochs
_CHECKPOINT_NAME = re.compile(r"^(?:iter|epoch)_(\d+)\.pth$")
_UNFINISHED = re.compile(r"^(?:\..+\.pth|last_checkpoint|last_validated)\.tmp-\d+$")


# ---- finding the checkpoint to resume from ---------------------------------------------------------

def read_pointer(work_dir: str) -> Optional[str]:
    """The checkpoint ``last_checkpoint`` names (a path relative to the work dir, or MMEngine's
    absolute one), or None if there is no usable pointer."""
    pointer = osp.join(work_dir, POINTER)
    try:
        with open(pointer) as f:
            text = f.read().strip()
    except OSError:
        return None
    if not text:
        return None
    if osp.isabs(text) and not osp.exists(text):  # written before the work dir was moved
        text = osp.basename(text)
    return text if osp.isabs(text) else osp.join(work_dir, text)


def checkpoints_in(work_dir: str) -> list[str]:
    """``iter_N.pth`` / ``epoch_N.pth`` files and the rolling ``latest.pth`` of a work dir."""
    try:
        names = [n for n in os.listdir(work_dir) if _CHECKPOINT_NAME.match(n) or n == LATEST]
    except OSError:
        return []
    return [osp.join(work_dir, n) for n in sorted(names)]


def training_progress(path: str) -> Optional[tuple[int, int]]:
    """(iteration, epoch) a checkpoint was written at, from its meta; None if it cannot be read."""
    try:
        content, _ = load_file(path, mmap=True)
        meta = content.get("meta", {})
        return int(meta["iter"]), int(meta.get("epoch", 0))
    except (CheckpointError, KeyError, TypeError, ValueError, AttributeError):
        return None


def find_resumable_checkpoint(work_dir: str, logger: str = "current") -> Optional[str]:
    """The newest checkpoint of ``work_dir`` that reads and verifies, with a warning naming what was
    skipped and why; None if there is none. Newest: the furthest training progress (iteration,
    then epoch) its meta records, whatever the file's name (a kill between a checkpoint's rename and
    the pointer's update leaves ``last_checkpoint`` one behind); files that cannot even be read are
    tried (and reported) first. A pointer to a file of another name (a custom ``filename_tmpl``)
    counts too."""
    pointed = read_pointer(work_dir)
    files = checkpoints_in(work_dir)
    if pointed and pointed not in files and osp.exists(pointed):
        files.append(pointed)
    progress = {path: training_progress(path) for path in files}
    unreadable = sorted((p for p in files if progress[p] is None), key=_number_in_name, reverse=True)
    readable = sorted((p for p in files if progress[p] is not None), key=lambda p: progress[p], reverse=True)
    skipped = []
    for path in unreadable + readable:
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            skipped.append(str(err))
            continue
        if skipped:
            print_log("\n".join(["!" * 80, f"RESUMING FROM {path}, NOT FROM THE NEWEST CHECKPOINT:", *skipped,
                                 "!" * 80]), logger=logger, level=30)
        return path
    if skipped:
        raise CheckpointError(f"no intact checkpoint in {work_dir} to resume from:\n" + "\n".join(skipped))
    return None


def _number_in_name(path: str) -> int:
    match = _CHECKPOINT_NAME.match(osp.basename(path))
    return int(match.group(1)) if match else -1


# ---- writing ------------------------------------------------------------------------------------------

def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(osp.dirname(path) or ".")


# ---- random states --------------------------------------------------------------------------------------

def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_python_state(state["python"]))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_python_state(value) -> tuple:
    """random.getstate() comes back from a checkpoint with its inner tuple as a list."""
    version, internal, gauss = value
    return version, tuple(internal), gauss


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


mmengine_api.require_checkpoint_writers()  # the methods overridden below: a clear error at import if they changed


@HOOKS.register_module()
class SafeCheckpointHook(CheckpointHook):
    """MMEngine's ``CheckpointHook`` (same arguments) with crash-safe writes, digests, a
    work-dir-relative pointer, fallback on resume and exact resume (module docstring), plus:

    Args:
        latest_interval_minutes: also write the rolling ``latest.pth`` when this much wall time has
            passed since the last checkpoint (default 10: a crash, a kill or a preempted node loses
            at most ten minutes of training, whatever the epoch's length). None: never by time.
        latest_interval_iters: also write ``latest.pth`` every this many iterations. None: never by count.

    ``latest.pth`` is replaced atomically each time, never rotated away and not counted by
    ``max_keep_ckpts``; it is written only under a resumable training loop (:mod:`.loops`), which
    can continue inside an epoch. ``save_best`` checkpoints are written atomically too (the
    previous best is removed only once the new one is complete).
    """

    def __init__(self, *args, latest_interval_minutes: Optional[float] = 10.0,
                 latest_interval_iters: Optional[int] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for name, value in (("latest_interval_minutes", latest_interval_minutes),
                            ("latest_interval_iters", latest_interval_iters)):
            if value is not None and value <= 0:
                raise ValueError(f"SafeCheckpointHook {name} must be positive or None, got {value}")
        self.latest_interval_s = None if latest_interval_minutes is None else 60.0 * latest_interval_minutes
        self.latest_interval_iters = latest_interval_iters
        self._rng_states: Optional[list] = None
        self._data_states: Optional[list] = None
        self._validation_due = False
        self._restore: Optional[dict] = None
        self._last_write = (time.monotonic(), -1)  # (when, at which iteration count) the last checkpoint was written
        self._warned_not_resumable = False

    # -- choosing and checking what to resume / load --

    def before_run(self, runner) -> None:
        if _world()[0] == 0 and osp.isdir(runner.work_dir):  # writes a killed run never finished
            for name in os.listdir(runner.work_dir):
                if _UNFINISHED.match(name):
                    os.remove(osp.join(runner.work_dir, name))
        load_from = mmengine_api.checkpoint_to_load(runner)
        if mmengine_api.resume_requested(runner) and load_from is None:
            mmengine_api.set_checkpoint_to_load(runner, find_resumable_checkpoint(runner.work_dir))
            if mmengine_api.checkpoint_to_load(runner) is None:
                print_log(f"no checkpoint in {runner.work_dir} to resume from: training from the start",
                          logger="current", level=30)
        elif load_from is not None and osp.isfile(load_from):
            verify_checkpoint(load_from)

    def before_train(self, runner) -> None:
        super().before_train(runner)
        mmengine_api.checkpoint_hook_state(self)  # what _save_checkpoint_with_step uses: fail here if it changed
        self._last_write = (time.monotonic(), runner.iter)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if not mmengine_api.resume_requested(runner):
            return
        meta = checkpoint.get("meta", {})
        rank, world = _world()
        loop = runner.train_loop
        data = meta.get(DATA_KEY)
        exact = True
        if data is not None and isinstance(loop, ResumableTrainLoop):
            note = loop.resume_data(data["ranks"], world)  # raises InexactResumeError where it cannot be exact
            if note:
                print_log(note, logger="current", level=30)
                exact = False
        if meta.get(VALIDATION_KEY) and hasattr(loop, "validation_due"):
            loop.validation_due = read_validated(runner.work_dir) < int(meta.get("iter", 0))
        saved = meta.get(RNG_KEY)
        if not saved or not exact:
            return
        states = saved["ranks"]
        if len(states) != world:
            print_log(f"the checkpoint holds random states of {len(states)} processes, this run has {world}: "
                      "they are not restored, and the resumed run will not repeat the interrupted one exactly",
                      logger="current", level=30)
            return
        self._restore = dict(state=states[rank])
        sampler = real_sampler(loop.dataloader)
        if saved.get("sampler_seed") is not None and hasattr(sampler, "seed"):
            sampler.seed = saved["sampler_seed"]
            if mmengine_api.loop_data_iterator(loop) is not None:  # made when the loop was built, with the old seed
                mmengine_api.restart_loop_data_iterator(loop)

    def before_train_epoch(self, runner) -> None:
        if self._restore is None:
            return
        state, self._restore = self._restore["state"], None
        loop = runner.train_loop
        iterator = mmengine_api.loop_data_iterator(loop)
        skip = loop.iter if iterator is not None else 0
        if skip == 0:  # an epoch-based or resumable loop trains its next batch right after this hook
            set_rng_state(state)
        else:  # MMEngine's iteration-based loop first replays the batches it already trained on
            mmengine_api.set_loop_data_iterator(loop, _RestoreAfter(loop, iterator, skip, state))

    # -- writing --

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        super().after_train_iter(runner, batch_idx, data_batch, outputs)
        if self._latest_due(runner):
            if isinstance(runner.train_loop, ResumableTrainLoop):
                self._write(runner, LATEST, dict(epoch=runner.epoch, iter=runner.iter + 1), by_epoch=False,
                            epoch_end=False)
            elif not self._warned_not_resumable:
                self._warned_not_resumable = True
                print_log(f"no {LATEST} inside epochs: {type(runner.train_loop).__name__} cannot resume there (the "
                          "Resumable* loops of hieradet_mmdet.engine.loops can)", logger="current", level=30)

    def _latest_due(self, runner) -> bool:
        """Whether the rolling checkpoint is due after this iteration (the same answer in every process)."""
        when, at = self._last_write
        done = runner.iter + 1
        if at == done:  # a checkpoint of this very iteration was just written
            return False
        due = self.latest_interval_iters is not None and done - max(at, 0) >= self.latest_interval_iters
        if self.latest_interval_s is not None and not due:
            due = time.monotonic() - when >= self.latest_interval_s
            if _world()[1] > 1:  # clocks differ between processes: rank 0 decides for all
                flag = [due]
                dist.broadcast_object_list(flag, src=0)
                due = flag[0]
        return bool(due)

    def _save_checkpoint_with_step(self, runner, step, meta) -> None:  # mmengine_api.CHECKPOINT_WRITER
        if not isinstance(self.file_backend, LocalBackend):
            print_log("SafeCheckpointHook writes atomically to local disks only; saving as CheckpointHook does",
                      logger="current", level=30)
            return super()._save_checkpoint_with_step(runner, step, meta)
        final = self._write(runner, self.filename_tmpl.format(step), meta, by_epoch=self.by_epoch,
                            epoch_end=self.by_epoch)
        self.last_ckpt = final
        runner.message_hub.update_info("last_ckpt", final)
        if self.max_keep_ckpts > 0:  # rotate only now that the new checkpoint is complete
            if not self.keep_ckpt_ids or self.keep_ckpt_ids[-1] != step:
                if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                    old = self.keep_ckpt_ids.popleft()
                    old_path = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(old))
                    if _world()[0] == 0 and osp.isfile(old_path) and old_path != final:
                        os.remove(old_path)
                self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info("keep_ckpt_ids", list(self.keep_ckpt_ids))

    def _write(self, runner, filename: str, meta: dict, by_epoch: bool, epoch_end: bool) -> str:
        """Write a training checkpoint named ``filename`` atomically (module docstring) with the random
        states and data positions of every process; returns its path."""
        _refuse_nonfinite(runner)
        loop = runner.train_loop
        self._rng_states = _gather(rng_state())
        self._data_states = _gather(loop.data_state()) if isinstance(loop, ResumableTrainLoop) else None
        due = getattr(loop, "validation_due_at_checkpoint", None)
        self._validation_due = bool(due(epoch_end)) if due is not None else False
        try:
            final = self._atomic_save(runner, runner.save_checkpoint, self.out_dir, filename,
                                      file_client_args=self.file_client_args,
                                      save_optimizer=self.save_optimizer,
                                      save_param_scheduler=self.save_param_scheduler, meta=meta,
                                      by_epoch=by_epoch, backend_args=self.backend_args, **self.args)
        finally:
            self._rng_states = self._data_states = None
            self._validation_due = False
        if _world()[0] == 0:
            atomic_write_text(osp.join(runner.work_dir, POINTER), osp.relpath(final, runner.work_dir))
        # iterations trained when it was written (after_train_epoch runs after the epoch's last count-up)
        self._last_write = (time.monotonic(), runner.iter if epoch_end else runner.iter + 1)
        return final

    def _atomic_save(self, runner, save, out_dir: str, filename: str, **kwargs) -> str:
        """``save`` (``runner.save_checkpoint``) into a temporary file, fsynced and renamed:
        ``filename`` only ever appears complete. A failed write (a full disk) removes the partial
        file and says what is intact."""
        final = self.file_backend.join_path(out_dir, filename)
        tmp_name = f".{filename}.tmp-{os.getpid()}"
        tmp = self.file_backend.join_path(out_dir, tmp_name)
        try:
            save(out_dir, tmp_name, **kwargs)
            if _world()[0] == 0:
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, final)
                _fsync_dir(out_dir)
        except OSError as err:
            if osp.exists(tmp):
                os.remove(tmp)
            try:
                intact = find_resumable_checkpoint(runner.work_dir, logger="silent")
            except CheckpointError:
                intact = None
            raise OSError(err.errno, f"could not write checkpoint {final}: {err.strerror or err}; nothing was "
                                     f"lost: {intact or 'no earlier checkpoint'} is intact and --resume continues "
                                     "from it once the problem (e.g. a full disk) is fixed") from err
        return final

    def _save_best_checkpoint(self, runner, metrics) -> None:  # mmengine_api.BEST_WRITER
        """MMEngine's save_best, its writes atomic and the previous best removed only after the new one."""
        if not self.save_best or not isinstance(self.file_backend, LocalBackend):
            return super()._save_best_checkpoint(runner, metrics)
        removed: list[str] = []
        save = mmengine_api.override(runner, "save_checkpoint", lambda out_dir, filename, **kwargs:
                                     self._atomic_save(runner, save, out_dir, filename, **kwargs))
        backend_remove = mmengine_api.override(self.file_backend, "remove", removed.append)
        try:
            super()._save_best_checkpoint(runner, metrics)
        finally:
            mmengine_api.restore(runner, "save_checkpoint")
            mmengine_api.restore(self.file_backend, "remove")
        for path in removed:
            if osp.abspath(path) != osp.abspath(self.best_ckpt_path or "") and osp.isfile(path):
                backend_remove(path)

    def after_val_epoch(self, runner, metrics) -> None:
        super().after_val_epoch(runner, metrics)
        if _world()[0] == 0 and osp.isdir(runner.work_dir):  # this validation is done: a resume need not redo it
            atomic_write_text(osp.join(runner.work_dir, VALIDATED), str(runner.iter))

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        sampler = real_sampler(runner.train_dataloader)
        checkpoint["meta"][RNG_KEY] = dict(ranks=self._rng_states or [rng_state()],
                                           sampler_seed=getattr(sampler, "seed", None))
        if self._data_states is not None:
            checkpoint["meta"][DATA_KEY] = dict(ranks=self._data_states)
        if self._validation_due:
            checkpoint["meta"][VALIDATION_KEY] = True
        checkpoint["meta"][DIGEST_KEY] = tensor_digest(checkpoint)


def _gather(value) -> list:
    """``value`` of every process, by rank (a collective in data-parallel runs)."""
    world = _world()[1]
    if world == 1:
        return [value]
    values = [None] * world
    dist.all_gather_object(values, value)
    return values


def read_validated(work_dir: str) -> int:
    """The iteration after which the last validation of the run in ``work_dir`` finished (-1: none)."""
    try:
        with open(osp.join(work_dir, VALIDATED)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return -1


def _refuse_nonfinite(runner) -> None:
    """Stop before writing a checkpoint of NaNs or infinities: a finite loss can still overflow the
    optimizer state (AdamW's squared gradients), and such a checkpoint is of no use to resume."""
    model = getattr(runner.model, "module", runner.model)
    parts = {"weights": model.state_dict(), "optimizer state": runner.optim_wrapper.state_dict()}
    for what, state in parts.items():
        bad = [name for name, t in named_arrays(state) if isinstance(t, torch.Tensor) and t.is_floating_point()
               and not bool(torch.isfinite(t).all())]
        if bad:
            raise NonFiniteLossError(
                f"training stopped at iteration {runner.iter + 1}: {len(bad)} tensors of the {what} are not finite "
                f"(e.g. {bad[0].lstrip('.')}), so that checkpoint was not written; the checkpoints saved so far are "
                "intact. Lower the learning rate, warm up longer or clip gradients, then continue with --resume.")


class _RestoreAfter:
    """The loop's data iterator, restoring the random state once the replayed batches are
    through (right where the uninterrupted run fetched its next batch), then stepping aside."""

    def __init__(self, loop, iterator, skip: int, state: dict) -> None:
        self.loop, self.iterator, self.skip, self.state = loop, iterator, skip, state

    def __iter__(self):
        return self

    def skip_iter(self, num_iters: int) -> None:
        """How the maintained fork's IterBasedTrainLoop (onedl-mmengine 0.10.12) passes the trained
        batches, instead of drawing them: through its iterator's skip_iter (at the sampler where it can)."""
        self.iterator.skip_iter(num_iters)
        self.skip -= min(self.skip, num_iters)

    def __next__(self):
        if self.skip == 0:
            set_rng_state(self.state)
            mmengine_api.set_loop_data_iterator(self.loop, self.iterator)
            return next(self.iterator)
        self.skip -= 1
        return next(self.iterator)
