"""Query-based detectors (DINO, Deformable DETR, plain or two-stage, with or without box
refinement) end to end in exportable form.

The backbone, neck, transformer and head run as MMDetection built them (their own modules,
weights and ``forward_transformer``). MMDetection's transformer reads the feature levels' sizes
out of a ``spatial_shapes`` tensor in Python loops, which a traced graph would freeze at the
traced size; while the graph runs, the few places that do so take the sizes from the feature maps
instead (a traced graph keeps those symbolic):

- the padding masks of each level come from ``img_shape`` (MMDetection's ``pre_transformer``
  builds them from the data samples), resized to each level as MMDetection resizes them;
- the encoder's reference points and the two-stage proposals (``gen_encoder_output_proposals``)
  are laid out per level from the feature maps' sizes;
- multi-scale deformable attention samples each level with ``grid_sample`` (ONNX GridSample,
  opset 16 on) in place of mmcv's ``multi_scale_deformable_attn_pytorch``, the same computation.

What follows the head is ``DETRHead``'s ``predict_by_feat`` for the whole batch: sigmoid class
scores of the last decoder layer, the ``max_per_img`` best (query, class) pairs of each image,
boxes from (cx, cy, w, h) to corners in the image's pixels, clipped to it. No score threshold and
no NMS: every image has ``max_per_img`` detections, as with MMDetection.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import mmengine_adapter as mmengine_api

SUPPORTED_DETECTORS = ("DINO", "DeformableDETR")


class QueryBasedDetector(nn.Module):
    """(images (N, 3, H, W) as the data preprocessor makes them, img_shape (N, 2) int64: each
    image's (h, w) before padding) -> dets (N, K, 5) x1 y1 x2 y2 score, labels (N, K); boxes in
    the input's pixels, K = the head's ``max_per_img``."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        if type(detector).__name__ not in SUPPORTED_DETECTORS:
            raise NotImplementedError(f"no export for {type(detector).__name__} detectors")
        head = detector.bbox_head
        if not head.loss_cls.use_sigmoid:
            raise NotImplementedError("no export for DETR heads with a softmax classifier")
        self.detector = detector
        self.num_classes = head.num_classes
        self.max_per_img = int(head.test_cfg.get("max_per_img", detector.num_queries))

    def forward(self, images: Tensor, img_shape: Tensor) -> tuple[Tensor, Tensor]:
        detector = self.detector
        feats = detector.extract_feat(images)
        with self._symbolic_level_sizes(images, img_shape, feats):
            head_inputs = detector.forward_transformer(feats, None)
        all_scores, all_boxes = detector.bbox_head(**head_inputs)
        return self._detections(all_scores[-1], all_boxes[-1], img_shape.to(images.dtype))

    def _detections(self, cls_score: Tensor, bbox_pred: Tensor, img_hw: Tensor) -> tuple[Tensor, Tensor]:
        scores, indexes = cls_score.sigmoid().flatten(1).topk(self.max_per_img, dim=1)
        labels = indexes % self.num_classes
        boxes = torch.gather(bbox_pred, 1, (indexes // self.num_classes)[..., None].expand(-1, -1, 4))
        centre, size = boxes[..., :2], boxes[..., 2:]
        wh = img_hw.flip(-1)[:, None, :]  # (w, h)
        corners = torch.cat([(centre - 0.5 * size) * wh, (centre + 0.5 * size) * wh], dim=-1)
        corners = torch.minimum(corners.clamp(min=0), torch.cat([wh, wh], dim=-1))
        return torch.cat([corners, scores[..., None]], dim=-1), labels

    @contextmanager
    def _symbolic_level_sizes(self, images: Tensor, img_shape: Tensor, feats):
        """MMDetection's transformer with each level's size taken from its feature map (module
        docstring), for the duration of one forward."""
        import mmcv.ops.multi_scale_deform_attn as msda

        detector = self.detector
        sizes = [(f.shape[2], f.shape[3]) for f in feats]
        original = msda.multi_scale_deformable_attn_pytorch
        mmengine_api.override(detector, "pre_transformer",
                              lambda mlvl_feats, samples=None: self._pre_transformer(mlvl_feats, images, img_shape))
        mmengine_api.override(detector.encoder, "get_encoder_reference_points",
                              lambda spatial_shapes, valid_ratios, device: encoder_reference_points(sizes,
                                                                                                   valid_ratios))
        mmengine_api.override(detector, "gen_encoder_output_proposals",
                              lambda memory, memory_mask, spatial_shapes: self._proposals(memory, memory_mask, sizes))
        msda.multi_scale_deformable_attn_pytorch = lambda value, shapes, locations, weights: deformable_attention(
            value, sizes, locations, weights)
        try:
            yield
        finally:
            msda.multi_scale_deformable_attn_pytorch = original
            for owner, name in ((detector, "pre_transformer"), (detector.encoder, "get_encoder_reference_points"),
                                (detector, "gen_encoder_output_proposals")):
                mmengine_api.restore(owner, name)

    def _pre_transformer(self, feats, images: Tensor, img_shape: Tensor):
        """DeformableDETR.pre_transformer with the padding masks made from ``img_shape``."""
        detector = self.detector
        ys = torch.arange(images.shape[2], device=images.device)
        xs = torch.arange(images.shape[3], device=images.device)
        padded = ((ys[None, :, None] >= img_shape[:, 0, None, None])
                  | (xs[None, None, :] >= img_shape[:, 1, None, None])).to(images.dtype)
        flat, pos_flat, mask_flat, shapes, masks = [], [], [], [], []
        for level, feat in enumerate(feats):
            mask = F.interpolate(padded[None], size=feat.shape[-2:])[0].to(torch.bool)
            pos = detector.positional_encoding(mask)
            n, c = feat.shape[0], feat.shape[1]
            flat.append(feat.view(n, c, -1).permute(0, 2, 1))
            pos_flat.append(pos.view(n, c, -1).permute(0, 2, 1) + detector.level_embed[level].view(1, 1, -1))
            mask_flat.append(mask.flatten(1))
            shapes.append(torch._shape_as_tensor(feat)[2:].to(feat.device))
            masks.append(mask)
        mask_flat = torch.cat(mask_flat, 1)
        spatial_shapes = torch.cat(shapes).view(-1, 2)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([detector.get_valid_ratio(m) for m in masks], 1)
        encoder_inputs = dict(feat=torch.cat(flat, 1), feat_mask=mask_flat, feat_pos=torch.cat(pos_flat, 1),
                              spatial_shapes=spatial_shapes, level_start_index=level_start_index,
                              valid_ratios=valid_ratios)
        decoder_inputs = dict(memory_mask=mask_flat, spatial_shapes=spatial_shapes,
                              level_start_index=level_start_index, valid_ratios=valid_ratios)
        return encoder_inputs, decoder_inputs

    def _proposals(self, memory: Tensor, memory_mask: Tensor, sizes) -> tuple[Tensor, Tensor]:
        """DeformableDETR.gen_encoder_output_proposals, laid out from the levels' sizes."""
        n = memory.shape[0]
        proposals, start = [], 0
        for level, (h, w) in enumerate(sizes):
            mask = memory_mask[:, start:start + h * w].view(n, h, w, 1)
            valid_h = torch.sum(~mask[:, :, 0, 0], 1).unsqueeze(-1)
            valid_w = torch.sum(~mask[:, 0, :, 0], 1).unsqueeze(-1)
            scale = torch.cat([valid_w, valid_h], 1).view(n, 1, 1, 2)
            grid = level_grid(h, w, 0.0, memory.device)
            grid = (grid.unsqueeze(0).expand(n, -1, -1, -1) + 0.5) / scale
            wh = torch.ones_like(grid) * 0.05 * (2.0 ** level)
            proposals.append(torch.cat((grid, wh), -1).view(n, -1, 4))
            start = start + h * w
        proposals = torch.cat(proposals, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).sum(-1, keepdim=True) == proposals.shape[-1]
        proposals = torch.log(proposals / (1 - proposals))
        proposals = proposals.masked_fill(memory_mask.unsqueeze(-1), float("inf"))
        proposals = proposals.masked_fill(~valid, float("inf"))
        output = memory.masked_fill(memory_mask.unsqueeze(-1), float(0))
        output = output.masked_fill(~valid, float(0))
        detector = self.detector
        return detector.memory_trans_norm(detector.memory_trans_fc(output)), proposals


def level_grid(h, w, offset: float, device) -> Tensor:
    """(h, w, 2) of (column + offset, row + offset), float32 (MMDetection's linspace grids)."""
    ys = torch.arange(h, device=device).to(torch.float32) + offset
    xs = torch.arange(w, device=device).to(torch.float32) + offset
    return torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1)


def encoder_reference_points(sizes, valid_ratios: Tensor) -> Tensor:
    """DeformableDetrTransformerEncoder.get_encoder_reference_points from the levels' sizes."""
    points = []
    for level, (h, w) in enumerate(sizes):
        grid = level_grid(h, w, 0.5, valid_ratios.device)
        ref_y = grid[..., 1].reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)
        ref_x = grid[..., 0].reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
        points.append(torch.stack((ref_x, ref_y), -1))
    return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]


def deformable_attention(value: Tensor, sizes, locations: Tensor, weights: Tensor) -> Tensor:
    """Multi-scale deformable attention: ``value`` (N, sum(h * w), heads, C), ``locations`` (N, Q,
    heads, levels, points, 2) in [0, 1], ``weights`` (N, Q, heads, levels, points) -> (N, Q,
    heads * C); each level sampled bilinearly (zeros outside, corners not aligned)."""
    n, _, heads, channels = value.shape
    queries, levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
    grids = 2 * locations - 1
    sampled, start = [], 0
    for level, (h, w) in enumerate(sizes):
        level_value = value[:, start:start + h * w].flatten(2).transpose(1, 2).reshape(n * heads, channels, h, w)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # (N * heads, Q, points, 2)
        sampled.append(F.grid_sample(level_value, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
        start = start + h * w
    weights = weights.transpose(1, 2).reshape(n * heads, 1, queries, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(n, heads * channels, queries)
    return out.transpose(1, 2).contiguous()
