"""``make demo``: train Mask R-CNN with a HieraDet-S backbone on a generated dataset, on CPU.

    python tools/demo.py [--work-dir work_dirs/demo] [--weights PATH] [--iters N] [--size PX]

Steps (each prints what it does and how long it took):

1. writes a small COCO-format dataset of coloured shapes (``tools/synthetic_coco.py``)
   into WORK_DIR/data;
2. builds ``configs/maskrcnn_hieradet_s.py`` scaled down for a CPU: small images, batch 2,
   a few hundred iterations (the derived config is saved as WORK_DIR/demo_config.py);
3. evaluates the untrained detector with COCO metrics, trains (a log line every few
   iterations), evaluates again and prints bbox / segm mAP before and after side by side;
4. draws ground truth | predictions for a few validation images with MMDetection's
   ``DetLocalVisualizer`` and a PCA picture of the trained backbone's feature maps.

Backbone weights: the published DINOv2 HieraDet-S weights are used when a local copy exists
(``--weights PATH``, or the file in torch's hub cache, see the README); nothing is
downloaded. Otherwise the demo says so and trains from random weights, for which the defaults
are tuned so the detector visibly learns within the time budget.
"""

from __future__ import annotations

import argparse
import glob
import os
import os.path as osp
import sys
import time
import warnings
from typing import Optional

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOLS = osp.dirname(osp.abspath(__file__))
for path in (REPO, TOOLS):
    if path not in sys.path:
        sys.path.insert(0, path)

import synthetic_coco  # noqa: E402  (after the path setup)
from hieradet_mmdet.weights.published import PRETRAINED, cache_dir  # noqa: E402

BASE_CONFIG = osp.join(REPO, "configs", "maskrcnn_hieradet_s.py")
WEIGHTS = PRETRAINED["hieradet_d_small_dino-v2-imagenet12k"]
WEIGHTS_URL = WEIGHTS.url
METRIC_ROWS = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "segm_mAP", "segm_mAP_50", "segm_mAP_75")


class Clock:
    def __init__(self) -> None:
        self.start = time.time()
        self.marks: list[tuple[str, float]] = []
        self._last = self.start

    def step(self, title: str) -> None:
        print(f"\n=== [{time.time() - self.start:6.0f}s] {title}", flush=True)

    def done(self, label: str) -> float:
        now = time.time()
        self.marks.append((label, now - self._last))
        self._last = now
        return self.marks[-1][1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default=osp.join(REPO, "work_dirs", "demo"), help="everything goes here")
    parser.add_argument("--weights", help="local HieraDet-S checkpoint (any form the loader accepts)")
    parser.add_argument("--iters", type=int, default=300, help="training iterations (default 300)")
    parser.add_argument("--size", type=int, default=192, help="image side in pixels (default 192)")
    parser.add_argument("--train-images", type=int, default=120)
    parser.add_argument("--val-images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=None,
                        help="AdamW lr (default 4e-4 from random weights, 1e-4 from pretrained ones)")
    parser.add_argument("--layer-decay", type=float, default=None,
                        help="layer-wise lr decay over the backbone (default: the config's)")
    parser.add_argument("--backbone-lr-mult", type=float, default=1.0, help="lr multiplier of the whole backbone")
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--num-pictures", type=int, default=4, help="validation images to draw")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads (default: all cores)")
    parser.add_argument("--config", default=BASE_CONFIG, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def find_weights(explicit):
    """(path or None, sentence saying where the backbone weights come from)."""
    if explicit:
        if not osp.isfile(explicit):
            raise SystemExit(f"error: --weights {explicit} does not exist")
        return explicit, f"pretrained backbone weights from {explicit}"
    cached = cache_dir() / WEIGHTS.file_name
    if osp.isfile(cached):
        return str(cached), f"pretrained backbone weights from {cached}"
    return None, (f"no local copy of the pretrained weights at {cached}: training from RANDOM weights.\n"
                  f"    For the real ones ({WEIGHTS.file_size_mb:.0f} MB), download {WEIGHTS_URL}\n"
                  f"    into {osp.dirname(str(cached))}/ or pass --weights PATH.")


def build_config(args, data_root: str, weights):
    from mmengine.config import Config

    cfg = Config.fromfile(args.config)
    lr = args.lr if args.lr is not None else (1e-4 if weights else 4e-4)
    cfg.merge_from_dict(synthetic_coco.mmdet_dataset_overrides(data_root, with_mask=True, image_size=args.size))
    cfg.merge_from_dict(small_run_overrides(args.iters, batch_size=args.batch_size, lr=lr,
                                            warmup_iters=min(50, args.iters // 5), log_interval=args.log_interval,
                                            num_classes=len(synthetic_coco.CLASSES)))
    cfg.model.backbone.init_cfg = dict(type="Pretrained", checkpoint=weights) if weights else None
    cfg.model.backbone.drop_path_rate = 0.1 if weights else 0.0
    paramwise = cfg.optim_wrapper.setdefault("paramwise_cfg", {})
    if args.layer_decay is not None:
        paramwise["layer_decay_rate"] = args.layer_decay
    if args.backbone_lr_mult != 1.0:
        paramwise.setdefault("custom_keys", {})["backbone."] = dict(lr_mult=args.backbone_lr_mult)
    # GroupNorm in the FPN, as MMDetection's transformer-backbone detectors have: with the
    # config's plain FPN, AdamW at batch 2 grows the FPN's output scale ~20x within 60 iterations
    # (features std 1.9 -> 37, measured) and the RPN's box regression diverges.
    cfg.model.neck.norm_cfg = dict(type="GN", num_groups=32, requires_grad=True)
    cfg.optim_wrapper.clip_grad = dict(max_norm=10.0)
    cfg.randomness = dict(seed=args.seed)
    cfg.work_dir = args.work_dir
    cfg.default_hooks.visualization = dict(type="DetVisualizationHook", draw=False)
    return cfg, lr


def small_run_overrides(max_iters: int, batch_size: int = 2, lr: float = 1e-4, warmup_iters: int = 50,
                        log_interval: int = 10, num_workers: int = 0, num_classes: Optional[int] = None,
                        rcnn_samples: int = 128, max_dets: int = 50, proposals: int = 300,
                        with_mask: bool = True) -> dict:
    """``cfg.merge_from_dict`` entries for short CPU runs of a two-stage MMDetection config.

    Iteration-based schedule of ``max_iters`` (linear warmup, then cosine to 1% of ``lr``), the
    config's optimizer at a fixed ``lr`` (``auto_scale_lr`` off), one checkpoint at the end, a
    log line every ``log_interval`` iterations, no validation during training, and fewer
    proposals / sampled RoIs / kept detections than COCO's defaults so a step is cheap.
    Keys that a config does not have (e.g. RoI settings for RetinaNet) are still set, so use
    it with Faster R-CNN (``with_mask=False``) or Mask R-CNN style configs.
    """
    warmup_iters = max(1, min(warmup_iters, max_iters // 2))
    loader = dict(batch_size=batch_size, num_workers=num_workers, persistent_workers=num_workers > 0)
    over = {
        "train_cfg": dict(_delete_=True, type="IterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters + 1),
        "param_scheduler": [
            dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=warmup_iters),
            dict(type="CosineAnnealingLR", by_epoch=False, begin=warmup_iters, end=max(max_iters, warmup_iters + 1),
                 T_max=max(1, max_iters - warmup_iters), eta_min=lr * 0.01),
        ],
        "optim_wrapper.optimizer.lr": lr,
        "auto_scale_lr.enable": False,
        "train_dataloader": dict(loader, sampler=dict(type="DefaultSampler", shuffle=True)),
        "val_dataloader": dict(batch_size=1, num_workers=num_workers, persistent_workers=num_workers > 0),
        "test_dataloader": dict(batch_size=1, num_workers=num_workers, persistent_workers=num_workers > 0),
        "default_hooks.logger.interval": log_interval,
        "default_hooks.checkpoint": dict(type="SafeCheckpointHook", by_epoch=False, interval=max_iters, max_keep_ckpts=2),
        "log_processor": dict(type="LogProcessor", window_size=log_interval, by_epoch=False),
        "model.train_cfg.rpn_proposal.nms_pre": 4 * proposals,
        "model.train_cfg.rpn_proposal.max_per_img": proposals,
        "model.train_cfg.rcnn.sampler.num": rcnn_samples,
        "model.test_cfg.rpn.nms_pre": 4 * proposals,
        "model.test_cfg.rpn.max_per_img": proposals,
        "model.test_cfg.rcnn.max_per_img": max_dets,
    }
    if num_classes is not None:
        over["model.roi_head.bbox_head.num_classes"] = num_classes
        if with_mask:
            over["model.roi_head.mask_head.num_classes"] = num_classes
    return over


def calm_mask_logits(model, reference_classes: int = 80) -> None:
    """Scale the mask head's logit layer to what it gets for COCO's 80 classes.

    MMDetection initialises ``conv_logits`` with Kaiming fan-out, i.e. std sqrt(2 / num_classes):
    with our 3 classes 5x larger than with 80, which starts the mask loss at ~3.4 instead of
    ~0.7 and lets its gradients swamp everything else for the first hundred iterations."""
    conv = getattr(getattr(getattr(model, "roi_head", None), "mask_head", None), "conv_logits", None)
    if conv is not None and conv.out_channels < reference_classes:
        import torch

        with torch.no_grad():
            conv.weight.mul_((conv.out_channels / reference_classes) ** 0.5)


def metric_values(metrics: dict) -> dict:
    """{'bbox_mAP': ..., ...}; MMDetection's CocoMetric returns nothing at all when the model
    detected nothing (typical before training), which is an AP of 0."""
    values = {k.split("/")[-1]: float(v) for k, v in (metrics or {}).items()}
    return {key: values.get(key, 0.0) for key in METRIC_ROWS} | {k: v for k, v in values.items() if k not in METRIC_ROWS}


def draw_predictions(runner, out_dir: str, count: int, score_thr: float = 0.3) -> list[str]:
    """GT | prediction pictures of the first ``count`` validation images."""
    import mmcv
    import torch

    os.makedirs(out_dir, exist_ok=True)
    visualizer = runner.visualizer
    visualizer.dataset_meta = runner.val_dataloader.dataset.metainfo
    paths = []
    runner.model.eval()
    with torch.no_grad():
        for data_batch in runner.val_dataloader:
            for sample in runner.model.val_step(data_batch):
                image = mmcv.imread(sample.img_path, channel_order="rgb")
                path = osp.join(out_dir, osp.basename(sample.img_path))
                visualizer.add_datasample(osp.basename(sample.img_path), image, data_sample=sample, draw_gt=True,
                                          draw_pred=True, show=False, pred_score_thr=score_thr, out_file=path)
                paths.append(path)
                if len(paths) >= count:
                    return paths
    return paths


def main(argv=None) -> int:
    args = parse_args(argv)
    clock = Clock()

    from hieradet_mmdet.engine.runner import enforce_safe_loading

    enforce_safe_loading()
    # mmengine and mmcv import pkg_resources (hence the setuptools<81 pin); its deprecation
    # warning, printed once per import, would bury the demo's own output.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    import torch

    torch.set_num_threads(max(1, args.threads))
    from hieradet_mmdet.engine.runner import build_runner, prepare_config
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    device = "GPU" if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"

    clock.step(f"1/5 dataset: {args.train_images} train + {args.val_images} val images of {args.size} px")
    data_root = osp.join(args.work_dir, "data")
    synthetic_coco.generate(data_root, args.train_images, args.val_images, size=args.size, seed=args.seed)
    print(f"written to {data_root} (classes: {', '.join(synthetic_coco.CLASSES)})")
    clock.done("dataset")

    clock.step("2/5 model: Mask R-CNN + FPN, HieraDet-S backbone")
    weights, weights_note = find_weights(args.weights)
    print(weights_note)
    cfg, lr = build_config(args, data_root, weights)
    prepare_config(cfg, "none")
    os.makedirs(args.work_dir, exist_ok=True)
    config_path = osp.join(args.work_dir, "demo_config.py")
    cfg.dump(config_path)
    print(f"config: {config_path} (derived from {osp.relpath(args.config, REPO)}; {args.iters} iterations, batch "
          f"{args.batch_size}, AdamW lr {lr:g}, on {device})")
    runner = build_runner(cfg)
    runner.model.init_weights()  # what training starts from; train() will not initialise again
    calm_mask_logits(runner.model)
    clock.done("build")

    clock.step("3/5 COCO evaluation of the untrained detector")
    before = metric_values(runner.val())
    clock.done("eval before")

    clock.step(f"4/5 training for {args.iters} iterations (log every {args.log_interval})")
    t_train = time.time()
    runner.train()
    train_s = time.time() - t_train
    clock.done("train")
    print(f"trained {args.iters} iterations in {train_s:.0f}s ({train_s / max(1, args.iters):.2f} s/iter)")
    after = metric_values(runner.val())
    clock.done("eval after")

    clock.step("5/5 pictures")
    vis_dir = osp.join(args.work_dir, "predictions")
    pictures = draw_predictions(runner, vis_dir, args.num_pictures)
    from visualize_features import feature_pictures, write_pictures

    backbone = runner.model.backbone.eval()
    first_val = sorted(glob.glob(osp.join(data_root, "val", "*.png")))[0]
    resized, feats = feature_pictures(backbone, mmcv_rgb(first_val), size=args.size)
    feature_paths = write_pictures(osp.join(args.work_dir, "features"), resized, feats, backbone.out_strides)
    clock.done("pictures")

    print(f"\n=== results ({'pretrained' if weights else 'random'} backbone weights, {args.iters} iterations)")
    print(f"{'metric':<14}{'before':>10}{'after':>10}")
    for key in METRIC_ROWS:
        if key in after:
            print(f"{key:<14}{before.get(key, float('nan')):>10.3f}{after[key]:>10.3f}")
    ckpt = osp.join(args.work_dir, f"iter_{args.iters}.pth")
    print("\nwhere everything is:")
    print(f"  dataset        {data_root}")
    print(f"  config         {config_path}")
    print(f"  checkpoint     {ckpt}")
    print(f"  training log   {runner.log_dir}")
    print(f"  predictions    {vis_dir}/  ({len(pictures)} pictures; left: ground truth, "
          f"right: predictions with score >= 0.3)")
    print(f"  features       {feature_paths[-1]}  (PCA of each stage's feature map)")
    print(f"  evaluate again: .venv/bin/python tools/test.py {config_path} {ckpt}")
    print("\ntime: " + ", ".join(f"{label} {sec:.0f}s" for label, sec in clock.marks)
          + f"; total {time.time() - clock.start:.0f}s")
    if not after.get("bbox_mAP", 0) > before.get("bbox_mAP", 0):
        print("warning: bbox mAP did not improve; train longer (--iters) or check the log", file=sys.stderr)
    return 0


def mmcv_rgb(path: str):
    import mmcv

    return mmcv.imread(path, channel_order="rgb")


if __name__ == "__main__":
    sys.exit(main())
