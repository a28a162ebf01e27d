"""The two operations of a detector graph that are not plain tensor maths, as standard ONNX ops.

* :func:`non_max_suppression` is ONNX ``NonMaxSuppression``: boxes (B, M, 4), scores (B, C, M)
  -> the selected (batch, class, box) triples, per batch and class greedily by falling score.
  It is a registered op (``hieradet::non_max_suppression``) with an eager kernel (torchvision's
  NMS), so the TorchScript exporter, ``torch.export`` and the dynamo exporter see one node with a
  data-dependent number of rows, which both ONNX exporters write as ``NonMaxSuppression``.
* RoIAlign is torchvision's ``roi_align``, which both exporters write as ONNX ``RoiAlign`` (opset
  16: ``half_pixel``, i.e. ``aligned=True``); its numbers are mmcv's RoIAlign's.

And :func:`at_most`, ``min(limit, n)`` for a size ``n`` that stays symbolic in every exporter, and
:func:`nms_settings`, the NMS settings of an MMDetection head's test_cfg that the graph bakes in.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from ..torch_compat import export_unsupported

if export_unsupported():  # the graphs below need torch.library.custom_op and the newer exporters
    raise ImportError(export_unsupported())

OPSET = 17  # RoiAlign's half_pixel mode needs 16


@torch.library.custom_op("hieradet::non_max_suppression", mutates_args=())
def non_max_suppression(boxes: Tensor, scores: Tensor, max_per_class: int, iou_threshold: float,
                        score_threshold: float) -> Tensor:
    """ONNX NonMaxSuppression: for every batch b and class c, the boxes ``boxes[b]`` whose
    ``scores[b, c]`` exceed ``score_threshold``, greedily by falling score, dropping each box that
    overlaps a kept one by IoU > ``iou_threshold``, at most ``max_per_class`` of them.
    Returns (K, 3) int64 rows (b, c, box index), ordered by b, c and then score."""
    torchvision = _torchvision()
    selected = []
    for b in range(boxes.shape[0]):
        for c in range(scores.shape[1]):
            candidates = torch.nonzero(scores[b, c] > score_threshold).squeeze(1)
            keep = candidates[torchvision.ops.nms(boxes[b, candidates], scores[b, c, candidates], iou_threshold)]
            keep = keep[:max_per_class]
            selected.append(torch.stack([torch.full_like(keep, b), torch.full_like(keep, c), keep], dim=1))
    if not selected:
        return torch.zeros((0, 3), dtype=torch.long, device=boxes.device)
    return torch.cat(selected)


@non_max_suppression.register_fake
def _(boxes, scores, max_per_class, iou_threshold, score_threshold):
    count = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((count, 3), dtype=torch.long)


def _nms_symbolic(g, boxes, scores, max_per_class, iou_threshold, score_threshold):
    from torch.onnx import symbolic_helper

    max_per_class = symbolic_helper._get_const(max_per_class, "i", "max_per_class")
    iou_threshold = symbolic_helper._get_const(iou_threshold, "f", "iou_threshold")
    score_threshold = symbolic_helper._get_const(score_threshold, "f", "score_threshold")
    return g.op("NonMaxSuppression", boxes, scores,
                g.op("Constant", value_t=torch.tensor([max_per_class], dtype=torch.long)),
                g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float)),
                g.op("Constant", value_t=torch.tensor([score_threshold], dtype=torch.float)))


torch.onnx.register_custom_op_symbolic("hieradet::non_max_suppression", _nms_symbolic, 11)


def dynamo_translations() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``."""
    from onnxscript import opset18 as op

    def nms(boxes, scores, max_per_class: int, iou_threshold: float, score_threshold: float):
        return op.NonMaxSuppression(boxes, scores, op.Constant(value_ints=[max_per_class]),
                                    op.Constant(value_floats=[iou_threshold]),
                                    op.Constant(value_floats=[score_threshold]))

    return {torch.ops.hieradet.non_max_suppression.default: nms}


def roi_align(features: Tensor, rois: Tensor, size: tuple[int, int], spatial_scale: float,
              sampling_ratio: int, aligned: bool) -> Tensor:
    """RoIAlign (average) of (R, 5) rois (batch index, x1, y1, x2, y2) on one feature map."""
    return _torchvision().ops.roi_align(features, rois, size, spatial_scale, sampling_ratio, aligned)


def _torchvision():
    try:
        import torchvision
    except ImportError as err:
        raise ImportError("exporting detectors needs torchvision (NMS and RoIAlign kernels): install the "
                          "torchvision release that matches your torch") from err
    return torchvision


def at_most(limit: int, n: Union[int, Tensor, torch.SymInt]):
    """min(limit, n) for a size n: a Python or symbolic int, or the 0-d tensor the TorchScript
    exporter hands out for sizes (a Python ``min`` would freeze it at the traced value)."""
    if isinstance(n, Tensor):
        return torch.clamp(n, max=limit)
    return torch.sym_min(limit, n)


def nms_settings(cfg, where: str) -> tuple[float, int, bool]:
    """(IoU threshold, max_per_img, whether boxes without width or height are dropped before NMS)
    of a test_cfg whose NMS an ONNX NonMaxSuppression can do."""
    nms = cfg.get("nms") or {}
    kind = nms.get("type", "nms")
    if kind not in ("nms", "mmcv.nms"):
        raise NotImplementedError(f"{where}: test_cfg.nms type {kind!r} has no standard ONNX op; only 'nms' exports")
    if nms.get("class_agnostic", False):
        raise NotImplementedError(f"{where}: class-agnostic NMS is not supported for export")
    min_size = cfg.get("min_bbox_size", -1)
    if min_size > 0:
        raise NotImplementedError(f"{where}: min_bbox_size={min_size} is measured in original-image pixels, "
                                  "which the exported graph does not see; use 0")
    return float(nms["iou_threshold"]), int(cfg.get("max_per_img", 100)), min_size >= 0
