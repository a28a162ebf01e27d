"""Training never loses work: diverged runs stop before writing NaNs, checkpoint writes are atomic,
a corrupt newest checkpoint is skipped loudly, resume repeats the uninterrupted run bit for bit,
a silent data-parallel process is named, and random SIGKILLs lose nothing (tools/fault_injection.py).

All on a narrow Mask R-CNN HieraDet (every block kind, small channels) so that a run takes seconds."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import (ROOT, fail_text, free_port, load_mmengine_checkpoint, logged_training_values, rank_pids,
                     run_tool, tiny_detector_config, tiny_epoch_config)

ITERS = 6
# A fixed seed: two uninterrupted runs are then identical, the reference a resumed run must repeat.
SAVE_EVERY_ITER = {"default_hooks.checkpoint.interval": 1, "default_hooks.checkpoint.max_keep_ckpts": 3,
                   "randomness.seed": 0}


def config(directory: Path, **options) -> Path:
    """6 images, batch 2: the loader restarts after iteration 3, so resuming from there needs the
    sampler's state too."""
    path, _ = tiny_detector_config(directory, iters=ITERS, size=96, narrow=True, num_train=6,
                                   options={**SAVE_EVERY_ITER, **options})
    return path


def train(cfg: Path, work: Path, *args, **kwargs):
    return run_tool("tools/train.py", cfg, "--work-dir", work, *args, **kwargs)


def checkpoint_iters(work: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in work.iterdir() if (m := re.fullmatch(r"iter_(\d+)\.pth", p.name)))


def all_finite(path: Path) -> bool:
    ckpt = load_mmengine_checkpoint(path)
    tensors = list(ckpt["state_dict"].values())
    tensors += [v for s in ckpt["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v)]
    return all(torch.isfinite(t.float()).all() for t in tensors if t.is_floating_point())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: (config, work dir)."""
    directory = tmp_path_factory.mktemp("reference")
    cfg = config(directory)
    proc = train(cfg, directory / "work")
    assert proc.returncode == 0, fail_text(proc)
    return cfg, directory / "work"


def test_diverged_run_stops_before_any_nan_is_written(tmp_path):
    """lr 1e3: the loss explodes within a few steps; whichever comes first, a non-finite loss or an
    overflowing optimizer state, training stops and every checkpoint on disk is finite."""
    cfg = config(tmp_path, **{"optim_wrapper.optimizer.lr": 1e3, "default_hooks.checkpoint.max_keep_ckpts": 2})
    proc = train(cfg, tmp_path / "work")
    assert proc.returncode == 1, fail_text(proc)
    stop = re.search(r"error: training stopped at iteration (\d+): (the loss is not finite|\d+ tensors of the "
                     r"(weights|optimizer state) are not finite)", proc.stderr)
    assert stop, fail_text(proc)
    saved = checkpoint_iters(tmp_path / "work")
    assert saved and max(saved) < int(stop.group(1))  # nothing of the failing step
    assert all(all_finite(tmp_path / "work" / f"iter_{i}.pth") for i in saved)
    pointer = (tmp_path / "work" / "last_checkpoint").read_text()
    assert pointer == f"iter_{max(saved)}.pth"  # relative to the work dir


NAN_INPUT = {"model.data_preprocessor.std": [0.0, 0.0, 0.0]}  # every image divided by zero


def test_a_nan_loss_stops_before_the_step_and_names_the_terms(tmp_path):
    proc = train(config(tmp_path, **NAN_INPUT), tmp_path / "work")
    assert proc.returncode == 1, fail_text(proc)
    stop = re.search(r"error: training stopped at iteration 1: the loss is not finite \((loss=nan, .*)\)",
                     proc.stderr)
    assert stop and "loss_rpn_cls=" in stop.group(1) and "loss_mask=" in stop.group(1), fail_text(proc)
    assert "No weight was changed by this step" in proc.stderr
    assert checkpoint_iters(tmp_path / "work") == []


def test_skip_mode_skips_bad_batches_then_stops(tmp_path):
    base = config(tmp_path, **NAN_INPUT)
    cfg = tmp_path / "skip.py"
    cfg.write_text(f"_base_ = '{base.name}'\ncustom_hooks = [dict(type='HieraDetCheckHook'), "
                   "dict(type='FiniteLossHook', on_nonfinite='skip', max_skips=2)]\n")
    proc = train(cfg, tmp_path / "work")
    assert proc.returncode == 1, fail_text(proc)
    log = proc.stdout + proc.stderr
    assert log.count("skipping this batch") == 2, fail_text(proc)
    assert "training stopped at iteration 3" in proc.stderr
    assert "2 batches in a row were skipped before" in proc.stderr
    # the two skipped steps changed nothing: their checkpoints hold the initial weights
    first, second = (load_mmengine_checkpoint(tmp_path / "work" / f"iter_{i}.pth")["state_dict"] for i in (1, 2))
    assert all(torch.equal(first[k], second[k]) for k in first)


FULL_DISK = """
import runpy, sys
from mmengine.fileio.backends import local_backend
put, writes = local_backend.LocalBackend.put, []
def failing_put(self, obj, filepath):
    if ".tmp-" in str(filepath):
        writes.append(filepath)
        if len(writes) == 2:  # the second checkpoint: half written, then the disk is full
            with open(filepath, "wb") as f:
                f.write(obj[: len(obj) // 2])
            raise OSError(28, "No space left on device")
    return put(self, obj, filepath)
local_backend.LocalBackend.put = failing_put
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_full_disk_during_a_save_loses_nothing(tmp_path):
    cfg = config(tmp_path, **{"default_hooks.checkpoint.max_keep_ckpts": 1})
    work = tmp_path / "work"
    proc = run_tool(sys.executable, "-c", FULL_DISK, "tools/train.py", cfg, "--work-dir", work)
    assert proc.returncode == 1, fail_text(proc)
    assert f"could not write checkpoint {work}/iter_2.pth" in proc.stderr, fail_text(proc)
    assert "No space left on device" in proc.stderr and f"{work}/iter_1.pth is intact" in proc.stderr
    # max_keep_ckpts=1, yet iter_1 is still there: rotation waits for the new file to be complete.
    assert sorted(p.name for p in work.iterdir() if "pth" in p.name) == ["iter_1.pth"]
    assert (work / "last_checkpoint").read_text() == "iter_1.pth"
    proc = train(cfg, work, "--resume")
    assert proc.returncode == 0, fail_text(proc)
    assert "resumed epoch: 0, iter: 1" in proc.stdout + proc.stderr


def test_corrupt_truncated_and_missing_pointers_fall_back_loudly(reference, tmp_path):
    cfg, done = reference
    work = tmp_path / "moved"  # also: a work dir moved elsewhere still resumes (relative pointer)
    shutil.copytree(done, work)
    newest = work / f"iter_{ITERS}.pth"
    data = bytearray(newest.read_bytes())
    data[len(data) // 3: len(data) // 3 + 65536] = bytes(65536)  # zeros in the middle of the tensors
    newest.write_bytes(bytes(data))
    truncated = work / f"iter_{ITERS - 1}.pth"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    (work / "last_checkpoint").write_text("")  # an empty pointer, e.g. a crash while MMEngine wrote it

    # Asked for explicitly, a corrupt file is an error, not a fallback.
    proc = train(cfg, tmp_path / "other", "--resume", newest)
    assert proc.returncode == 1 and f"checkpoint {newest} is corrupt" in proc.stderr, fail_text(proc)
    proc = run_tool("tools/test.py", cfg, newest)
    assert proc.returncode == 1 and f"checkpoint {newest} is corrupt" in proc.stderr, fail_text(proc)

    proc = train(cfg, work, "--resume", "--cfg-options", f"train_cfg.max_iters={ITERS + 1}")
    assert proc.returncode == 0, fail_text(proc)
    log = proc.stdout + proc.stderr
    assert f"RESUMING FROM {work}/iter_{ITERS - 2}.pth, NOT FROM THE NEWEST CHECKPOINT" in log, fail_text(proc)
    assert f"checkpoint {newest} is corrupt" in log and f"cannot read checkpoint {truncated}" in log
    assert f"resumed epoch: 0, iter: {ITERS - 2}" in log


def test_a_killed_and_resumed_run_repeats_the_uninterrupted_one_exactly(reference, tmp_path):
    cfg, done = reference
    work = tmp_path / "work"
    proc = subprocess.Popen([sys.executable, "tools/train.py", str(cfg), "--work-dir", str(work)], cwd=ROOT,
                            env=dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (work / "iter_3.pth").exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc = train(cfg, work, "--resume")
    assert proc.returncode == 0, fail_text(proc)
    resumed_from = int(re.search(r"resumed epoch: 0, iter: (\d+)", proc.stdout + proc.stderr).group(1))
    assert 3 <= resumed_from < ITERS

    ours, theirs = logged_training_values(work), logged_training_values(done)
    for it in range(resumed_from + 1, ITERS + 1):
        assert ours[it] == theirs[it], it
    a = load_mmengine_checkpoint(work / f"iter_{ITERS}.pth")
    b = load_mmengine_checkpoint(done / f"iter_{ITERS}.pth")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_random_kills_lose_nothing(tmp_path):
    """tools/fault_injection.py on an epoch-based run as the shipped configs train: SIGKILLs inside a
    checkpoint write and during validation (a kill at a random moment of an epoch, and what the
    resumed run then does batch by batch: tests/engine/test_resume.py)."""
    cfg = tiny_epoch_config(tmp_path)
    out = tmp_path / "report.json"
    proc = run_tool("tools/fault_injection.py", cfg, "--work-dir", tmp_path / "runs", "--kills", "2",
                    "--save-share", "0.5", "--val-share", "0.5", "--seed", "1", "--out", out, timeout=900)
    assert proc.returncode == 0, fail_text(proc)
    report = json.loads(out.read_text())
    assert report["kills"] == 2 and report["resumes"] == 2 and report["failed_resumes"] == 0
    assert report["kills_inside_saves"] == report["kills_during_validation"] == 1
    assert report["max_iterations_lost"] <= report["save_interval"] == 1
    assert report["total_iters"] == 8 and report["final_weights_max_abs_diff"] == 0.0
    assert "OK: nothing completed was lost" in proc.stdout


def test_a_stalled_process_is_named_when_the_timeout_fires(tmp_path):
    cfg = config(tmp_path, **{"train_cfg.max_iters": 200, "train_dataloader.batch_size": 1,
                              "default_hooks.checkpoint.interval": 1000})
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PORT=str(free_port()), PYTHON=sys.executable)
    launcher = subprocess.Popen(["bash", str(ROOT / "tools" / "dist_train.sh"), str(cfg), "2", "--work-dir",
                                 str(tmp_path / "work"), "--dist-timeout", "15"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, stopped = [], None
    try:
        for line in launcher.stdout:
            lines.append(line)
            if stopped is None and "Iter(train) [  3/200]" in line:
                stopped = rank_pids(launcher)[1]
                os.kill(stopped, signal.SIGSTOP)  # rank 1 goes silent: no crash, no exit
            if "data-parallel training stopped" in line:
                os.kill(stopped, signal.SIGKILL)  # what an operator does next; torchrun would wait 30 s
                stopped = None
        launcher.wait(timeout=240)
    finally:
        for pid in ([stopped] if stopped else []):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # torchrun ended it already
                pass
        launcher.kill()
    log = "".join(lines)
    assert launcher.returncode != 0
    assert "data-parallel training stopped: rank 1 stopped answering" in log, log[-3000:]
    assert re.search(r"rank 1: last finished iteration \d+, last heartbeat \d+ s ago", log), log[-3000:]
    assert "rank 0 stopped" not in log


HEARTBEAT_AT_EXIT = """
import atexit, datetime, os, sys, threading, time
import torch.distributed as dist

# Registered first, so it runs last of the exit handlers, just before daemon threads are frozen.
atexit.register(lambda: print("beating at exit:", [t.name for t in threading.enumerate()
                                                   if t.name == "hieradet-heartbeat"], flush=True))
from hieradet_mmdet.engine.distributed import HeartbeatHook

store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                      timeout=datetime.timedelta(seconds=10))
dist.init_process_group("gloo", store=store, rank=0, world_size=1)
runner = type("Runner", (), {"iter": 0})()
hook = HeartbeatHook(interval_s=0.0)  # beats without a pause: nearly always inside the store's C++ call
hook.before_train(runner)
time.sleep(0.3)
if sys.argv[1] == "after_run":
    hook.after_run(runner)  # how a run that finished ends it; otherwise (a run that raised) atexit does
dist.destroy_process_group()
print("done", flush=True)
"""


def test_a_process_with_a_heartbeat_exits_cleanly_beside_a_busy_process():
    """A daemon thread inside a C++ call when the interpreter ends aborts the process after its
    work is done ("terminate called without an active exception"): what made a finished
    data-parallel run exit non-zero, now and then, more often beside a busy process. The heartbeat
    thread must be gone before that, by the end of the run or at exit, every time."""
    import datetime

    import torch.distributed as dist

    port = free_port()
    master = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=30))  # the launcher's store
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=str(ROOT))
    try:
        for ending in ["atexit"] * 4 + ["after_run"] * 2:
            proc = subprocess.run([sys.executable, "-c", HEARTBEAT_AT_EXIT, ending], env=env, cwd=ROOT,
                                  capture_output=True, text=True, timeout=120)
            assert proc.stdout == "done\nbeating at exit: []\n", (ending, fail_text(proc))
            assert proc.returncode == 0, (ending, fail_text(proc))
    finally:
        busy.kill()
        busy.wait()
    assert master.num_keys() >= 1  # the beats reached the store
