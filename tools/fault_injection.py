"""Kill training at random moments, resume each time, and check that nothing is lost.

    python tools/fault_injection.py CONFIG --work-dir DIR [--kills 10] [--save-share 0.5] [--seed 0]
                                    [--out report.json] [train.py options, e.g. --cfg-options ...]

1. trains CONFIG once without interruption (DIR/reference) for the final weights to compare with
   (both runs with one ``randomness.seed``, ``--train-seed``, unless the options set it);
2. trains it again in DIR/faulted and SIGKILLs the process ``--kills`` times: a ``--save-share`` of
   the kills land while a checkpoint is being written (right after its temporary file appears,
   0-20 ms into the write), the others at a random moment between iterations' log lines; after
   every kill it resumes with ``tools/train.py --resume``;
3. reports the kills, how many resumes succeeded, the iterations each kill lost (the work since
   the last complete checkpoint: never more than the save interval) and the largest difference
   between the final weights and the uninterrupted run's (0: a bit-for-bit repeat).

Exit status 0 when every resume worked, no kill lost more than the save interval and the final
weights equal the reference's. The config should save often (``default_hooks.checkpoint.interval``)
and log every iteration, as the tiny configs in the tests do.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "tools" / "train.py"
ITER_LINE = re.compile(r"Iter\(train\) \[\s*(\d+)/(\d+)\]")
TMP_CHECKPOINT = re.compile(r"^\.(?:iter|epoch)_\d+\.pth\.tmp-\d+$")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--work-dir", required=True, type=Path)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--save-share", type=float, default=0.5, help="share of kills inside checkpoint writes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    parser.add_argument("--train-seed", type=int, default=0,
                        help="randomness.seed of both runs, unless the options set one (the runs must be comparable)")
    parser.add_argument("--out", type=Path, help="write the report as JSON")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per training process")
    return parser.parse_known_args(argv)


class Training:
    """One tools/train.py process whose log is read as it runs."""

    def __init__(self, config: str, work_dir: Path, extra: list[str], resume: bool) -> None:
        cmd = [sys.executable, str(TRAIN), config, "--work-dir", str(work_dir), *extra]
        if resume:
            cmd.append("--resume")
        self.log: list[str] = []
        self.last_iter = 0
        self.resumed_from = None
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            m = ITER_LINE.search(line)
            if m:
                self.last_iter = int(m.group(1))
            m = re.search(r"resumed epoch: \d+, iter: (\d+)", line)
            if m:
                self.resumed_from = int(m.group(1))

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self.reader.join(10)
        return rc


def newest_checkpoint_iter(work_dir: Path) -> int:
    from hieradet_mmdet.engine.checkpointing import find_resumable_checkpoint

    path = find_resumable_checkpoint(str(work_dir), logger="silent")
    return int(re.search(r"_(\d+)\.pth$", path).group(1)) if path else 0


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


def kill_between_saves(training: Training, rng: random.Random, deadline: float) -> bool:
    """SIGKILL at a random moment once the process has trained an iteration of its own."""
    while time.time() < deadline and training.proc.poll() is None:
        if training.last_iter > (training.resumed_from or 0):
            time.sleep(rng.uniform(0, 1.5))
            if training.proc.poll() is not None:
                return False
            training.proc.send_signal(signal.SIGKILL)
            return True
        time.sleep(0.01)
    return False


def final_weights(work_dir: Path):
    import torch

    from hieradet_mmdet.engine.checkpointing import find_resumable_checkpoint
    from hieradet_mmdet.weights.reader import allow_mmengine_types

    allow_mmengine_types()
    path = find_resumable_checkpoint(str(work_dir), logger="silent")
    return path, torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def main(argv=None) -> int:
    args, extra = parse_args(argv)
    sys.path.insert(0, str(REPO))
    if not any("randomness.seed" in a for a in extra):
        extra += ["--cfg-options", f"randomness.seed={args.train_seed}"]
    rng = random.Random(args.seed)
    interval = None

    print(f"== uninterrupted reference run in {args.work_dir / 'reference'}", flush=True)
    reference = Training(args.config, args.work_dir / "reference", extra, resume=False)
    if reference.wait(args.timeout) != 0:
        print("".join(reference.log[-40:]), file=sys.stderr)
        print("error: the reference run failed", file=sys.stderr)
        return 2
    total_iters = reference.last_iter

    work = args.work_dir / "faulted"
    kills, records, failed_resumes = 0, [], 0
    training = Training(args.config, work, extra, resume=False)
    while kills < args.kills:
        deadline = time.time() + args.timeout
        inside_save = rng.random() < args.save_share
        killed = (kill_inside_a_save(training, work, rng, deadline) if inside_save
                  else kill_between_saves(training, rng, deadline))
        rc = training.wait(args.timeout)
        if not killed:  # it finished (or failed) before the moment came
            if rc != 0:
                failed_resumes += 1
                print("".join(training.log[-40:]), file=sys.stderr)
            break
        kills += 1
        time.sleep(0.2)  # the reader thread drains the last lines
        saved = newest_checkpoint_iter(work)
        lost = max(0, training.last_iter - saved)
        interval = interval or _save_interval(work)
        records.append(dict(kill=kills, inside_save=inside_save, last_logged_iter=training.last_iter,
                            resumable_iter=saved, iterations_lost=lost))
        print(f"kill {kills}: {'inside a save' if inside_save else 'between saves'}, after iteration "
              f"{training.last_iter}; resuming from iteration {saved} ({lost} lost)", flush=True)
        training = Training(args.config, work, extra, resume=True)
        if training.proc.poll() not in (None, 0):
            failed_resumes += 1
    rc = training.wait(args.timeout)
    if rc != 0:
        failed_resumes += 1
        print("".join(training.log[-40:]), file=sys.stderr)

    ref_path, ref_state = final_weights(args.work_dir / "reference")
    path, state = final_weights(work)
    diff = max(float((state[k].double() - v.double()).abs().max()) if state[k].numel() else 0.0
               for k, v in ref_state.items()) if state.keys() == ref_state.keys() else float("inf")
    report = dict(config=args.config, kills=kills, kills_inside_saves=sum(r["inside_save"] for r in records),
                  resumes=len(records), failed_resumes=failed_resumes,
                  max_iterations_lost=max((r["iterations_lost"] for r in records), default=0),
                  save_interval=interval or _save_interval(work), total_iters=total_iters,
                  final_checkpoint=path, reference_checkpoint=ref_path, final_weights_max_abs_diff=diff,
                  kills_detail=records)
    print(json.dumps({k: v for k, v in report.items() if k != "kills_detail"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    ok = failed_resumes == 0 and report["max_iterations_lost"] <= report["save_interval"] and diff == 0.0
    print("OK: nothing completed was lost and the final weights equal the uninterrupted run's" if ok else
          "FAILED", flush=True)
    return 0 if ok else 1


def _save_interval(work_dir: Path) -> int:
    """The checkpoint interval of the run, from the config MMEngine wrote into the work dir."""
    configs = sorted(work_dir.glob("*.py"))
    if not configs:
        return 1
    text = configs[0].read_text()
    m = re.search(r"checkpoint=dict\([^)]*?interval=(\d+)", text, re.S)
    return int(m.group(1)) if m else 1


if __name__ == "__main__":
    sys.exit(main())
