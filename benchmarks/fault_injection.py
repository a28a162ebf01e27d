"""Killing training at random moments, resuming each time, and checking that nothing is lost
(``tools/fault_injection.py`` describes the procedure and its command line).

A reference run trains the config once without interruption; a second run is SIGKILLed again and
again -- a share of the kills while a checkpoint is being written, a share during validation, the
rest at a random moment of training -- and resumed with ``--resume`` after each. Iteration- and
epoch-based runs alike (read off their log lines: ``Iter(train) [n/N]`` or ``Epoch(train) [e][i/B]``,
the iteration counted over the run). The report says how many resumes worked, how many iterations
each kill lost and how far the final weights are from the reference's.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

ITER_LINE = re.compile(r"Iter\(train\) \[\s*(\d+)/(\d+)\]")
EPOCH_LINE = re.compile(r"Epoch\(train\)\s*\[(\d+)\]\[\s*(\d+)/(\d+)\]")
VAL_LINE = re.compile(r"(?:Epoch|Iter)\(val\)")
TMP_CHECKPOINT = re.compile(r"^\..+\.pth\.tmp-\d+$")  # iter_N, epoch_N, latest: a write in progress


class Training:
    """One training process (``command CONFIG --work-dir DIR ...``, tools/train.py's command line)
    whose log is read as it runs."""

    def __init__(self, command: Sequence[str], config: str, work_dir: Path, extra: Sequence[str], resume: bool,
                 cwd: Optional[Path] = None) -> None:
        cmd = [*command, config, "--work-dir", str(work_dir), *extra]
        if resume:
            cmd.append("--resume")
        self.log: list[str] = []
        self.last_iter = 0
        self.validating = False  # a validation has logged and training has not logged since
        self.resumed_from = None
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=cwd, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            m = ITER_LINE.search(line)
            if m:
                self.last_iter, self.validating = int(m.group(1)), False
            m = EPOCH_LINE.search(line)
            if m:  # the iteration over the run: the epochs before, of B batches each, and this one's
                epoch, batch, batches = (int(v) for v in m.groups())
                self.last_iter, self.validating = (epoch - 1) * batches + batch, False
            if VAL_LINE.search(line):
                self.validating = True
            m = re.search(r"resumed epoch: \d+, iter: (\d+)", line)
            if m:
                self.resumed_from = int(m.group(1))

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self.reader.join(10)
        return rc


def newest_checkpoint_iter(work_dir: Path) -> int:
    """The iteration the checkpoint a resume would take was written at (0: none)."""
    from hieradet_mmdet.engine.checkpointing import find_resumable_checkpoint, training_progress

    path = find_resumable_checkpoint(str(work_dir), logger="silent")
    return training_progress(path)[0] if path else 0


def kill_inside_a_save(training: Training, work_dir: Path, rng: random.Random, deadline: float) -> bool:
    """SIGKILL right after a checkpoint's temporary file appears (0-20 ms into writing it)."""
    while time.time() < deadline and training.proc.poll() is None:
        try:
            if any(TMP_CHECKPOINT.match(n) for n in os.listdir(work_dir)):
                time.sleep(rng.uniform(0, 0.02))
                training.proc.send_signal(signal.SIGKILL)
                return True
        except FileNotFoundError:
            pass
        time.sleep(0.002)
    return False


def kill_during_validation(training: Training, rng: random.Random, deadline: float) -> bool:
    """SIGKILL 0-0.5 s after the next validation has logged its first line."""
    start = training.last_iter
    return _kill_once(training, lambda: training.validating and training.last_iter >= start,
                      lambda: rng.uniform(0, 0.5), deadline, poll=0.005)


def kill_between_saves(training: Training, rng: random.Random, deadline: float) -> bool:
    """SIGKILL at a random moment once the process has trained an iteration of its own."""
    return _kill_once(training, lambda: training.last_iter > (training.resumed_from or 0),
                      lambda: rng.uniform(0, 1.5), deadline, poll=0.01)


def _kill_once(training: Training, ready, delay, deadline: float, poll: float) -> bool:
    """SIGKILL ``delay()`` s after ``ready()`` first holds; False if the process ended before."""
    while time.time() < deadline and training.proc.poll() is None:
        if ready():
            time.sleep(delay())
            if training.proc.poll() is not None:
                return False
            training.proc.send_signal(signal.SIGKILL)
            return True
        time.sleep(poll)
    return False


def final_weights(work_dir: Path):
    import torch

    from hieradet_mmdet.engine.checkpointing import find_resumable_checkpoint
    from hieradet_mmdet.weights.reader import allow_mmengine_types

    allow_mmengine_types()
    path = find_resumable_checkpoint(str(work_dir), logger="silent")
    return path, torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def inject_faults(config: str, work_dir: Path, train_command: Sequence[str], train_args: Sequence[str] = (),
                  kills: int = 10, save_share: float = 0.5, seed: int = 0, timeout: float = 1800,
                  cwd: Optional[Path] = None, val_share: float = 0.0) -> Optional[dict]:
    """Train ``config`` in ``work_dir``/reference, then in ``work_dir``/faulted with ``kills``
    SIGKILLs (a ``save_share`` of them inside checkpoint writes, a ``val_share`` during validation;
    the schedule's ``seed``), each run
    ``train_command CONFIG --work-dir DIR *train_args [--resume]`` from ``cwd``, at most
    ``timeout`` s per process. Progress goes to stdout. Returns the report, or None when the
    reference run failed (the tail of its log goes to stderr)."""
    rng = random.Random(seed)
    interval = None

    def training(directory: Path, resume: bool) -> Training:
        return Training(train_command, config, directory, train_args, resume, cwd)

    print(f"== uninterrupted reference run in {work_dir / 'reference'}", flush=True)
    reference = training(work_dir / "reference", resume=False)
    if reference.wait(timeout) != 0:
        print("".join(reference.log[-40:]), file=sys.stderr)
        print("error: the reference run failed", file=sys.stderr)
        return None
    total_iters = reference.last_iter

    work = work_dir / "faulted"
    done, records, failed_resumes = 0, [], 0
    run = training(work, resume=False)
    while done < kills:
        deadline = time.time() + timeout
        draw = rng.random()
        moment = "inside a save" if draw < save_share else (
            "during validation" if draw < save_share + val_share else "between saves")
        killed = {"inside a save": lambda: kill_inside_a_save(run, work, rng, deadline),
                  "during validation": lambda: kill_during_validation(run, rng, deadline),
                  "between saves": lambda: kill_between_saves(run, rng, deadline)}[moment]()
        rc = run.wait(timeout)
        if not killed:  # it finished (or failed) before the moment came
            if rc != 0:
                failed_resumes += 1
                print("".join(run.log[-40:]), file=sys.stderr)
            break
        done += 1
        time.sleep(0.2)  # the reader thread drains the last lines
        saved = newest_checkpoint_iter(work)
        lost = max(0, run.last_iter - saved)
        interval = interval or _save_interval(work)
        records.append(dict(kill=done, moment=moment, inside_save=moment == "inside a save",
                            last_logged_iter=run.last_iter, resumable_iter=saved, iterations_lost=lost))
        print(f"kill {done}: {moment}, after iteration {run.last_iter}; resuming from iteration {saved} "
              f"({lost} lost)", flush=True)
        run = training(work, resume=True)
        if run.proc.poll() not in (None, 0):
            failed_resumes += 1
    rc = run.wait(timeout)
    if rc != 0:
        failed_resumes += 1
        print("".join(run.log[-40:]), file=sys.stderr)

    ref_path, ref_state = final_weights(work_dir / "reference")
    path, state = final_weights(work)
    diff = max(float((state[k].double() - v.double()).abs().max()) if state[k].numel() else 0.0
               for k, v in ref_state.items()) if state.keys() == ref_state.keys() else float("inf")
    return dict(config=config, kills=done, kills_inside_saves=sum(r["inside_save"] for r in records),
                kills_during_validation=sum(r["moment"] == "during validation" for r in records),
                resumes=len(records), failed_resumes=failed_resumes,
                max_iterations_lost=max((r["iterations_lost"] for r in records), default=0),
                save_interval=interval or _save_interval(work), total_iters=total_iters,
                final_checkpoint=path, reference_checkpoint=ref_path, final_weights_max_abs_diff=diff,
                kills_detail=records)


def lost_nothing(report: dict) -> bool:
    """Every resume worked, no kill lost more than the save interval, and the final weights equal
    the uninterrupted run's."""
    return (report["failed_resumes"] == 0 and report["max_iterations_lost"] <= report["save_interval"]
            and report["final_weights_max_abs_diff"] == 0.0)


def _save_interval(work_dir: Path) -> int:
    """The run's checkpoint interval in iterations, from the config MMEngine wrote into the work dir:
    the rolling checkpoint's (latest_interval_iters) where set, else the periodic one's."""
    configs = sorted(work_dir.glob("*.py"))
    if not configs:
        return 1
    text = configs[0].read_text()
    m = (re.search(r"latest_interval_iters=(\d+)", text)
         or re.search(r"checkpoint=dict\([^)]*?\binterval=(\d+)", text, re.S))
    return int(m.group(1)) if m else 1
