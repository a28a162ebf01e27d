"""Dense single-stage detectors (RetinaNet, FCOS) end to end in exportable form.

The backbone, neck and head run as MMDetection built them (their own modules and weights); what
follows the head is MMDetection's ``predict_by_feat`` for the whole batch at once: priors for the
feature maps' actual sizes, the ``nms_pre`` best (prior, class) scores per level, decoding
clipped to each image, the score factors (FCOS' centerness), and class-wise NMS as ONNX
NonMaxSuppression keeping ``max_per_img`` detections per image.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .boxes import (PAD_LABEL, best_per_image, decode_deltas, decode_distances, gather_rows, grid_anchors,
                    grid_points, nonempty)
from .ops import at_most, nms_settings, non_max_suppression

SUPPORTED_HEADS = ("RetinaHead", "FCOSHead")
NOT_A_SCORE = -1.0  # what a candidate that may not be kept scores in NMS (real scores are >= 0)


class SingleStageDetector(nn.Module):
    """(images (N, 3, H, W) as the data preprocessor makes them, img_shape (N, 2) int64: each
    image's (h, w) before padding) -> dets (N, K, 5) x1 y1 x2 y2 score, labels (N, K); boxes in
    the input's pixels, rows past an image's detections are zeros with label -1."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        head = detector.bbox_head
        if type(head).__name__ not in SUPPORTED_HEADS:
            raise NotImplementedError(f"no export for {type(head).__name__} heads (supported: "
                                      f"{', '.join(SUPPORTED_HEADS)} and the R-CNN family)")
        self.backbone, self.neck, self.head = detector.backbone, detector.neck, head
        cfg = head.test_cfg
        self.nms_pre = cfg.get("nms_pre", -1)
        self.score_thr = float(cfg.get("score_thr", 0.0))
        self.iou_threshold, self.max_per_img, self.drop_empty = nms_settings(cfg, type(head).__name__)
        generator = head.prior_generator
        self.anchors = hasattr(generator, "base_anchors")
        self.strides = [tuple(float(s) for s in stride) for stride in generator.strides]
        self.base_anchors = list(generator.base_anchors) if self.anchors else None
        self.point_offset = float(getattr(generator, "offset", 0.0))
        coder = type(head.bbox_coder).__name__
        if coder not in ("DeltaXYWHBBoxCoder", "DistancePointBBoxCoder"):
            raise NotImplementedError(f"no export for {coder}")
        self.use_sigmoid = bool(head.use_sigmoid_cls)
        self.num_classes = head.num_classes

    def forward(self, images: Tensor, img_shape: Tensor) -> tuple[Tensor, Tensor]:
        outs = self.head(self.neck(self.backbone(images)))
        factors = outs[2] if len(outs) > 2 else [None] * len(outs[0])
        img_hw = img_shape.to(images.dtype)[:, None, :]
        per_level = [self._candidates(level, cls, reg, factor, img_hw)
                     for level, (cls, reg, factor) in enumerate(zip(outs[0], outs[1], factors))]
        boxes, scores, labels, valid = (torch.cat(parts, dim=1) for parts in zip(*per_level))
        if self.drop_empty:
            valid = valid & nonempty(boxes)
        classes = torch.arange(self.num_classes, device=images.device)[None, :, None]
        nms_scores = torch.where(valid[:, None, :] & (labels[:, None, :] == classes), scores[:, None, :],
                                 scores.new_full((), NOT_A_SCORE))
        return keep_best(boxes, scores, nms_scores, self.iou_threshold, self.max_per_img)

    def _candidates(self, level: int, cls: Tensor, reg: Tensor, factor, img_hw: Tensor):
        """The nms_pre best (prior, class) pairs of one level: boxes, scores, labels, valid."""
        n = cls.shape[0]
        scores = cls.permute(0, 2, 3, 1).reshape(n, -1, self.head.cls_out_channels)
        scores = scores.sigmoid() if self.use_sigmoid else scores.softmax(-1)[..., :-1]
        flat = scores.reshape(n, -1)
        count = flat.shape[1] if self.nms_pre <= 0 else at_most(self.nms_pre, flat.shape[1])
        top, index = flat.topk(count, dim=1)
        prior = torch.div(index, self.num_classes, rounding_mode="floor")
        labels = index - prior * self.num_classes
        reg = gather_rows(reg.permute(0, 2, 3, 1).reshape(n, -1, 4), prior)
        if self.anchors:
            priors = grid_anchors(self.base_anchors[level].to(cls.device), self.strides[level], cls)
            boxes = decode_deltas(priors[prior], reg, self.head.bbox_coder, img_hw)
        else:
            priors = grid_points(self.point_offset, self.strides[level], cls)
            boxes = decode_distances(priors[prior], reg, img_hw)
        valid = top > self.score_thr
        if factor is not None:  # scores are thresholded first, then multiplied
            top = top * torch.gather(factor.permute(0, 2, 3, 1).reshape(n, -1).sigmoid(), 1, prior)
        return boxes, top, labels, valid


def keep_best(boxes: Tensor, scores: Tensor, nms_scores: Tensor, iou_threshold: float,
              max_per_img: int) -> tuple[Tensor, Tensor]:
    """Class-wise NMS of shared boxes (N, M, 4) with per-class scores (N, C, M) (NOT_A_SCORE where
    a box is not a candidate of a class), then the ``max_per_img`` best of every image:
    dets (N, K, 5) and labels (N, K), padded past an image's detections."""
    selected = non_max_suppression(boxes, nms_scores, max_per_img, iou_threshold, NOT_A_SCORE / 2)
    image, label, box = selected.unbind(1)
    picked_scores = scores[image, box]
    index, real = best_per_image(image, picked_scores, boxes.shape[0], max_per_img)
    picked_boxes = boxes[image, box]
    dets = torch.cat([picked_boxes[index], picked_scores[index][..., None]], dim=-1)
    dets = torch.where(real[..., None], dets, dets.new_zeros(()))
    labels = torch.where(real, label[index], label.new_full((), PAD_LABEL))
    return dets, labels
