"""``make demo``: train Mask R-CNN with a HieraDet-S backbone on a generated dataset, on CPU
(``tools/demo.py`` says what it does, step by step)."""

from __future__ import annotations

import glob
import os
import os.path as osp
import sys
import time
import warnings

from ..weights.published import PRETRAINED, cache_dir
from . import synthetic_coco
from .small_run import METRIC_ROWS, calm_mask_logits, metric_values, small_run_overrides

WEIGHTS = PRETRAINED["hieradet_d_small_dino-v2-imagenet12k"]
WEIGHTS_URL = WEIGHTS.url


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
    from ..detectors import load_config

    cfg = load_config(args.config)
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


def run(args, repo: str) -> int:
    """The demo with the options of ``tools/demo.py`` (an argparse Namespace: work_dir, weights,
    iters, size, train_images, val_images, batch_size, lr, layer_decay, backbone_lr_mult,
    log_interval, num_pictures, seed, threads, config); ``repo`` is the repository root that
    paths are printed relative to. Returns the exit status."""
    clock = Clock()

    from ..engine.runner import enforce_safe_loading

    enforce_safe_loading()
    # mmengine and mmcv import pkg_resources (hence the setuptools<81 pin); its deprecation
    # warning, printed once per import, would bury the demo's own output.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    import torch

    torch.set_num_threads(max(1, args.threads))
    from ..detectors import register_modules
    from ..engine.runner import build_runner, prepare_config

    register_modules()
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
    print(f"config: {config_path} (derived from {osp.relpath(args.config, repo)}; {args.iters} iterations, batch "
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
    from .features import feature_pictures, read_rgb_image, write_pictures

    backbone = runner.model.backbone.eval()
    first_val = sorted(glob.glob(osp.join(data_root, "val", "*.png")))[0]
    resized, feats = feature_pictures(backbone, read_rgb_image(first_val), size=args.size)
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
