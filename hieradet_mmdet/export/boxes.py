"""Box maths of MMDetection's heads for a whole batch, in exportable form: priors for feature maps
of any size, the box coders' decoding with per-image clipping, and keeping the best detections of
every image. Written to give MMDetection's float32 numbers operation by operation."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .ops import at_most

PAD_LABEL = -1  # the label of the rows that pad an image's detections to the batch's count


def grid_anchors(base_anchors: Tensor, stride: tuple[float, float], feature: Tensor) -> Tensor:
    """The anchors of one level for a feature map (N, *, h, w): (h * w * A, 4), ordered by row,
    column, then base anchor, i.e. as a head's (N, A * k, h, w) output flattened channels-last."""
    h, w = feature.shape[-2], feature.shape[-1]
    xs = torch.arange(w, dtype=torch.float32, device=feature.device) * stride[0]
    ys = torch.arange(h, dtype=torch.float32, device=feature.device) * stride[1]
    shifts = _grid(xs, ys, h, w)
    return (base_anchors[None] + torch.cat([shifts, shifts], dim=-1)[:, None]).reshape(-1, 4)


def grid_points(offset: float, stride: tuple[float, float], feature: Tensor) -> Tensor:
    """Point priors (h * w, 2) of one level: (column + offset, row + offset) times the stride."""
    h, w = feature.shape[-2], feature.shape[-1]
    xs = (torch.arange(w, device=feature.device) + offset) * stride[0]
    ys = (torch.arange(h, device=feature.device) + offset) * stride[1]
    return _grid(xs.float(), ys.float(), h, w)


def _grid(xs: Tensor, ys: Tensor, h, w) -> Tensor:
    return torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1).reshape(-1, 2)


def decode_deltas(priors: Tensor, deltas: Tensor, coder, img_hw: Tensor) -> Tensor:
    """DeltaXYWHBBoxCoder.decode: priors and deltas (..., 4) -> boxes (..., 4), clipped to the
    image's (h, w) (``img_hw`` broadcastable to (..., 2)) when the coder clips."""
    if getattr(coder, "add_ctr_clamp", False):
        raise NotImplementedError("DeltaXYWHBBoxCoder(add_ctr_clamp=True) is not supported for export")
    means = deltas.new_tensor(coder.means)
    stds = deltas.new_tensor(coder.stds)
    deltas = deltas * stds + means
    centre = (priors[..., :2] + priors[..., 2:]) * 0.5
    size = priors[..., 2:] - priors[..., :2]
    max_ratio = abs(math.log(16 / 1000))  # MMDetection's default wh_ratio_clip
    centre = centre + size * deltas[..., :2]
    size = size * deltas[..., 2:].clamp(min=-max_ratio, max=max_ratio).exp()
    boxes = torch.cat([centre - size * 0.5, centre + size * 0.5], dim=-1)
    return clip(boxes, img_hw) if coder.clip_border else boxes


def decode_distances(points: Tensor, distances: Tensor, img_hw: Tensor) -> Tensor:
    """DistancePointBBoxCoder.decode: points (..., 2) and (left, top, right, bottom) distances
    -> boxes, clipped to the image."""
    boxes = torch.cat([points - distances[..., :2], points + distances[..., 2:]], dim=-1)
    return clip(boxes, img_hw)


def clip(boxes: Tensor, img_hw: Tensor) -> Tensor:
    """Clamp x to [0, w] and y to [0, h]; ``img_hw`` (..., 2) float (h, w) broadcasts over boxes."""
    corners = boxes.clamp(min=0).unflatten(-1, (2, 2))  # (..., [x1 y1; x2 y2])
    return torch.minimum(corners, img_hw.flip(-1).unsqueeze(-2)).flatten(-2)


def nonempty(boxes: Tensor) -> Tensor:
    """Boxes (..., 4) with a positive width and height (MMDetection's min_bbox_size=0)."""
    return (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])


def roi_levels(rois: Tensor, finest_scale: float, num_levels: int) -> Tensor:
    """SingleRoIExtractor.map_roi_levels: the level of each (R, 5) roi by its scale."""
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    return torch.floor(torch.log2(scale / finest_scale + 1e-6)).clamp(min=0, max=num_levels - 1).long()


def best_per_image(image: Tensor, scores: Tensor, num_images, limit: int) -> tuple[Tensor, Tensor]:
    """Rows of flat detections (``image`` index and ``scores``, each (K,)) regrouped per image:
    (N, k) indices into K, best first, k = min(limit, K), and which of them are real (the rest
    pad images with fewer detections)."""
    owner = image[None, :] == torch.arange(num_images, device=image.device)[:, None]
    table = torch.where(owner, scores[None, :], scores.new_full((), -1.0))
    top, index = table.topk(at_most(limit, table.shape[1]), dim=1)
    return index, top > -1.0


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x (N, M, ...) -> (N, k, ...) rows ``index`` (N, k) of every image."""
    shape = index.shape + x.shape[2:]
    flat_index = index.reshape(index.shape[0], -1, *([1] * (x.dim() - 2)))
    return torch.gather(x, 1, flat_index.expand(shape))
