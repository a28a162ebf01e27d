"""Classify images with a HieraDet checkpoint that has a classification head.

    python tools/classify.py IMAGE [IMAGE ...] --checkpoint CKPT [--topk 5] [--json] [--embeddings OUT.npy]
    python tools/classify.py IMAGE [IMAGE ...] --onnx FILE.onnx [...]

CKPT: a published name (hieradet_d_small_dino-v2-imagenet12k), a birder .pt / .safetensors
file, or an http(s) URL. --onnx runs a classifier written by ``tools/export.py --classifier``
with onnxruntime instead, with the labels, input size and statistics of its FILE.onnx.json. Images that cannot be read are reported on stderr, one line each; the
others are still classified and the exit status is then 1. With --json, stdout carries only a
JSON list [{"image": PATH, "topk": [{"index": I, "label": NAME, "prob": P}, ...]}, ...].
--embeddings writes the (N, 768) embeddings of the classified images, in output order.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from hieradet_mmdet.export.runtime import OnnxClassifier
from hieradet_mmdet.models.classifier import HieraDetClassifier, open_rgb_image
from hieradet_mmdet.weights import CheckpointError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="CKPT", help="published weights name, birder .pt/.safetensors file or URL")
    source.add_argument("--onnx", metavar="FILE", help="a classifier exported by tools/export.py --classifier")
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print only a JSON list of results")
    parser.add_argument("--embeddings", metavar="OUT.npy", help="save the (N, 768) embeddings")
    parser.add_argument("--arch", help="override the layout, e.g. 'small' (SAM2 windows) or 'd_small'")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.topk < 1:
        parser.error("--topk must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.onnx:
            model = OnnxClassifier(args.onnx)
        else:
            model = HieraDetClassifier.from_checkpoint(args.checkpoint, args.arch).to(args.device)
    except (CheckpointError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    results, embeddings, failed = [], [], 0
    for path in args.images:
        try:
            image = open_rgb_image(path)
        except Exception as err:  # PIL raises several types for unreadable files
            print(f"error: cannot read image {path}: {err}", file=sys.stderr)
            failed += 1
            continue
        (topk,), embedding = model.predict([image], args.topk)
        results.append({"image": path, "topk": topk})
        embeddings.append(embedding.cpu())

    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_results(results)
    if args.embeddings:
        stacked = torch.cat(embeddings) if embeddings else torch.empty(0, model.embedding_dim)
        np.save(args.embeddings, stacked.numpy().astype(np.float32))
    return 1 if failed else 0


def print_results(results: list[dict]) -> None:
    for result in results:
        print(result["image"])
        width = max(len(entry["label"]) for entry in result["topk"])
        for rank, entry in enumerate(result["topk"], 1):
            print(f"  {rank:>2}. {entry['label']:<{width}}  (index {entry['index']:>5})  {entry['prob']:.4f}")
        print()


if __name__ == "__main__":
    sys.exit(main())
