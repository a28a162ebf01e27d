"""The R-CNN family (Faster R-CNN, Mask R-CNN, Cascade (Mask) R-CNN) end to end in exportable form.

Backbone, neck, RPN head, RoI extractors' settings and the bbox / mask heads are MMDetection's
own modules and weights; this file holds what MMDetection does around them at test time, for the
whole batch at once: proposals (the ``nms_pre`` best anchors per level, decoded and clipped to
each image, NMS per level, ``max_per_img`` per image), multi-level RoIAlign (every roi pooled on
every level, the one of its level kept), the bbox head's class-wise NMS, the cascade's refinement
and score averaging, and the mask head's per-detection mask of its class.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .boxes import PAD_LABEL, best_per_image, decode_deltas, gather_rows, grid_anchors, nonempty, roi_levels
from .ops import at_most, nms_settings, non_max_suppression, roi_align
from .single_stage import NOT_A_SCORE, keep_best

SUPPORTED_ROI_HEADS = ("StandardRoIHead", "CascadeRoIHead")


class TwoStageDetector(nn.Module):
    """(images (N, 3, H, W), img_shape (N, 2) int64 (h, w) before padding) -> dets (N, K, 5),
    labels (N, K) and, with a mask head, masks (N, K, M, M): each detection's mask probabilities
    of its class inside its box (MMDetection pastes and thresholds them in the original image)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        roi_head = detector.roi_head
        if type(roi_head).__name__ not in SUPPORTED_ROI_HEADS:
            raise NotImplementedError(f"no export for {type(roi_head).__name__} (supported: "
                                      f"{', '.join(SUPPORTED_ROI_HEADS)})")
        self.backbone, self.neck, self.rpn_head, self.roi_head = (detector.backbone, detector.neck,
                                                                  detector.rpn_head, roi_head)
        self.cascade = hasattr(roi_head, "num_stages")
        self.num_stages = roi_head.num_stages if self.cascade else 1
        self.with_mask = bool(roi_head.with_mask)

        rpn_cfg = self.rpn_head.test_cfg
        self.rpn_nms_pre = rpn_cfg.get("nms_pre", -1)
        self.rpn_iou, self.rpn_max, self.rpn_drop_empty = nms_settings(rpn_cfg, "rpn")
        generator = self.rpn_head.prior_generator
        self.rpn_strides = [tuple(float(s) for s in stride) for stride in generator.strides]
        self.rpn_anchors = list(generator.base_anchors)

        rcnn_cfg = roi_head.test_cfg
        self.score_thr = float(rcnn_cfg.get("score_thr", 0.0))
        self.iou_threshold, self.max_per_img, _ = nms_settings(rcnn_cfg, "rcnn")
        last = self._stage(roi_head.bbox_head)
        if getattr(last, "custom_cls_channels", False) or not last.with_cls or not last.with_reg:
            raise NotImplementedError(f"no export for {type(last).__name__} without a softmax classifier and a regressor")
        self.num_classes = last.num_classes

    def _stage(self, modules, stage: int = -1):
        return modules[stage] if self.cascade else modules

    def forward(self, images: Tensor, img_shape: Tensor):
        x = self.neck(self.backbone(images))
        img_hw = img_shape.to(images.dtype)
        proposals, real = self.proposals(x, img_hw)
        n, p = proposals.shape[0], proposals.shape[1]
        batch = torch.arange(n, device=images.device)[:, None].expand(n, p).reshape(-1, 1).to(images.dtype)
        rois = torch.cat([batch, proposals.reshape(-1, 4)], dim=1)
        roi_hw = img_hw[:, None, :].expand(n, p, 2).reshape(-1, 2)

        cls_score, bbox_pred, rois = self.refine(x, rois, roi_hw)
        head = self._stage(self.roi_head.bbox_head)
        scores = cls_score.softmax(dim=-1)[:, :-1]
        deltas = bbox_pred.unflatten(1, (-1, 4))  # (R, classes or 1, 4)
        boxes = decode_deltas(rois[:, None, 1:], deltas, head.bbox_coder, roi_hw[:, None, :])
        boxes = boxes.expand(-1, self.num_classes, 4)
        valid = real.reshape(-1, 1) & (scores > self.score_thr)

        # NMS per image and class, the classes' own boxes: (N * C) "batches" of p boxes. Reshapes
        # leave the count that may be 0 as -1: a 0 in an ONNX Reshape means "keep this axis".
        c = self.num_classes
        nms_boxes = boxes.reshape(n, -1, c, 4).permute(0, 2, 1, 3).reshape(n * c, -1, 4)
        nms_scores = torch.where(valid, scores, scores.new_full((), NOT_A_SCORE))
        nms_scores = nms_scores.reshape(n, -1, c).permute(0, 2, 1).reshape(n * c, 1, -1)
        selected = non_max_suppression(nms_boxes, nms_scores, self.max_per_img, self.iou_threshold, NOT_A_SCORE / 2)
        image = torch.div(selected[:, 0], c, rounding_mode="floor")
        label = selected[:, 0] - image * c
        roi = image * p + selected[:, 2]
        picked_scores = scores[roi, label]
        index, keep = best_per_image(image, picked_scores, n, self.max_per_img)
        det_boxes = boxes[roi, label][index]
        dets = torch.cat([det_boxes, picked_scores[index][..., None]], dim=-1)
        dets = torch.where(keep[..., None], dets, dets.new_zeros(()))
        labels = torch.where(keep, label[index], label.new_full((), PAD_LABEL))
        if not self.with_mask:
            return dets, labels
        return dets, labels, self.masks(x, dets[..., :4], labels, keep)

    def proposals(self, x: tuple[Tensor, ...], img_hw: Tensor) -> tuple[Tensor, Tensor]:
        """RPNHead.predict: (N, P, 4) proposals per image, and which of them are real."""
        cls_scores, bbox_preds = self.rpn_head(x)
        boxes, scores, levels = [], [], []
        for level, (cls, reg) in enumerate(zip(cls_scores, bbox_preds)):
            n = cls.shape[0]
            score = cls.permute(0, 2, 3, 1).reshape(n, -1, self.rpn_head.cls_out_channels)
            score = score.sigmoid()[..., 0] if self.rpn_head.use_sigmoid_cls else score.softmax(-1)[..., 0]
            count = score.shape[1] if self.rpn_nms_pre <= 0 else at_most(self.rpn_nms_pre, score.shape[1])
            top, index = score.topk(count, dim=1)
            priors = grid_anchors(self.rpn_anchors[level].to(cls.device), self.rpn_strides[level], cls)
            deltas = gather_rows(reg.permute(0, 2, 3, 1).reshape(n, -1, 4), index)
            boxes.append(decode_deltas(priors[index], deltas, self.rpn_head.bbox_coder, img_hw[:, None, :]))
            scores.append(top)
            levels.append(torch.full_like(index[0], level))
        boxes, scores, levels = torch.cat(boxes, dim=1), torch.cat(scores, dim=1), torch.cat(levels)
        valid = nonempty(boxes) if self.rpn_drop_empty else torch.ones_like(scores, dtype=torch.bool)
        per_level = levels[None, :] == torch.arange(len(cls_scores), device=levels.device)[:, None]
        nms_scores = torch.where(valid[:, None, :] & per_level[None], scores[:, None, :], scores.new_full((), NOT_A_SCORE))
        dets, labels = keep_best(boxes, scores, nms_scores, self.rpn_iou, self.rpn_max)
        return dets[..., :4], labels != PAD_LABEL

    def refine(self, x, rois: Tensor, roi_hw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The bbox head's class scores and box deltas for ``rois``; through a cascade, each stage
        regresses the rois of the next by its best class, and the scores are the stages' mean."""
        stage_scores = []
        for stage in range(self.num_stages):
            extractor = self._stage(self.roi_head.bbox_roi_extractor, stage)
            head = self._stage(self.roi_head.bbox_head, stage)
            cls_score, bbox_pred = head(pool_rois(extractor, x, rois))
            stage_scores.append(cls_score)
            if stage < self.num_stages - 1:
                deltas = bbox_pred.unflatten(1, (-1, 4))
                if not head.reg_class_agnostic:
                    label = cls_score[:, :-1].argmax(dim=1)
                    deltas = torch.gather(deltas, 1, label[:, None, None].expand(-1, 1, 4))
                refined = decode_deltas(rois[:, 1:], deltas[:, 0], head.bbox_coder, roi_hw)
                rois = torch.cat([rois[:, :1], refined], dim=1)
        if not self.cascade:
            return cls_score, bbox_pred, rois
        return sum(stage_scores) / float(len(stage_scores)), bbox_pred, rois

    def masks(self, x, boxes: Tensor, labels: Tensor, keep: Tensor) -> Tensor:
        """(N, K, M, M) mask probabilities of each detection's class (a cascade's stages averaged)."""
        n, k = boxes.shape[0], boxes.shape[1]
        batch = torch.arange(n, device=boxes.device)[:, None].expand(n, k).reshape(-1, 1).to(boxes.dtype)
        rois = torch.cat([batch, boxes.reshape(-1, 4)], dim=1)
        label = labels.clamp(min=0).reshape(-1)
        probs = []
        for stage in range(self.num_stages):
            extractor = self._stage(self.roi_head.mask_roi_extractor, stage)  # a cascade's shared ones too
            head = self._stage(self.roi_head.mask_head, stage)
            logits = head(pool_rois(extractor, x, rois))
            if head.class_agnostic:
                logits = logits[:, :1]
            else:
                logits = torch.gather(logits, 1, label[:, None, None, None].expand(-1, 1, *logits.shape[2:]))
            probs.append(logits[:, 0].sigmoid())
        masks = probs[0] if len(probs) == 1 else torch.stack(probs).mean(dim=0)
        masks = masks.reshape(n, -1, *masks.shape[1:])
        return torch.where(keep[..., None, None], masks, masks.new_zeros(()))


def pool_rois(extractor, features: tuple[Tensor, ...], rois: Tensor) -> Tensor:
    """SingleRoIExtractor: each (R, 5) roi RoIAligned on the level its scale maps to."""
    features = features[:extractor.num_inputs]
    levels = roi_levels(rois, extractor.finest_scale, len(features))
    pooled = None
    for level, (feature, layer) in enumerate(zip(features, extractor.roi_layers)):
        if getattr(layer, "pool_mode", "avg") != "avg":
            raise NotImplementedError("only average RoIAlign exports (ONNX RoiAlign's max mode differs)")
        out = roi_align(feature, rois, layer.output_size, layer.spatial_scale, layer.sampling_ratio, layer.aligned)
        pooled = out if pooled is None else torch.where((levels == level)[:, None, None, None], out, pooled)
    return pooled
