"""The exportable form of an MMDetection detector, by family."""

from __future__ import annotations

from torch import nn

from .single_stage import SingleStageDetector
from .two_stage import TwoStageDetector


def exportable_detector(detector: nn.Module) -> nn.Module:
    """RetinaNet / FCOS -> :class:`SingleStageDetector`; Faster / Mask / Cascade (Mask) R-CNN ->
    :class:`TwoStageDetector`. Both share the detector's modules and weights; in eval mode."""
    if hasattr(detector, "roi_head") and hasattr(detector, "rpn_head"):
        return TwoStageDetector(detector).eval()
    if hasattr(detector, "bbox_head"):
        return SingleStageDetector(detector).eval()
    raise NotImplementedError(f"no export for {type(detector).__name__} detectors (supported: RetinaNet, FCOS, "
                              "Faster R-CNN, Mask R-CNN, Cascade (Mask) R-CNN)")


def output_names(module: nn.Module) -> list[str]:
    with_mask = isinstance(module, TwoStageDetector) and module.with_mask
    return ["dets", "labels", "masks"] if with_mask else ["dets", "labels"]
