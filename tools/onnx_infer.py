"""Run a detector exported by tools/export.py with onnxruntime, without MMDetection.

    python tools/onnx_infer.py IMAGE [IMAGE ...] --model FILE.onnx [--out DIR] [--score-thr T] [--json]

Reads FILE.onnx.json (written beside the model), preprocesses each image as the config's test
pipeline did (OpenCV decoding and resizing, normalisation, padding), runs the model one image at
a time, as MMDetection's ``inference_detector`` does, and prints the detections in original-image
pixels: ``label score x1 y1 x2 y2`` per line (with --json only a JSON list). --out writes a
picture per image with the boxes (and masks). Needs NumPy, OpenCV and onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--model", required=True, help="an .onnx detector written by tools/export.py")
    parser.add_argument("--out", help="write a picture of the detections per image into this folder")
    parser.add_argument("--score-thr", type=float, default=0.3,
                        help="report detections scoring at least this (default 0.3; the graph itself keeps "
                             "those above the config's test score_thr)")
    parser.add_argument("--json", action="store_true", help="print only a JSON list of results")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from hieradet_mmdet.export.runtime import OnnxDetector, draw, read_bgr_image

    try:
        detector = OnnxDetector(args.model, args.threads)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if detector.not_reproduced:
        print(f"warning: the config's test pipeline also had {', '.join(detector.not_reproduced)}, "
              "which is not reproduced here", file=sys.stderr)
    classes = detector.classes
    if args.out:
        os.makedirs(args.out, exist_ok=True)

    results, failed = [], 0
    for path in args.images:
        try:
            image = read_bgr_image(path)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
            continue
        found = detector.detect(image, args.score_thr)
        results.append((path, found))
        if args.out:
            import cv2

            target = osp.join(args.out, osp.splitext(osp.basename(path))[0] + ".png")
            cv2.imwrite(target, draw(image, found, classes))

    if args.json:
        print(json.dumps([_as_json(path, found, classes) for path, found in results], indent=2))
    else:
        for path, found in results:
            print(f"{path}: {len(found['scores'])} detections")
            for box, score, label in zip(found["boxes"], found["scores"], found["labels"]):
                name = classes[label] if label < len(classes) else str(label)
                print(f"  {name:<16} {score:.4f}  " + " ".join(f"{v:8.1f}" for v in box))
    return 1 if failed else 0


def _as_json(path, found, classes) -> dict:
    entries = []
    for k, (box, score, label) in enumerate(zip(found["boxes"], found["scores"], found["labels"])):
        entry = {"label": int(label), "class": classes[label] if label < len(classes) else str(label),
                 "score": float(score), "box": [float(v) for v in box]}
        if "masks" in found:
            entry["mask_area"] = int(found["masks"][k].sum())
        entries.append(entry)
    return {"image": path, "detections": entries}


if __name__ == "__main__":
    sys.exit(main())
