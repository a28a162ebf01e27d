"""Data-parallel runs on machines without a GPU.

MMEngine's ``init_dist`` always calls ``torch.cuda.set_device`` and uses NCCL, and its default DDP
wrapper passes ``device_ids=[LOCAL_RANK]``; both fail on CPU. Without CUDA we create a gloo
process group ourselves (``Runner.setup_env`` skips ``init_dist`` once a group exists) and wrap
the model in DDP with ``device_ids=None``. With CUDA nothing changes.
"""

from __future__ import annotations

import datetime
import os
import subprocess

import torch
import torch.distributed as dist

LAUNCHERS = ("none", "pytorch", "slurm", "mpi")


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


def init_distributed(launcher: str, timeout_s: int = 1800) -> None:
    """Create the CPU (gloo) process group for ``launcher`` when there is no GPU.

    With a GPU this does nothing and MMEngine's ``init_dist`` (NCCL) runs as usual inside the
    runner. Without one, the group is created here from the launcher's environment
    (``torchrun``: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so MMEngine finds it already
    initialised and never reaches its ``torch.cuda.set_device`` call.
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
    dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))


def finish_distributed() -> None:
    """Wait for every rank, then tear the process group down before the interpreter exits.

    Left to interpreter shutdown, the gloo group's threads can still be joinable when its
    destructor runs, and the process aborts ("terminate called without an active exception")
    after its work is done: about one 2-process CPU run in five failed that way.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def cpu_data_parallel(cfg, launcher: str):
    """Config changes for a data-parallel run without CUDA (in place): DDP with
    ``device_ids=None`` (a configured ``model_wrapper_cfg`` keeps its other settings) and gloo."""
    if launcher == "none" or torch.cuda.is_available():
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
