"""``make demo``: train Mask R-CNN with a HieraDet-S backbone on a generated dataset, on CPU.

    python tools/demo.py [--work-dir work_dirs/demo] [--weights PATH] [--iters N] [--size PX]

Steps (each prints what it does and how long it took):

1. writes a small COCO-format dataset of coloured shapes (``hieradet_mmdet.demo.synthetic_coco``)
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
import os
import os.path as osp
import sys

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
BASE_CONFIG = osp.join(REPO, "configs", "maskrcnn_hieradet_s.py")


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


def main(argv=None) -> int:
    args = parse_args(argv)
    from hieradet_mmdet.demo.run import run

    return run(args, REPO)


if __name__ == "__main__":
    sys.exit(main())
