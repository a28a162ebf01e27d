"""Reading the test settings of MMDetection heads that an exported graph bakes in."""

from __future__ import annotations


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
