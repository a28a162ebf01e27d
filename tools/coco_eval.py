#!/usr/bin/env python
"""Evaluate a COCO result file (boxes or masks) against a COCO annotation file.

    python tools/coco_eval.py ANNOTATIONS.json RESULTS.json [--iou-type bbox|segm]
                              [--backend auto|hotcoco|faster_coco_eval|pycocotools] [--out METRICS.json]

Prints the 12 COCO stats, with pycocotools' numbers from the fastest installed evaluator
(hieradet_mmdet.engine.coco_metric), and a line per stage with its seconds. Both files are
checked first: a malformed one stops it with one line naming the file and its first bad entry,
and exit status 1. ``--out`` is written whole or not at all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("annotations", help="COCO annotation file (instances_*.json)")
    parser.add_argument("results", help="COCO result file: a JSON list of detections")
    parser.add_argument("--iou-type", choices=("bbox", "segm"), default="bbox")
    parser.add_argument("--backend", default="auto", choices=("auto", "hotcoco", "faster_coco_eval", "pycocotools"))
    parser.add_argument("--out", help="also write the stats as JSON here")
    args = parser.parse_args(argv)

    from hieradet_mmdet.engine.coco_metric import CocoFileError, evaluate_files

    try:
        stats = evaluate_files(args.annotations, args.results, args.iou_type, args.backend,
                               log=lambda message: print(message, flush=True))
    except CocoFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for name, value in stats.items():
        print(f"{args.iou_type} {name:10s} {value:.4f}")
    if args.out:
        tmp = f"{args.out}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(dict(iou_type=args.iou_type, **stats), f, indent=1)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
