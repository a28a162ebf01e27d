"""Resuming an epoch-based run inside an epoch (the shipped configs' loop, ResumableEpochBasedTrainLoop,
and SafeCheckpointHook's rolling latest.pth): a kill loses at most the checkpoint interval, the resumed
run repeats the uninterrupted one bit for bit (losses and final weights), and no trained batch is
loaded again -- with our tools/train.py and with MMDetection's own. A checkpoint of another data
layout is refused, or resumed inexactly when that is asked for, saying how.

A narrow Mask R-CNN on 7 synthetic images, batches of 2 from MMDetection's AspectRatioBatchSampler
(4 per epoch, the last one its leftovers), 2 epochs with validation after each."""

from __future__ import annotations

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

from helpers import (ROOT, fail_text, free_port, load_mmengine_checkpoint, logged_training_values, mmdet_tool,
                     rank_pids, run_tool, tiny_epoch_config)

TESTS = Path(__file__).resolve().parents[1]
BATCHES, EPOCHS = 4, 2  # tiny_epoch_config's


ENV = {"PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}"}


def loads_by_process(path: Path) -> list[list[int]]:
    """The sample indices each training process loaded, in order, process after process."""
    runs: dict[str, list[int]] = {}
    for line in path.read_text().split("\n"):
        if line:
            pid, index = line.split()
            runs.setdefault(pid, []).append(int(index))
    return list(runs.values())


def final_weights(work: Path) -> dict:
    return load_mmengine_checkpoint(work / f"epoch_{EPOCHS}.pth")["state_dict"]


def train(config: Path, work: Path, *args, tool=None):
    return run_tool(tool or "tools/train.py", config, "--work-dir", work, *args, env=ENV, timeout=600)


def kill_after(config: Path, work: Path, line: str, tool=None) -> None:
    """Start training and SIGKILL it as soon as ``line`` is logged."""
    cmd = [sys.executable, str(tool or ROOT / "tools" / "train.py"), str(config), "--work-dir", str(work)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                                     **ENV))
    deadline = time.time() + 300
    for text in proc.stdout:
        if line in text or time.time() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    directory = tmp_path_factory.mktemp("uninterrupted")
    config = tiny_epoch_config(directory, record_loads=True)
    proc = train(config, directory / "work")
    assert proc.returncode == 0, fail_text(proc)
    return config, directory


def assert_repeats(work: Path, reference_dir: Path, resumed_from: int) -> None:
    ours, theirs = logged_training_values(work), logged_training_values(reference_dir / "work")
    assert sorted(ours) == list(range(1, EPOCHS * BATCHES + 1))
    for step in range(resumed_from + 1, EPOCHS * BATCHES + 1):
        assert ours[step] == theirs[step], step
    a, b = final_weights(work), final_weights(reference_dir / "work")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def resumed_iteration(log: str) -> int:
    return int(re.search(r"resumed epoch: \d+, iter: (\d+)", log).group(1))


def own_copy(reference, directory: Path) -> Path:
    """The reference config, recording its loads in ``directory`` (the data stays the reference's)."""
    config, ref = reference
    copy = directory / config.name
    copy.write_text(config.read_text().replace(str(ref / "loads.txt"), str(directory / "loads.txt")))
    return copy


def test_a_kill_inside_an_epoch_loses_one_interval_and_the_rest_repeats_without_reloading(reference, tmp_path):
    _, ref = reference
    directory = tmp_path
    config = own_copy(reference, directory)
    work = directory / "work"
    kill_after(config, work, f"Epoch(train) [1][3/{BATCHES}]")  # inside the first epoch
    killed_loads = loads_by_process(directory / "loads.txt")
    proc = train(config, work, "--resume")
    assert proc.returncode == 0, fail_text(proc)
    log = proc.stdout + proc.stderr
    k = resumed_iteration(log)
    assert 2 <= k <= 3, log[-3000:]  # at most the interval (1 iteration) lost: iteration 3 was training
    assert f"Epoch(train) [1][{k + 1}/{BATCHES}]" in log and f"[1][{BATCHES + 1}/" not in log
    assert "Advance dataloader" not in log and "drawing the indices" not in log
    assert_repeats(work, ref, k)

    (uninterrupted,) = loads_by_process(ref / "loads.txt")
    killed, resumed = loads_by_process(directory / "loads.txt")
    assert killed == killed_loads[0] == uninterrupted[:len(killed)]
    # The resumed process loaded exactly what the uninterrupted run loaded after iteration k, in order:
    # nothing it had trained on before.
    first = sum(len(b) for b in _batches_of(uninterrupted)[:k])
    assert resumed == uninterrupted[first:]


def _batches_of(loads: list[int]) -> list[list[int]]:
    """The uninterrupted run's loads cut into its batches (AspectRatioBatchSampler, 7 square images:
    three batches of 2, then the leftover 1, per epoch)."""
    sizes = ([2, 2, 2, 1]) * EPOCHS
    out, i = [], 0
    for size in sizes:
        out.append(loads[i:i + size])
        i += size
    return out


def test_a_kill_during_validation_resumes_with_that_validation(reference, tmp_path):
    _, ref = reference
    config = own_copy(reference, tmp_path)
    work = tmp_path / "work"
    kill_after(config, work, "Epoch(val) [1][1/2]")
    proc = train(config, work, "--resume")
    assert proc.returncode == 0, fail_text(proc)
    log = proc.stdout + proc.stderr
    assert resumed_iteration(log) == BATCHES and "running it first" in log
    assert log.count("Epoch(val) [1][2/2]") >= 1  # the interrupted validation's metrics
    assert_repeats(work, ref, BATCHES)


def test_mmdetections_own_train_py_resumes_inside_an_epoch_exactly(reference, tmp_path):
    mmdet_train = mmdet_tool("train.py")
    _, ref = reference
    config = own_copy(reference, tmp_path)
    work = tmp_path / "work"
    kill_after(config, work, f"Epoch(train) [2][2/{BATCHES}]", tool=mmdet_train)
    proc = train(config, work, "--resume", tool=mmdet_train)
    assert proc.returncode == 0, fail_text(proc)
    k = resumed_iteration(proc.stdout + proc.stderr)
    assert BATCHES + 1 <= k <= BATCHES + 2
    assert_repeats(work, ref, k)


def test_another_data_layout_is_refused_or_resumed_inexactly_on_request(reference, tmp_path):
    _, ref = reference
    config = own_copy(reference, tmp_path)
    work = tmp_path / "work"
    shutil.copytree(ref / "work", work)
    checkpoint = work / "epoch_1.pth"
    proc = train(config, work, "--resume", checkpoint, "--cfg-options", "train_dataloader.batch_size=1")
    assert proc.returncode == 1, fail_text(proc)
    assert ("cannot resume exactly: the checkpoint was written by 1 process(es) with 2 images each per batch, "
            "this run has 1 with 1") in proc.stderr, fail_text(proc)
    assert "train_cfg.allow_inexact_resume=True" in proc.stderr
    proc = train(config, work, "--resume", checkpoint, "--cfg-options", "train_dataloader.batch_size=1",
                 "train_cfg.allow_inexact_resume=True")
    assert proc.returncode == 0, fail_text(proc)
    assert "resuming inexactly (allow_inexact_resume)" in proc.stdout + proc.stderr


def dist_train(config: Path, work: Path, processes: int, *args):
    return run_tool("bash", ROOT / "tools" / "dist_train.sh", config, str(processes), "--work-dir", work, *args,
                    env={**ENV, "PORT": str(free_port()), "PYTHON": sys.executable}, timeout=600)


def test_data_parallel_runs_resume_each_process_where_it_was(tmp_path):
    """2 CPU processes (gloo): each has its own share of every epoch and its own position in it; a
    kill inside an epoch resumes both exactly, and a resume with one process is refused."""
    config = tiny_epoch_config(tmp_path / "cfg")
    proc = dist_train(config, tmp_path / "uninterrupted", 2)
    assert proc.returncode == 0, fail_text(proc)
    per_epoch = 2  # 7 images over 2 processes: 4 each, batches of 2

    work = tmp_path / "work"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PORT=str(free_port()),
               PYTHON=sys.executable, **ENV)
    launcher = subprocess.Popen(["bash", str(ROOT / "tools" / "dist_train.sh"), str(config), "2", "--work-dir",
                                 str(work)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                )
    deadline = time.time() + 300
    while not (work / "latest.pth").exists() and time.time() < deadline:  # the first rolling checkpoint
        time.sleep(0.01)
    for pid in rank_pids(launcher).values():  # both training processes (torchrun starts them in sessions of
        os.kill(pid, signal.SIGKILL)          # their own), then torchrun
    launcher.kill()
    launcher.wait()
    saved = load_mmengine_checkpoint(work / "latest.pth")["meta"]["hieradet_data"]["ranks"]
    assert len(saved) == 2  # a data position per process

    refused = dist_train(config, tmp_path / "one", 1, "--resume", work / "latest.pth")
    assert refused.returncode != 0 and "written by 2 process(es)" in refused.stdout + refused.stderr, \
        fail_text(refused)

    proc = dist_train(config, work, 2, "--resume")
    assert proc.returncode == 0, fail_text(proc)
    assert 1 <= resumed_iteration(proc.stdout + proc.stderr) < 2 * per_epoch  # logs reach us late: k varies
    a = load_mmengine_checkpoint(work / "epoch_2.pth")["state_dict"]
    b = load_mmengine_checkpoint(tmp_path / "uninterrupted" / "epoch_2.pth")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in b)
