"""Kill training at random moments, resume each time, and check that nothing is lost.

    python tools/fault_injection.py CONFIG --work-dir DIR [--kills 10] [--save-share 0.5]
                                    [--val-share 0.0] [--seed 0] [--out report.json]
                                    [train.py options, e.g. --cfg-options ...]

1. trains CONFIG once without interruption (DIR/reference) for the final weights to compare with
   (both runs with one ``randomness.seed``, ``--train-seed``, unless the options set it);
2. trains it again in DIR/faulted and SIGKILLs the process ``--kills`` times: a ``--save-share`` of
   the kills land while a checkpoint is being written (right after its temporary file appears,
   0-20 ms into the write), a ``--val-share`` during validation (0-0.5 s after its first log
   line), the others at a random moment between iterations' log lines; after every kill it
   resumes with ``tools/train.py --resume``. Iteration- and epoch-based configs alike;
3. reports the kills, how many resumes succeeded, the iterations each kill lost (the work since
   the last complete checkpoint: never more than the save interval) and the largest difference
   between the final weights and the uninterrupted run's (0: a bit-for-bit repeat).

Exit status 0 when every resume worked, no kill lost more than the save interval and the final
weights equal the reference's. The config should save often (``default_hooks.checkpoint.interval``,
or inside epochs ``latest_interval_iters`` of SafeCheckpointHook) and log every iteration, as the
tiny configs in the tests do.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "tools" / "train.py"
sys.path.insert(0, str(REPO))  # the repository's benchmarks/, which the installed plugin does not contain


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--work-dir", required=True, type=Path)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--save-share", type=float, default=0.5, help="share of kills inside checkpoint writes")
    parser.add_argument("--val-share", type=float, default=0.0, help="share of kills during validation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    parser.add_argument("--train-seed", type=int, default=0,
                        help="randomness.seed of both runs, unless the options set one (the runs must be comparable)")
    parser.add_argument("--out", type=Path, help="write the report as JSON")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per training process")
    return parser.parse_known_args(argv)


def main(argv=None) -> int:
    args, extra = parse_args(argv)
    from benchmarks.fault_injection import inject_faults, lost_nothing

    if not any("randomness.seed" in a for a in extra):
        extra += ["--cfg-options", f"randomness.seed={args.train_seed}"]
    report = inject_faults(args.config, args.work_dir, [sys.executable, str(TRAIN)], extra, args.kills,
                           args.save_share, args.seed, args.timeout, cwd=REPO, val_share=args.val_share)
    if report is None:
        return 2
    print(json.dumps({k: v for k, v in report.items() if k != "kills_detail"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    ok = lost_nothing(report)
    print("OK: nothing completed was lost and the final weights equal the uninterrupted run's" if ok else
          "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
