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
import json
import os
import os.path as osp
import re
import sys
import time

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

BACKBONE_TOL = 1e-4   # relative, per stage
CLASSIFIER_TOL = 1e-4  # absolute on probabilities, relative on embeddings
MASK_TOL = 1e-3       # absolute on mask probabilities


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

    from hieradet_mmdet.weights import CheckpointError

    torch.manual_seed(0)
    start = time.time()
    try:
        if args.classifier:
            report = export_classifier(args)
        else:
            report = export_from_config(args)
    except (CheckpointError, NotImplementedError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report["seconds"] = round(time.time() - start, 1)
    metadata_path = args.out + ".json"
    with open(metadata_path, "w") as f:
        f.write(metadata_json(report["metadata"]))
    print(f"wrote {args.out} ({osp.getsize(args.out) / 2**20:.1f} MiB) and {metadata_path} in {report['seconds']} s")
    for line in report["check_lines"]:
        print(line)
    if report["failures"]:
        for failure in report["failures"]:
            print(f"error: the exported model differs from the eager one: {failure}", file=sys.stderr)
        return 1
    return 0


# ---- the three kinds of model -------------------------------------------------------------------

def export_classifier(args) -> dict:
    import numpy as np
    import torch

    from hieradet_mmdet.export.graphs import ClassifierGraph
    from hieradet_mmdet.export.exporting import relative_error
    from hieradet_mmdet.models.classifier import HieraDetClassifier

    classifier = HieraDetClassifier.from_checkpoint(args.classifier, args.arch).eval()
    graph = ClassifierGraph(classifier)
    h, w = classifier.input_size
    gen = torch.Generator().manual_seed(0)
    example = (torch.randn(1, 3, h, w, generator=gen),)
    check = torch.randn(2, 3, h, w, generator=gen)
    dynamic = {"input": {0: "N", 2: "H", 3: "W"}}
    run = write(args, graph, example, ["input"], ["probs", "embedding"], dynamic)
    probs, embedding = run({"input": check.numpy()})
    with torch.no_grad():  # eager: the fast path, as tools/classify.py runs it
        ref_embedding = classifier.embedding(check)
        ref_probs = classifier.classify(ref_embedding).softmax(dim=1)
    prob_err = float(np.abs(probs - ref_probs.numpy()).max())
    emb_err = relative_error(embedding, ref_embedding.numpy())
    failures = [f"probabilities differ by {prob_err:.2e} (> {CLASSIFIER_TOL})"] if prob_err > CLASSIFIER_TOL else []
    if emb_err > CLASSIFIER_TOL:
        failures.append(f"embeddings differ by {emb_err:.2e} relative (> {CLASSIFIER_TOL})")
    line = (f"check ({runtime_name(args)} vs eager, batch 2 at {h}x{w}): max |probability diff| {prob_err:.2e}, "
            f"embedding relative error {emb_err:.2e}")
    stats = classifier.rgb_stats
    metadata = base_metadata(args, "classifier", "HieraDetClassifier")
    metadata.update({
        "inputs": [tensor_spec("input", ["N", 3, "H", "W"], "float32",
                               f"normalised RGB images; the head was trained at {h}x{w}")],
        "outputs": [tensor_spec("probs", ["N", classifier.num_classes], "float32", "softmax probabilities"),
                    tensor_spec("embedding", ["N", classifier.embedding_dim], "float32",
                                "pooled, normalised features (the head's input)")],
        "preprocess": {"channel_order": "RGB", "input_size": [h, w], "value_range": [0.0, 1.0],
                       "mean": list(stats["mean"]), "std": list(stats["std"]),
                       "resize": {"size": [h, w], "interpolation": "bicubic", "library": "Pillow"}},
        "classes": classifier.labels,
        "check": {"max_probability_diff": prob_err, "embedding_relative_error": emb_err},
    })
    return {"metadata": metadata, "check_lines": [line], "failures": failures}


def export_from_config(args) -> dict:
    from hieradet_mmdet.detectors import build_detector, load_config
    from hieradet_mmdet.export.config import class_names, detector_preprocess

    cfg = load_config(args.config, args.cfg_options)
    model = build_detector(cfg, args.checkpoint)
    if not args.checkpoint:
        init = cfg.model.get("backbone", {}).get("init_cfg")
        weights = f"the weights of its init_cfg ({init.get('checkpoint')})" if init else "random weights"
        print(f"note: no checkpoint: the backbone has {weights}, the rest random weights", file=sys.stderr)
    preprocess, left_out = detector_preprocess(cfg, model)
    if left_out:
        print(f"warning: the test pipeline's {', '.join(left_out)} is not described in the JSON; "
              "tools/onnx_infer.py will not reproduce it", file=sys.stderr)
    preprocess["not_reproduced"] = left_out
    if args.backbone_only:
        report = export_backbone(args, model, cfg)
    else:
        report = export_detector(args, model, cfg)
    report["metadata"]["preprocess"] = preprocess
    report["metadata"]["classes"] = [] if args.backbone_only else class_names(cfg, model)
    report["metadata"]["source"] = {"config": args.config, "checkpoint": args.checkpoint}
    return report


def export_backbone(args, model, cfg) -> dict:
    import torch

    from hieradet_mmdet.export.exporting import relative_error

    backbone = model.backbone.eval()
    example = (synthetic_batch(model, cfg, [(480, 640)])[0],)
    names = [f"stage{i + 1}" for i in backbone.out_indices]
    dynamic = {"input": {0: "N", 2: "H", 3: "W"}}
    run = write(args, backbone, example, ["input"], names, dynamic)
    gen = torch.Generator().manual_seed(1)
    errors = []
    for shape in [(2, 3, 200, 328), (1, 3, *example[0].shape[2:])]:
        x = torch.randn(*shape, generator=gen)
        outs = run({"input": x.numpy()})
        with torch.no_grad():
            refs = backbone(x)
        errors.append(max(relative_error(o, r.numpy()) for o, r in zip(outs, refs)))
    err = max(errors)
    failures = [f"backbone outputs differ by {err:.2e} relative (> {BACKBONE_TOL})"] if err > BACKBONE_TOL else []
    line = (f"check ({runtime_name(args)} vs eager, batch 2 at 200x328 and batch 1 at "
            f"{example[0].shape[2]}x{example[0].shape[3]}): max relative error {err:.2e}")
    metadata = base_metadata(args, "backbone", type(backbone).__name__)
    metadata.update({
        "inputs": [tensor_spec("input", ["N", 3, "H", "W"], "float32", "normalised images (any size from 29 px)")],
        "outputs": [tensor_spec(n, ["N", c, f"H/{s}", f"W/{s}"], "float32", f"stride-{s} features")
                    for n, c, s in zip(names, backbone.out_channels, backbone.out_strides)],
        "check": {"max_relative_error": err},
    })
    return {"metadata": metadata, "check_lines": [line], "failures": failures}


def export_detector(args, model, cfg) -> dict:
    import numpy as np
    import torch

    from hieradet_mmdet.export.checks import BOX_TOL, SCORE_TOL, match_detections, summarise_matches
    from hieradet_mmdet.export.config import test_settings
    from hieradet_mmdet.export.detector import exportable_detector, output_names

    graph = exportable_detector(model)
    example = synthetic_batch(model, cfg, [(480, 640)])
    names = output_names(graph)
    dynamic = {"input": {0: "N", 2: "H", 3: "W"}, "img_shape": {0: "N"}}
    run = write(args, graph, example, ["input", "img_shape"], names, dynamic)

    images = [load_check_image(p) for p in args.check_image] or None
    inputs, img_shape, samples = prepared_batch(model, cfg, images or [synthetic_image(500, 375, 2),
                                                                      synthetic_image(360, 560, 3)])
    outs = run({"input": inputs.numpy(), "img_shape": img_shape.numpy()})
    with torch.no_grad():
        refs = model.predict(inputs, samples, rescale=False)
        eager = graph(inputs, img_shape)
    matches = [match_detections(outs[0][i], outs[1][i], r.pred_instances.bboxes.numpy(),
                                r.pred_instances.scores.numpy(), r.pred_instances.labels.numpy())
               for i, r in enumerate(refs)]
    summary = summarise_matches(matches)
    failures = []
    if summary["unmatched"]:
        failures.append(f"{summary['unmatched']} of the top {summary['compared']} detections have no MMDetection "
                        f"detection of the same class within {SCORE_TOL} in score and {BOX_TOL} px")
    line = (f"check ({runtime_name(args)} vs MMDetection's predict, batch of {len(refs)} at "
            f"{'x'.join(str(s) for s in inputs.shape[2:])}): {summary['compared']} top detections compared, "
            f"{summary['unmatched']} unmatched, max |score diff| {summary['max_score_diff']:.2e}, "
            f"max box diff {summary['max_box_diff']:.2e} px (detections {summary['counts']}, "
            f"MMDetection {summary['reference_counts']})")
    lines = [line]
    if len(names) > 2:
        real = outs[1] >= 0
        mask_err = float(np.abs(outs[2] - eager[2].numpy())[real].max()) if real.any() else 0.0
        summary["max_mask_probability_diff"] = mask_err
        lines.append(f"masks: max |probability diff| {mask_err:.2e} against the eager graph")
        if mask_err > MASK_TOL:
            failures.append(f"mask probabilities differ by {mask_err:.2e} (> {MASK_TOL})")
    if summary["compared"] == 0:
        lines.append("note: no detections on the check images; pass real ones with --check-image")

    metadata = base_metadata(args, "detector", type(model).__name__)
    outputs = [tensor_spec("dets", ["N", "K", 5], "float32", "x1 y1 x2 y2 score in input pixels, best first; "
                           "divide the boxes by the resize factor for the original image"),
               tensor_spec("labels", ["N", "K"], "int64", "class index; -1 on rows that pad an image's detections")]
    if len(names) > 2:
        size = int(outs[2].shape[-1])
        outputs.append(tensor_spec("masks", ["N", "K", size, size], "float32",
                                   "mask probabilities of each detection's class inside its box"))
    metadata.update({
        "inputs": [tensor_spec("input", ["N", 3, "H", "W"], "float32", "the batch as the data preprocessor makes it"),
                   tensor_spec("img_shape", ["N", 2], "int64", "(h, w) of each resized image before padding")],
        "outputs": outputs,
        "postprocess": test_settings(model),
        "check": summary,
    })
    return {"metadata": metadata, "check_lines": lines, "failures": failures}


# ---- writing and running the file ---------------------------------------------------------------

def write(args, module, example, input_names, output_names, dynamic):
    """Export ``module``; returns a function from a feed dict to NumPy outputs of the written file."""
    from hieradet_mmdet.export.exporting import export_onnx, export_program, onnx_session, run_onnx

    if args.format == "onnx":
        export_onnx(module, example, args.out, input_names, output_names, dynamic, args.exporter)
        session = onnx_session(args.out)
        return lambda feeds: run_onnx(session, feeds)

    import torch

    export_program(module, example, args.out, input_names, dynamic)
    program = torch.export.load(args.out).module()

    def run(feeds):
        with torch.no_grad():
            outs = program(*(torch.from_numpy(feeds[name]) for name in input_names))
        return [o.numpy() for o in outs]

    return run


def runtime_name(args) -> str:
    if args.format == "pt2":
        return "the loaded torch.export program"
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__}"


def base_metadata(args, kind: str, architecture: str) -> dict:
    import onnx
    import onnxruntime
    import torch

    import hieradet_mmdet
    from hieradet_mmdet.export.ops import OPSET

    versions = {"torch": torch.__version__, "hieradet_mmdet": hieradet_mmdet.__version__,
                "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    if kind != "classifier":
        import mmdet

        versions["mmdet"] = mmdet.__version__
    if args.format == "onnx":
        versions.update(opset=OPSET, exporter=args.exporter)
    else:
        versions["load_with"] = "import hieradet_mmdet.export.ops; torch.export.load(path).module()"
    return {"format": args.format, "model": kind, "architecture": architecture, "versions": versions}


def metadata_json(metadata: dict) -> str:
    """Indented JSON with lists of plain values on one line (shapes, mean, std, class names)."""
    text = json.dumps(metadata, indent=2)
    return re.sub(r"\[\s*([^\[\]{}]*?)\s*\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text) + "\n"


def tensor_spec(name, shape, dtype, description) -> dict:
    return {"name": name, "shape": shape, "dtype": dtype, "description": description}


# ---- inputs -------------------------------------------------------------------------------------

def synthetic_image(height: int, width: int, seed: int):
    """A BGR uint8 picture with smooth shading and a few filled shapes (deterministic)."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = 90 + 60 * np.sin(x / width * 3 + rng.uniform(0, 6)) * np.cos(y / height * 2 + rng.uniform(0, 6))
    image = np.clip(base[..., None] + rng.normal(0, 8, (height, width, 3)), 0, 255).astype(np.uint8)
    for _ in range(4):
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(min(height, width) // 8, min(height, width) // 3))
        if rng.random() < 0.5:
            cv2.rectangle(image, (cx - size, cy - size // 2), (cx + size, cy + size // 2), colour, -1)
        else:
            cv2.circle(image, (cx, cy), size // 2, colour, -1)
    return image


def load_check_image(path):
    from hieradet_mmdet.export.runtime import load_image

    return load_image(path)


def prepared_batch(model, cfg, images):
    """BGR images through the config's test pipeline and the data preprocessor, as
    inference_detector does: (inputs, img_shape (N, 2) int64, data samples)."""
    import torch
    from mmengine.dataset import Compose

    from mmdet.utils import get_test_pipeline_cfg

    steps = get_test_pipeline_cfg(cfg.copy())
    steps[0].type = "mmdet.LoadImageFromNDArray"
    pipeline = Compose(steps)
    items = [pipeline(dict(img=image, img_id=i)) for i, image in enumerate(images)]
    batch = model.data_preprocessor(dict(inputs=[d["inputs"] for d in items],
                                         data_samples=[d["data_samples"] for d in items]), False)
    shapes = torch.tensor([s.metainfo["img_shape"] for s in batch["data_samples"]], dtype=torch.long)
    return batch["inputs"], shapes, batch["data_samples"]


def synthetic_batch(model, cfg, sizes):
    inputs, shapes, _ = prepared_batch(model, cfg, [synthetic_image(h, w, i) for i, (h, w) in enumerate(sizes)])
    return inputs, shapes


if __name__ == "__main__":
    sys.exit(main())
