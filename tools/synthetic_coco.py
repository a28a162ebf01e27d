"""A small, deterministic COCO-format instance-segmentation dataset of coloured shapes.

:mod:`hieradet_mmdet.demo.synthetic_coco` describes the images and annotations.

Layout written under ``OUT_DIR``::

    annotations/instances_train.json   train/000000.png ...
    annotations/instances_val.json     val/000000.png ...

Command line::

    python tools/synthetic_coco.py OUT_DIR --train 64 --val 16 --size 256 [--seed 0] [--panoptic]

``--panoptic`` writes the COCO-panoptic form instead (:mod:`hieradet_mmdet.demo.synthetic_panoptic`:
the shapes as things, wall and floor as stuff, PNG segment maps, the panoptic JSON and the
matching instance JSON).

Needs numpy, OpenCV and pycocotools; ``mmdet_dataset_overrides`` of the same module gives the
config pieces that point an MMDetection COCO config at it.
"""

from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

from hieradet_mmdet.demo import synthetic_panoptic
from hieradet_mmdet.demo.synthetic_coco import generate


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder to write annotations/, train/ and val/ into")
    parser.add_argument("--train", type=int, default=64, help="number of training images")
    parser.add_argument("--val", type=int, default=16, help="number of validation images")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shapes", type=int, default=3, help="at most this many shapes per image")
    parser.add_argument("--panoptic", action="store_true",
                        help="COCO panoptic: segment maps and panoptic JSON (+ instance JSON of the things)")
    args = parser.parse_args(argv)
    if args.panoptic:
        written = synthetic_panoptic.generate(args.out_dir, args.train, args.val, args.size, args.seed,
                                              args.max_shapes)
        for split, paths in written.items():
            with open(paths["panoptic"], encoding="utf-8") as f:
                segments = sum(len(a["segments_info"]) for a in json.load(f)["annotations"])
            print(f"{split}: {segments} segments -> {paths['panoptic']}, {paths['instances']}")
        return
    paths = generate(args.out_dir, args.train, args.val, args.size, args.seed, args.max_shapes)
    for split, path in paths.items():
        with open(path, encoding="utf-8") as f:
            n_ann = len(json.load(f)["annotations"])
        n_img = args.train if split == "train" else args.val
        print(f"{split}: {n_img} images, {n_ann} instances -> {path}")


if __name__ == "__main__":
    main()
