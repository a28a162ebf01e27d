"""Evaluate a checkpoint (MMDetection's ``tools/test.py`` command line).

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out RESULTS.pkl]
                         [--show] [--show-dir DIR] [--wait-time S] [--tta] [--amp [bf16|fp32]]
                         [--allow-partial-load]
                         [--cfg-options KEY=VALUE ...] [--launcher none|pytorch|slurm|mpi]

Prints the config's test metrics (COCO bbox AP, and segm AP for Mask R-CNN, through our
``FastCocoMetric``, MMDetection's ``CocoMetric`` evaluated faster; PQ for panoptic configs) and a
one-line summary. The checkpoint is read with torch's weights-only loader;
one that needs arbitrary Python objects is refused, and so is one that does not hold every
weight of the detector in the right shape (``--allow-partial-load`` evaluates it anyway).
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
    from mmengine.config import DictAction

    from hieradet_mmdet.engine.amp import add_amp_option

    parser = argparse.ArgumentParser(description="Test (and evaluate) a detector checkpoint")
    parser.add_argument("config", help="config file")
    parser.add_argument("checkpoint", help="checkpoint file")
    parser.add_argument("--work-dir", help="where the evaluation log and metrics go")
    parser.add_argument("--out", help="also dump the raw predictions to this .pkl file")
    parser.add_argument("--show", action="store_true", help="show predictions in a window")
    parser.add_argument("--show-dir", help="write pictures of the predictions to WORK_DIR/TIMESTAMP/SHOW_DIR")
    parser.add_argument("--wait-time", type=float, default=2, help="seconds each --show picture stays up")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation (config's tta_model/tta_pipeline)")
    add_amp_option(parser, "evaluation")
    parser.add_argument("--allow-partial-load", action="store_true",
                        help="evaluate even if the checkpoint lacks weights of the detector (those keep their "
                             "random initial values) or has others")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config entries")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


def summary_line(metrics: dict) -> str:
    """'bbox_mAP=0.512 bbox_mAP_50=0.801 ... segm_mAP=0.470' (and PQ=...) from the runner's metrics dict."""
    keys = [k for k in metrics if k.split("/")[-1].endswith(("_mAP", "_mAP_50", "_mAP_75"))
            or k.split("/")[-1] in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st")]
    return " ".join(f"{k.split('/')[-1]}={float(metrics[k]):.4f}" for k in keys)


def main(argv=None) -> int:
    args = parse_args(argv)

    from hieradet_mmdet.engine.runner import enforce_safe_loading

    enforce_safe_loading()

    import torch

    from hieradet_mmdet.detectors import load_config, register_modules, set_work_dir
    from hieradet_mmdet.engine.distributed import finish_distributed, init_distributed
    from hieradet_mmdet.engine.runner import build_runner, log_config_changes, prepare_config
    from hieradet_mmdet.weights import CheckpointError
    from hieradet_mmdet.weights.digest import check_checkpoint
    from hieradet_mmdet.weights.fit import checkpoint_mismatch

    register_modules()

    try:
        check_checkpoint(args.checkpoint)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    cfg = set_work_dir(load_config(args.config, args.cfg_options), args.config, args.work_dir)
    cfg.load_from = args.checkpoint
    cfg.resume = False
    # Backbone init weights are irrelevant (the checkpoint replaces them) and may need a download.
    if cfg.get("model", {}).get("backbone", {}).get("init_cfg") is not None:
        cfg.model.backbone.init_cfg = None

    if args.show or args.show_dir:
        hooks = cfg.setdefault("default_hooks", {})
        vis = hooks.get("visualization") or dict(type="DetVisualizationHook")
        vis.update(draw=True, show=args.show, wait_time=args.wait_time)
        if args.show_dir:
            vis["test_out_dir"] = args.show_dir
        hooks["visualization"] = vis

    amp_dtype = None
    if args.amp:
        from hieradet_mmdet.engine.amp import choose_mixed_precision

        amp_dtype, line = choose_mixed_precision(args.amp, torch.cuda.is_available())
        print(line, flush=True)
    if amp_dtype == torch.float16:
        cfg.test_cfg = dict(cfg.get("test_cfg") or {}, fp16=True)  # MMEngine's TestLoop autocasts to fp16

    if args.tta:
        if "tta_model" not in cfg or "tta_pipeline" not in cfg:
            print("error: --tta needs tta_model and tta_pipeline in the config", file=sys.stderr)
            return 2
        cfg.model = dict(**cfg.tta_model, module=cfg.model)
        loader = cfg.test_dataloader
        dataset = loader.dataset
        while "dataset" in dataset:  # dataset wrappers
            dataset = dataset.dataset
        dataset.pipeline = cfg.tta_pipeline

    if args.out:
        if not args.out.endswith((".pkl", ".pickle")):
            print("error: --out must be a .pkl/.pickle file", file=sys.stderr)
            return 2
        evaluators = cfg.test_evaluator if isinstance(cfg.test_evaluator, list) else [cfg.test_evaluator]
        cfg.test_evaluator = [*evaluators, dict(type="DumpDetResults", out_file_path=args.out)]

    init_distributed(args.launcher)
    changes = []
    prepare_config(cfg, args.launcher, changes=changes)
    runner = build_runner(cfg)
    log_config_changes(changes)
    mismatch = checkpoint_mismatch(runner.model, args.checkpoint)
    if mismatch:
        if not args.allow_partial_load:
            print(f"error: checkpoint {args.checkpoint} does not fit the detector of {args.config}; evaluating it "
                  f"would score random weights.\n{mismatch}\n(--allow-partial-load evaluates it anyway)",
                  file=sys.stderr)
            finish_distributed()
            return 1
        print(f"warning: {args.checkpoint} loads only partly (--allow-partial-load):\n{mismatch}", file=sys.stderr)
    if amp_dtype == torch.bfloat16:
        _autocast_test_steps(runner.model, amp_dtype)
    metrics = runner.test()
    if runner.rank == 0:
        print(f"[hieradet-mmdet] test metrics: {summary_line(metrics) or metrics}", flush=True)
    finish_distributed()
    return 0


def _autocast_test_steps(model, dtype) -> None:
    """``dtype`` autocast over the whole detector in every test step (float32 at the RoI ops and
    the heads' output layers: hieradet_mmdet.engine.amp.autocast_detector)."""
    import torch

    from hieradet_mmdet.engine.amp import autocast_detector
    from hieradet_mmdet.mmengine_adapter import override

    model = getattr(model, "module", model)

    def amp_test_step(data):
        with torch.no_grad(), autocast_detector(model, dtype):
            return test_step(data)

    test_step = override(model, "test_step", amp_test_step)


if __name__ == "__main__":
    sys.exit(main())
