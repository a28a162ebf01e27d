"""Train a detector with a HieraDet backbone (MMDetection's ``tools/train.py`` command line).

    python tools/train.py CONFIG [--work-dir DIR] [--amp [bf16|fp32]] [--auto-scale-lr]
                          [--resume [CKPT]] [--cfg-options KEY=VALUE ...]
                          [--launcher none|pytorch|slurm|mpi]

Runs on CPU when there is no GPU, also data-parallel (``tools/dist_train.sh``, gloo).
Every checkpoint is read with torch's weights-only loader; one that needs more is refused.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
    from mmengine.config import DictAction

    from hieradet_mmdet.engine.amp import add_amp_option

    parser = argparse.ArgumentParser(description="Train a detector (MMDetection 3.x) with HieraDet")
    parser.add_argument("config", help="config file")
    parser.add_argument("--work-dir", help="where logs and checkpoints go (default: ./work_dirs/CONFIG_NAME)")
    add_amp_option(parser, "training")
    parser.add_argument("--auto-scale-lr", action="store_true",
                        help="scale the lr by (GPUs x batch size) / auto_scale_lr.base_batch_size")
    parser.add_argument("--resume", nargs="?", type=str, const="auto",
                        help="resume from CKPT, or without a value from the newest intact checkpoint in the work dir")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction,
                        help="override config entries, e.g. train_cfg.max_iters=100 'model.backbone.init_cfg=None'")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none",
                        help="job launcher for distributed training")
    parser.add_argument("--dist-timeout", type=float, metavar="SECONDS",
                        help="how long data-parallel processes wait for a silent one before stopping "
                             "(default: 300 on CPU, torch's 1800 on GPUs)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    from hieradet_mmdet.engine.runner import enforce_safe_loading

    enforce_safe_loading()  # before anything can call torch.load

    import torch

    from hieradet_mmdet.detectors import load_config, register_modules, set_work_dir
    from hieradet_mmdet.engine.amp import use_mixed_precision
    from hieradet_mmdet.engine.checkpointing import find_resumable_checkpoint
    from hieradet_mmdet.engine.distributed import finish_distributed, init_distributed
    from hieradet_mmdet.engine.finite_loss import NonFiniteLossError
    from hieradet_mmdet.engine.runner import build_runner, log_config_changes, prepare_config
    from hieradet_mmdet.weights import CheckpointError
    from hieradet_mmdet.weights.digest import check_checkpoint

    register_modules()
    cfg = set_work_dir(load_config(args.config, args.cfg_options), args.config, args.work_dir)

    if args.amp:
        print(use_mixed_precision(cfg.optim_wrapper, torch.cuda.is_available(), args.amp))

    if args.auto_scale_lr:
        if "auto_scale_lr" not in cfg or "base_batch_size" not in cfg.auto_scale_lr:
            print("error: --auto-scale-lr needs auto_scale_lr=dict(enable=..., base_batch_size=...) in the config",
                  file=sys.stderr)
            return 2
        cfg.auto_scale_lr.enable = True

    # Refuse unsafe, corrupt or broken checkpoints before any process group or model exists.
    try:
        if args.resume == "auto":  # the newest checkpoint that verifies (it says so if that is not the newest)
            cfg.resume, cfg.load_from = True, find_resumable_checkpoint(cfg.work_dir)
        elif args.resume is not None:
            cfg.resume, cfg.load_from = True, args.resume
        if cfg.get("load_from"):
            check_checkpoint(cfg.load_from)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    init_distributed(args.launcher, args.dist_timeout)
    changes = []
    prepare_config(cfg, args.launcher, args.dist_timeout, changes=changes)
    runner = build_runner(cfg)
    log_config_changes(changes)
    try:
        runner.train()
    except (NonFiniteLossError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # e.g. a checkpoint that could not be written: the message says what is intact
        print(f"error: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        silent = _silent_ranks(err)
        if silent is None:
            raise
        print(f"error: data-parallel training stopped: {silent}\n({str(err).splitlines()[0]})", file=sys.stderr)
        return 1
    finish_distributed()
    return 0


def _silent_ranks(err: RuntimeError):
    """Which process stopped answering, when ``err`` is a collective that timed out."""
    import torch.distributed as dist

    from hieradet_mmdet.engine.distributed import silent_ranks

    text = str(err).lower()
    if not (dist.is_available() and dist.is_initialized()) or not any(w in text for w in ("timed out", "timeout")):
        return None
    return silent_ranks() or "a process stopped answering (its heartbeat could not be read)"


if __name__ == "__main__":
    sys.exit(main())
