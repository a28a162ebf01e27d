"""Data-parallel runs: CPU process groups, a timeout that fires, and which rank went silent.

MMEngine's ``init_dist`` always calls ``torch.cuda.set_device`` and uses NCCL, and its default DDP
wrapper passes ``device_ids=[LOCAL_RANK]``; both fail on CPU. Without CUDA we create a gloo
process group ourselves (``Runner.setup_env`` skips ``init_dist`` once a group exists) and wrap
the model in DDP with ``device_ids=None``. With CUDA MMEngine sets up NCCL as usual.

A process that stops answering (stopped, swapped out, stuck in I/O) leaves the others waiting in
a collective until the process-group timeout: 30 minutes by default in torch. CPU runs here
default to :data:`CPU_TIMEOUT_S`; ``--dist-timeout`` sets it for CPU and GPU runs. Every process
beats into the launcher's store from a thread (:class:`HeartbeatHook`), so when the timeout fires
:func:`silent_ranks` can say which one went quiet.
"""

from __future__ import annotations

import atexit
import datetime
import os
import subprocess
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist
from mmdet.registry import HOOKS
from mmengine.hooks import Hook

LAUNCHERS = ("none", "pytorch", "slurm", "mpi")
CPU_TIMEOUT_S = 300  # gloo collectives of a 2-16 process CPU run finish in seconds, not minutes
HEARTBEAT_KEY = "hieradet_heartbeat/{}"
STORE_TIMEOUT_S = 10


def _scheduler_env(launcher: str) -> dict:
    """RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR for slurm) from the launcher's variables."""
    env = os.environ
    if launcher == "slurm":
        out = dict(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env["SLURM_LOCALID"])
        if "MASTER_ADDR" not in env:
            nodes = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_NODELIST"]],
                                   capture_output=True, text=True, check=True).stdout.split()
            out["MASTER_ADDR"] = nodes[0]
        return out
    if launcher == "mpi":
        return dict(RANK=env["OMPI_COMM_WORLD_RANK"], WORLD_SIZE=env["OMPI_COMM_WORLD_SIZE"],
                    LOCAL_RANK=env["OMPI_COMM_WORLD_LOCAL_RANK"])
    return {}  # torchrun sets them itself


def init_distributed(launcher: str, timeout_s: Optional[float] = None) -> None:
    """Create the CPU (gloo) process group for ``launcher`` when there is no GPU.

    With a GPU this does nothing and MMEngine's ``init_dist`` (NCCL) runs as usual inside the
    runner. Without one, the group is created here from the launcher's environment
    (``torchrun``: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so MMEngine finds it already
    initialised and never reaches its ``torch.cuda.set_device`` call. ``timeout_s``: how long a
    collective waits for a silent process (default :data:`CPU_TIMEOUT_S`).
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    if launcher == "none" or torch.cuda.is_available() or dist.is_initialized():
        return
    for key, value in _scheduler_env(launcher).items():
        os.environ.setdefault(key, str(value))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    missing = [k for k in ("RANK", "WORLD_SIZE") if k not in os.environ]
    if missing:
        raise RuntimeError(f"--launcher {launcher} needs {', '.join(missing)} in the environment; start the "
                           "processes with tools/dist_train.sh / tools/dist_test.sh (torchrun), srun or mpirun")
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])  # MMEngine reads it
    timeout = datetime.timedelta(seconds=timeout_s or CPU_TIMEOUT_S)
    dist.init_process_group("gloo", init_method="env://", timeout=timeout)


def finish_distributed() -> None:
    """Wait for every rank, then tear the process group down before the interpreter exits.

    Left to interpreter shutdown, the gloo group's threads can still be joinable when its
    destructor runs, and the process aborts ("terminate called without an active exception")
    after its work is done: about one 2-process CPU run in five failed that way.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def data_parallel_config(cfg, launcher: str, timeout_s: Optional[float] = None):
    """Config changes for a data-parallel run (in place): the process-group timeout for MMEngine's
    GPU setup; without CUDA, DDP with ``device_ids=None`` (a configured ``model_wrapper_cfg``
    keeps its other settings) and gloo."""
    if launcher == "none":
        return cfg
    if torch.cuda.is_available():
        if timeout_s:
            env_cfg = cfg.get("env_cfg") or {}
            env_cfg.setdefault("dist_cfg", {})["timeout"] = int(timeout_s)
            cfg.env_cfg = env_cfg
        return cfg
    wrapper = cfg.get("model_wrapper_cfg") or dict(
        type="MMDistributedDataParallel", broadcast_buffers=False,
        find_unused_parameters=cfg.get("find_unused_parameters", False))
    wrapper["device_ids"] = None
    wrapper.pop("output_device", None)
    cfg.model_wrapper_cfg = wrapper
    env_cfg = cfg.get("env_cfg") or {}
    env_cfg.setdefault("dist_cfg", {})["backend"] = "gloo"
    cfg.env_cfg = env_cfg
    return cfg


@HOOKS.register_module()
class HeartbeatHook(Hook):
    """A thread in every process writes its last finished iteration and the time into the process
    group's store every ``interval_s`` seconds. A process waiting in a collective keeps beating; one
    that is stopped, hung with the interpreter locked or gone does not.

    The thread is stopped and joined when the run ends and, failing that, at interpreter exit
    (atexit runs before daemon threads are frozen). Left running, it could be inside the store's
    C++ call when the interpreter ends; Python then unwinds that thread from inside a ``noexcept``
    frame and the process aborts ("terminate called without an active exception") after its work
    is done, exiting non-zero."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.iteration = 0
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()

    def before_train(self, runner) -> None:
        self.iteration = runner.iter
        store = _store_client()
        if store is None or self._thread is not None:
            return
        key = HEARTBEAT_KEY.format(dist.get_rank())

        def beat():
            while not self._stop.is_set():
                try:
                    store.set(key, f"{self.iteration} {time.time():.3f}")
                except Exception:  # noqa: BLE001 - the store's host is gone: nothing left to tell
                    return
                self._stop.wait(self.interval_s)

        self._stop.clear()
        self._thread = threading.Thread(target=beat, name="hieradet-heartbeat", daemon=True)
        self._thread.start()
        atexit.register(self.stop)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self.iteration = runner.iter + 1

    def after_run(self, runner) -> None:
        self.stop()

    def stop(self) -> None:
        """End the heartbeat thread and wait for it (at most the store's timeout)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        thread.join(timeout=STORE_TIMEOUT_S + 1)
        atexit.unregister(self.stop)


def _store_client():
    """A client of the store the launcher set up (MASTER_ADDR / MASTER_PORT), our own connection."""
    if not (dist.is_available() and dist.is_initialized()) or "MASTER_ADDR" not in os.environ:
        return None
    try:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=datetime.timedelta(seconds=STORE_TIMEOUT_S))
    except Exception:  # noqa: BLE001 - no store to reach: no heartbeats
        return None


def silent_ranks(stale_s: float = 5.0) -> Optional[str]:
    """After a collective timed out: which processes stopped answering (no heartbeat for
    ``stale_s`` seconds), with their last finished iteration. None if the heartbeats cannot be read."""
    store = _store_client()
    if store is None:
        return None
    now, beats = time.time(), {}
    for rank in range(dist.get_world_size()):
        try:
            iteration, stamp = store.get(HEARTBEAT_KEY.format(rank)).decode().split()
            beats[rank] = (int(iteration), now - float(stamp))
        except Exception:  # noqa: BLE001 - this rank never wrote one
            beats[rank] = None
    if not any(beats.values()):
        return None
    silent = [r for r, b in beats.items() if b is None or b[1] > stale_s]
    parts = [f"rank {r}: " + (f"last finished iteration {b[0]}, last heartbeat {b[1]:.0f} s ago" if b else
                              "no heartbeat") for r, b in sorted(beats.items())]
    head = (f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} stopped answering" if silent
            else "every process still answers; a collective timed out all the same")
    return f"{head} ({'; '.join(parts)})"
