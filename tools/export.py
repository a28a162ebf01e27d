"""Export a detector with a HieraDet backbone, its backbone alone, or the HieraDet classifier, as
ONNX (or a ``torch.export`` program), check the file against the eager model, and write a JSON
beside it (FILE.onnx.json, FILE.pt2.json) with what a user needs to feed it.

    python tools/export.py CONFIG [CHECKPOINT] --out FILE [--backbone-only] [--format onnx|pt2]
                           [--exporter torchscript|dynamo] [--check-image IMG ...] [--cfg-options K=V ...]
    python tools/export.py --classifier CHECKPOINT --out FILE [--format onnx|pt2] [--arch small]

Detector graphs take ``input`` (N, 3, H, W), the batch as the config's data preprocessor makes it
(normalised, padded), and ``img_shape`` (N, 2) int64, each image's (h, w) before padding; they
return ``dets`` (N, K, 5: x1 y1 x2 y2 score, in input pixels), ``labels`` (N, K; -1 pads images
with fewer detections) and, with a mask head, ``masks`` (N, K, 28, 28) probabilities of each
detection's class in its box. The backbone takes ``input`` and returns ``stage1``..``stage4``;
the classifier returns ``probs`` and ``embedding``. N, H and W are dynamic.

Before it reports success the tool runs the written file (onnxruntime, or the loaded program) on
inputs of another size and batch than the traced ones and prints its error against the eager
model; beyond the tolerances it exits with status 1. Checkpoints are read weights-only.
"""

from __future__ import annotations

import argparse
import os.path as osp
import sys
import time


def parse_args(argv=None):
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="MMDetection config with a HieraDet backbone")
    parser.add_argument("checkpoint", nargs="?", help="detector checkpoint (without one: the config's init_cfg "
                                                      "weights for the backbone, random heads)")
    parser.add_argument("--classifier", metavar="CHECKPOINT",
                        help="export the classifier of a checkpoint with a head (published name, birder file, URL)")
    parser.add_argument("--out", required=True, help="the file to write (.onnx or .pt2)")
    parser.add_argument("--backbone-only", action="store_true", help="export only the config's backbone")
    parser.add_argument("--format", choices=["onnx", "pt2"], default="onnx")
    parser.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript",
                        help="ONNX exporter: torch's tracing exporter (seconds) or the torch.export-based one "
                             "(minutes); both give the same graph semantics")
    parser.add_argument("--check-image", action="append", default=[], metavar="IMG",
                        help="real images for the detector check (default: two synthetic ones)")
    parser.add_argument("--arch", help="classifier layout override, e.g. 'small' (SAM2 windows) or 'd_small'")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config entries")
    args = parser.parse_args(argv)
    if bool(args.config) == bool(args.classifier):
        parser.error("give either CONFIG [CHECKPOINT] or --classifier CHECKPOINT")
    suffix = ".onnx" if args.format == "onnx" else ".pt2"
    if not args.out.endswith(suffix):
        parser.error(f"--out must end in {suffix} for --format {args.format}")
    if args.classifier and (args.backbone_only or args.cfg_options or args.check_image):
        parser.error("--backbone-only, --cfg-options and --check-image go with a CONFIG, not --classifier")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from hieradet_mmdet.engine.runner import enforce_safe_loading

    enforce_safe_loading()
    import torch

    from hieradet_mmdet.torch_compat import export_unsupported

    if export_unsupported():
        print(f"error: {export_unsupported()}", file=sys.stderr)
        return 2

    from hieradet_mmdet.export.classifier import export_classifier
    from hieradet_mmdet.export.detector import export_from_config
    from hieradet_mmdet.export.exporting import ExportTarget
    from hieradet_mmdet.export.metadata import write_metadata
    from hieradet_mmdet.weights import CheckpointError

    torch.manual_seed(0)
    start = time.time()
    target = ExportTarget(args.out, args.format, args.exporter)
    try:
        if args.classifier:
            report = export_classifier(args.classifier, target, args.arch)
        else:
            report = export_from_config(args.config, args.checkpoint, target, args.backbone_only, args.check_image,
                                        args.cfg_options)
    except (CheckpointError, NotImplementedError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report["seconds"] = round(time.time() - start, 1)
    metadata_path = write_metadata(args.out, report["metadata"])
    print(f"wrote {args.out} ({osp.getsize(args.out) / 2**20:.1f} MiB) and {metadata_path} in {report['seconds']} s")
    for line in report["check_lines"]:
        print(line)
    if report["failures"]:
        for failure in report["failures"]:
            print(f"error: the exported model differs from the eager one: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
