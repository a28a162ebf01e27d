"""Looking at what a HieraDet backbone sees: one picture per stage, next to the input.

Each stage's feature map (C channels at stride 4, 8, 16, 32) is projected onto its first three
principal components, shown as RGB and upsampled to the input size: regions the backbone
considers alike get alike colours. Used by ``tools/visualize_features.py`` and the demo.
"""

from __future__ import annotations

import os
import os.path as osp
import sys
from typing import Optional, Sequence

import numpy as np

# birder's RGB statistics, which the published HieraDet-S weights were trained with (the same
# normalisation configs/_base_/hieradet_s.py gives MMDetection's data preprocessor).
RGB_MEAN = (0.5191, 0.5306, 0.4877)
RGB_STD = (0.2316, 0.2304, 0.2588)


def read_rgb_image(path: str) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3), decoded by OpenCV."""
    import cv2

    if not osp.isfile(path):
        raise FileNotFoundError(f"image {path} does not exist")
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"cannot decode image {path}")
    return img[..., ::-1].copy()


def prepare_input(rgb: np.ndarray, size: int = 512, multiple: int = 32):
    """Resize so the long side is ~``size`` and both sides are multiples of ``multiple``;
    returns (resized uint8 RGB, normalised 1x3xHxW float tensor)."""
    import cv2
    import torch

    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    nh = max(multiple, int(round(h * scale / multiple)) * multiple)
    nw = max(multiple, int(round(w * scale / multiple)) * multiple)
    resized = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    x = torch.from_numpy(resized).float().div(255).permute(2, 0, 1)
    x = (x - torch.tensor(RGB_MEAN)[:, None, None]) / torch.tensor(RGB_STD)[:, None, None]
    return resized, x[None]


def pca_rgb(feature, out_hw: Sequence[int]) -> np.ndarray:
    """(C, h, w) tensor -> (H, W, 3) uint8: first three principal components as colours."""
    import cv2
    import torch

    c, h, w = feature.shape
    flat = feature.reshape(c, -1).T.double()
    flat = flat - flat.mean(0, keepdim=True)
    # principal directions from the small C x C covariance; sign fixed so pictures are reproducible
    cov = flat.T @ flat / max(1, flat.shape[0] - 1)
    _, vecs = torch.linalg.eigh(cov)
    comps = vecs[:, -3:].flip(1)
    comps = comps * torch.sign(comps.sum(0, keepdim=True) + 1e-12)
    proj = (flat @ comps).float().numpy()
    if proj.shape[1] < 3:
        proj = np.pad(proj, ((0, 0), (0, 3 - proj.shape[1])))
    lo, hi = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
    proj = np.clip((proj - lo) / np.maximum(hi - lo, 1e-8), 0, 1)
    img = (proj.reshape(h, w, 3) * 255).astype(np.uint8)
    return cv2.resize(img, (int(out_hw[1]), int(out_hw[0])), interpolation=cv2.INTER_NEAREST)


def _label(img: np.ndarray, text: str) -> np.ndarray:
    import cv2

    bar = np.full((24, img.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, text, (4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, img], axis=0)


def build_backbone(arch: str = "small", checkpoint: Optional[str] = None):
    """A HieraDet trunk in eval mode, with ``checkpoint``'s weights when given."""
    from hieradet_mmdet.models import HieraDet

    model = HieraDet(arch, out_indices=(0, 1, 2, 3)).eval()
    if checkpoint:
        from hieradet_mmdet.weights import load_backbone_weights

        load_backbone_weights(model, checkpoint)
    else:
        print("warning: no --checkpoint given: the backbone has RANDOM weights, so the pictures show the "
              "input's structure as seen by an untrained network, not learned features", file=sys.stderr)
    return model


def feature_pictures(model, rgb: np.ndarray, size: int = 512):
    """Returns (resized input RGB, [per-stage PCA RGB pictures at the input size])."""
    import torch

    resized, x = prepare_input(rgb, size)
    with torch.no_grad():
        feats = model(x)
    return resized, [pca_rgb(f[0], resized.shape[:2]) for f in feats]


def write_pictures(out_dir: str, resized: np.ndarray, pictures: Sequence[np.ndarray],
                   strides: Sequence[int] = (4, 8, 16, 32)) -> list[str]:
    """stage{k}.png (input | stage k) for every stage and overview.png; returns the paths."""
    import cv2

    os.makedirs(out_dir, exist_ok=True)
    gap = np.full((resized.shape[0] + 24, 6, 3), 255, np.uint8)
    inp = _label(resized, "input")
    paths, panels = [], [inp]
    for k, (pic, stride) in enumerate(zip(pictures, strides), start=1):
        panel = _label(pic, f"stage {k} (stride {stride}) PCA")
        path = osp.join(out_dir, f"stage{k}.png")
        cv2.imwrite(path, np.concatenate([inp, gap, panel], axis=1)[..., ::-1])
        paths.append(path)
        panels += [gap, panel]
    path = osp.join(out_dir, "overview.png")
    cv2.imwrite(path, np.concatenate(panels, axis=1)[..., ::-1])
    paths.append(path)
    return paths
