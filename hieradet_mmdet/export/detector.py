"""A config's detector, or its backbone alone, as an exported file: the exportable form of each
detector family, and the check of the written file against MMDetection at another image size and
batch than the traced ones."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from torch import nn

from .compare import BOX_TOL, SCORE_TOL, match_detections, rel_err, summarise_matches
from .exporting import ExportTarget
from .metadata import base_metadata, tensor_spec
from .query_based import SUPPORTED_DETECTORS as QUERY_BASED
from .query_based import QueryBasedDetector
from .single_stage import SingleStageDetector
from .two_stage import TwoStageDetector

BACKBONE_TOL = 1e-4   # relative, per stage
MASK_TOL = 1e-3       # absolute on mask probabilities
TRACE_SIZE = (480, 640)  # (h, w) of the synthetic image the graph is traced with


EXPORTABLE = "RetinaNet, FCOS, Faster R-CNN, Mask R-CNN, Cascade (Mask) R-CNN, DINO, Deformable DETR"


def exportable_detector(detector: nn.Module) -> nn.Module:
    """RetinaNet / FCOS -> :class:`SingleStageDetector`; Faster / Mask / Cascade (Mask) R-CNN ->
    :class:`TwoStageDetector`; DINO / Deformable DETR -> :class:`QueryBasedDetector`. Each shares
    the detector's modules and weights; in eval mode. Any other detector: NotImplementedError,
    saying so in one line."""
    kind = type(detector).__name__
    if hasattr(detector, "roi_head") and hasattr(detector, "rpn_head"):
        return TwoStageDetector(detector).eval()
    if kind in QUERY_BASED:
        return QueryBasedDetector(detector).eval()
    if hasattr(detector, "bbox_head") and not hasattr(detector, "decoder"):
        return SingleStageDetector(detector).eval()
    raise NotImplementedError(f"{kind} detectors cannot be exported yet; exportable: {EXPORTABLE}")


def output_names(module: nn.Module) -> list[str]:
    with_mask = isinstance(module, TwoStageDetector) and module.with_mask
    return ["dets", "labels", "masks"] if with_mask else ["dets", "labels"]


def export_from_config(config: str, checkpoint: Optional[str], target: ExportTarget, backbone_only: bool = False,
                       check_images: Sequence[str] = (), cfg_options: Optional[dict] = None) -> dict:
    """Write the detector of ``config`` (with ``checkpoint``'s weights, read strictly), or only its
    backbone, to ``target`` and check it; notes on what the file leaves out go to stderr.

    Returns ``metadata`` (the JSON's content), ``check_lines`` (what the check found, to print)
    and ``failures`` (empty when the file is within the tolerances of the eager model)."""
    from ..detectors import build_detector, load_config
    from .config import class_names, detector_preprocess

    cfg = load_config(config, cfg_options)
    model = build_detector(cfg, checkpoint)
    if not checkpoint:
        init = cfg.model.get("backbone", {}).get("init_cfg")
        weights = f"the weights of its init_cfg ({init.get('checkpoint')})" if init else "random weights"
        print(f"note: no checkpoint: the backbone has {weights}, the rest random weights", file=sys.stderr)
    preprocess, left_out = detector_preprocess(cfg, model)
    if left_out:
        print(f"warning: the test pipeline's {', '.join(left_out)} is not described in the JSON; "
              "tools/onnx_infer.py will not reproduce it", file=sys.stderr)
    preprocess["not_reproduced"] = left_out
    if backbone_only:
        report = export_backbone(model, cfg, target)
    else:
        report = export_detector(model, cfg, target, check_images)
    report["metadata"]["preprocess"] = preprocess
    report["metadata"]["classes"] = [] if backbone_only else class_names(cfg, model)
    report["metadata"]["source"] = {"config": config, "checkpoint": checkpoint}
    return report


def export_backbone(model: nn.Module, cfg, target: ExportTarget) -> dict:
    """The detector's backbone alone, checked at batch 2 of 200x328 and batch 1 at the traced size."""
    import torch

    backbone = model.backbone.eval()
    example = (synthetic_batch(model, cfg, [TRACE_SIZE])[0],)
    names = [f"stage{i + 1}" for i in backbone.out_indices]
    dynamic = {"input": {0: "N", 2: "H", 3: "W"}}
    run = target.write(backbone, example, ["input"], names, dynamic)
    gen = torch.Generator().manual_seed(1)
    errors = []
    for shape in [(2, 3, 200, 328), (1, 3, *example[0].shape[2:])]:
        x = torch.randn(*shape, generator=gen)
        outs = run({"input": x.numpy()})
        with torch.no_grad():
            refs = backbone(x)
        errors.append(max(rel_err(o, r.numpy()) for o, r in zip(outs, refs)))
    err = max(errors)
    failures = [f"backbone outputs differ by {err:.2e} relative (> {BACKBONE_TOL})"] if err > BACKBONE_TOL else []
    line = (f"check ({target.runtime_name} vs eager, batch 2 at 200x328 and batch 1 at "
            f"{example[0].shape[2]}x{example[0].shape[3]}): max relative error {err:.2e}")
    metadata = base_metadata(target.format, target.exporter, "backbone", type(backbone).__name__)
    metadata.update({
        "inputs": [tensor_spec("input", ["N", 3, "H", "W"], "float32", "normalised images (any size from 29 px)")],
        "outputs": [tensor_spec(n, ["N", c, f"H/{s}", f"W/{s}"], "float32", f"stride-{s} features")
                    for n, c, s in zip(names, backbone.out_channels, backbone.out_strides)],
        "check": {"max_relative_error": err},
    })
    return {"metadata": metadata, "check_lines": [line], "failures": failures}


def export_detector(model: nn.Module, cfg, target: ExportTarget, check_images: Sequence[str] = ()) -> dict:
    """The whole detector, checked against MMDetection's ``predict`` on a batch of ``check_images``
    (default: two synthetic pictures of other sizes than the traced one)."""
    import numpy as np
    import torch

    from .config import prepared_batch, test_settings
    from .runtime import read_bgr_image

    graph = exportable_detector(model)
    example = synthetic_batch(model, cfg, [TRACE_SIZE])
    names = output_names(graph)
    dynamic = {"input": {0: "N", 2: "H", 3: "W"}, "img_shape": {0: "N"}}
    run = target.write(graph, example, ["input", "img_shape"], names, dynamic)

    images = [read_bgr_image(p) for p in check_images] or [synthetic_image(500, 375, 2), synthetic_image(360, 560, 3)]
    inputs, img_shape, samples = prepared_batch(model, cfg, images)
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
    line = (f"check ({target.runtime_name} vs MMDetection's predict, batch of {len(refs)} at "
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

    metadata = base_metadata(target.format, target.exporter, "detector", type(model).__name__)
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


def synthetic_batch(model: nn.Module, cfg, sizes: Sequence[tuple[int, int]]):
    """(inputs, img_shape) of synthetic pictures of ``sizes`` (h, w) through the test pipeline."""
    from .config import prepared_batch

    inputs, shapes, _ = prepared_batch(model, cfg, [synthetic_image(h, w, i) for i, (h, w) in enumerate(sizes)])
    return inputs, shapes
