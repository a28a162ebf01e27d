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
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from mmdet.registry import HOOKS
from mmengine.fileio.backends import LocalBackend
from mmengine.hooks import CheckpointHook
from mmengine.logging import print_log

from ..weights.digest import DIGEST_KEY, named_arrays, tensor_digest, verify_checkpoint
from ..weights.errors import CheckpointError
from .finite_loss import NonFiniteLossError

RNG_KEY = "hieradet_rng"
POINTER = "last_checkpoint"
_CHECKPOINT_NAME = re.compile(r"^(?:iter|epoch)_(\d+)\.pth$")
_UNFINISHED = re.compile(r"^(?:\.(?:iter|epoch)_\d+\.pth|last_checkpoint)\.tmp-\d+$")


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
    """``iter_N.pth`` / ``epoch_N.pth`` files of a work dir, newest (highest N) first."""
    try:
        names = [n for n in os.listdir(work_dir) if _CHECKPOINT_NAME.match(n)]
    except OSError:
        return []
    names.sort(key=lambda n: (int(_CHECKPOINT_NAME.match(n).group(1)), n.startswith("iter")), reverse=True)
    return [osp.join(work_dir, n) for n in names]


def find_resumable_checkpoint(work_dir: str, logger: str = "current") -> Optional[str]:
    """The newest checkpoint of ``work_dir`` that reads and verifies, with a warning naming what was
    skipped and why; None if there is none. Newest: the highest ``iter_N`` / ``epoch_N`` (a kill
    between a checkpoint's rename and the pointer's update leaves ``last_checkpoint`` one behind);
    a pointer to a file of another name (a custom ``filename_tmpl``) comes first."""
    pointed = read_pointer(work_dir)
    numbered = checkpoints_in(work_dir)
    candidates = ([pointed] if pointed and pointed not in numbered else []) + numbered
    skipped = []
    for path in candidates:
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


@HOOKS.register_module()
class SafeCheckpointHook(CheckpointHook):
    """MMEngine's ``CheckpointHook`` (same arguments) with crash-safe writes, digests, a
    work-dir-relative pointer, fallback on resume and exact resume (module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._rng_states: Optional[list] = None
        self._restore: Optional[dict] = None

    # -- choosing and checking what to resume / load --

    def before_run(self, runner) -> None:
        if _world()[0] == 0 and osp.isdir(runner.work_dir):  # writes a killed run never finished
            for name in os.listdir(runner.work_dir):
                if _UNFINISHED.match(name):
                    os.remove(osp.join(runner.work_dir, name))
        if runner._resume and runner._load_from is None:
            runner._load_from = find_resumable_checkpoint(runner.work_dir)
            if runner._load_from is None:
                print_log(f"no checkpoint in {runner.work_dir} to resume from: training from the start",
                          logger="current", level=30)
        elif runner._load_from is not None and osp.isfile(runner._load_from):
            verify_checkpoint(runner._load_from)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        saved = checkpoint.get("meta", {}).get(RNG_KEY)
        if not runner._resume or not saved:
            return
        rank, world = _world()
        states = saved["ranks"]
        if len(states) != world:
            print_log(f"the checkpoint holds random states of {len(states)} processes, this run has {world}: "
                      "they are not restored, and the resumed run will not repeat the interrupted one exactly",
                      logger="current", level=30)
            return
        self._restore = dict(state=states[rank])
        loop = runner.train_loop
        sampler = getattr(loop.dataloader, "sampler", None)
        if saved.get("sampler_seed") is not None and hasattr(sampler, "seed"):
            sampler.seed = saved["sampler_seed"]
            if hasattr(loop, "dataloader_iterator"):  # made when the loop was built, with the old seed
                loop.dataloader_iterator = type(loop.dataloader_iterator)(loop.dataloader)

    def before_train_epoch(self, runner) -> None:
        if self._restore is None:
            return
        state, self._restore = self._restore["state"], None
        loop = runner.train_loop
        skip = loop.iter if hasattr(loop, "dataloader_iterator") else 0
        if skip == 0:  # an epoch-based loop starts its next epoch right after this hook
            set_rng_state(state)
        else:  # an iteration-based loop first replays the batches it already trained on
            loop.dataloader_iterator = _RestoreAfter(loop, loop.dataloader_iterator, skip, state)

    # -- writing --

    def _save_checkpoint_with_step(self, runner, step, meta) -> None:
        _refuse_nonfinite(runner)
        if not isinstance(self.file_backend, LocalBackend):
            print_log("SafeCheckpointHook writes atomically to local disks only; saving as CheckpointHook does",
                      logger="current", level=30)
            return super()._save_checkpoint_with_step(runner, step, meta)
        states = [rng_state()]
        if _world()[1] > 1:
            states = [None] * _world()[1]
            dist.all_gather_object(states, rng_state())
        self._rng_states = states
        filename = self.filename_tmpl.format(step)
        final = self.file_backend.join_path(self.out_dir, filename)
        tmp_name = f".{filename}.tmp-{os.getpid()}"
        tmp = self.file_backend.join_path(self.out_dir, tmp_name)
        try:
            runner.save_checkpoint(self.out_dir, tmp_name, self.file_client_args, save_optimizer=self.save_optimizer,
                                   save_param_scheduler=self.save_param_scheduler, meta=meta, by_epoch=self.by_epoch,
                                   backend_args=self.backend_args, **self.args)
            if _world()[0] == 0:
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, final)
                _fsync_dir(self.out_dir)
                atomic_write_text(osp.join(runner.work_dir, POINTER), osp.relpath(final, runner.work_dir))
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

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        sampler = getattr(runner.train_dataloader, "sampler", None)
        checkpoint["meta"][RNG_KEY] = dict(ranks=self._rng_states or [rng_state()],
                                           sampler_seed=getattr(sampler, "seed", None))
        checkpoint["meta"][DIGEST_KEY] = tensor_digest(checkpoint)


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

    def __next__(self):
        if self.skip == 0:
            set_rng_state(self.state)
            self.loop.dataloader_iterator = self.iterator
            return next(self.iterator)
        self.skip -= 1
        return next(self.iterator)
