"""A small, deterministic COCO-format instance-segmentation dataset of coloured shapes.

Each image is a noisy, low-saturation texture with one to a few non-overlapping shapes drawn
on it: red circles, green rectangles (rotated) and blue triangles. Every shape is stored as a
COCO ``segmentation`` polygon, its ``bbox`` (the polygon's extent), ``area`` and
``iscrowd=0``. The shape's pixels are exactly the polygon rasterised by pycocotools (the
rasteriser COCO evaluation and MMDetection's ``PolygonMasks`` use), so the ground-truth masks
agree with the image pixel for pixel. The same ``seed`` always gives byte-identical files.

Layout written under ``OUT_DIR``::

    annotations/instances_train.json   train/000000.png ...
    annotations/instances_val.json     val/000000.png ...

Written by ``tools/synthetic_coco.py OUT_DIR --train 64 --val 16 --size 256 [--seed 0]`` and by
the demo. Needs numpy, OpenCV and pycocotools; :func:`mmdet_dataset_overrides` gives the config
pieces that point an MMDetection COCO config at it.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils

CATEGORIES = (
    dict(id=1, name="circle", supercategory="shape"),
    dict(id=2, name="rectangle", supercategory="shape"),
    dict(id=3, name="triangle", supercategory="shape"),
)
CLASSES = tuple(c["name"] for c in CATEGORIES)
# RGB; saturated and far from the grey background so a shape's pixels are unambiguous.
COLORS = {1: (225, 40, 40), 2: (40, 200, 60), 3: (50, 70, 230)}
PALETTE = [COLORS[c["id"]] for c in CATEGORIES]
SPLITS = ("train", "val")

_CIRCLE_VERTICES = 32


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Grey texture: a smooth low-frequency field plus pixel noise and a faint tint."""
    coarse = rng.uniform(70, 180, size=(max(2, size // 32), max(2, size // 32))).astype(np.float32)
    field = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    stripes = 12 * np.sin(np.arange(size, dtype=np.float32) * rng.uniform(0.1, 0.5) + rng.uniform(0, 6.3))
    field = field + (stripes[None, :] if rng.random() < 0.5 else stripes[:, None])
    img = field[..., None] + rng.normal(0, 12, size=(size, size, 3)).astype(np.float32)
    img += rng.uniform(-8, 8, size=3).astype(np.float32)
    return np.clip(img, 40, 200).astype(np.uint8)


def _shape_polygon(rng: np.random.Generator, cat_id: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Vertices (N, 2) of a shape of category ``cat_id`` centred at (cx, cy) with radius ~r."""
    if cat_id == 1:  # circle as a fine polygon, so the polygon *is* the drawn shape
        t = np.linspace(0, 2 * math.pi, _CIRCLE_VERTICES, endpoint=False)
        pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)
    elif cat_id == 2:  # rectangle, aspect 0.5..1, rotated
        a = rng.uniform(0, math.pi)
        w, h = r * 1.4, r * 1.4 * rng.uniform(0.5, 1.0)
        corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2 * 1.3
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        pts = corners @ rot.T + [cx, cy]
    else:  # triangle: three vertices on the circle, spread at least ~80 degrees apart
        base = rng.uniform(0, 2 * math.pi)
        t = base + np.array([0.0, rng.uniform(1.8, 2.4), rng.uniform(3.9, 4.5)])
        pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)
    return np.round(pts, 2)


def _polygon_mask(pts: np.ndarray, size: int) -> np.ndarray:
    """The polygon rasterised exactly as COCO tools (and MMDetection's PolygonMasks) do it."""
    rle = mask_utils.merge(mask_utils.frPyObjects([pts.reshape(-1).tolist()], size, size))
    return mask_utils.decode(rle).astype(bool)


def _fill(img: np.ndarray, mask: np.ndarray, color: Sequence[int], rng: np.random.Generator) -> None:
    shade = np.asarray(color, np.float32) + rng.normal(0, 6, size=(int(mask.sum()), 3)).astype(np.float32)
    img[mask] = np.clip(shade, 0, 255).astype(np.uint8)


def generate_image(rng: np.random.Generator, size: int, max_shapes: int = 3):
    """One image (H, W, 3 RGB uint8) and its annotations (without ids)."""
    img = _background(rng, size)
    anns, placed = [], []
    n_shapes = int(rng.integers(1, max_shapes + 1))
    for _ in range(n_shapes):
        for _attempt in range(50):
            r = rng.uniform(0.09, 0.2) * size
            cx, cy = rng.uniform(r + 2, size - r - 2, size=2)
            if all(math.hypot(cx - px, cy - py) > r + pr + 4 for px, py, pr in placed):
                break
        else:
            continue  # no room left; fewer shapes in this image
        placed.append((cx, cy, r))
        cat_id = int(rng.integers(1, len(CATEGORIES) + 1))
        pts = _shape_polygon(rng, cat_id, cx, cy, r)
        mask = _polygon_mask(pts, size)
        _fill(img, mask, COLORS[cat_id], rng)
        x0, y0 = pts.min(axis=0)
        x1, y1 = pts.max(axis=0)
        anns.append(dict(category_id=cat_id, segmentation=[[round(float(v), 2) for v in pts.reshape(-1)]],
                         bbox=[round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2),
                               round(float(y1 - y0), 2)],
                         area=float(mask.sum()), iscrowd=0))
    return img, anns


def generate_split(out_dir: str, split: str, num_images: int, size: int = 256, seed: int = 0,
                   max_shapes: int = 3) -> str:
    """Write ``num_images`` images of ``split`` and its annotation file; returns the json path."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    img_dir = os.path.join(out_dir, split)
    ann_dir = os.path.join(out_dir, "annotations")
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        # one independent stream per (seed, split, image): splits never share images
        rng = np.random.default_rng([seed, SPLITS.index(split), i])
        img, anns = generate_image(rng, size, max_shapes)
        file_name = f"{i:06d}.png"
        if not cv2.imwrite(os.path.join(img_dir, file_name), img[..., ::-1]):
            raise OSError(f"could not write {os.path.join(img_dir, file_name)}")
        image_id = i + 1
        images.append(dict(id=image_id, file_name=file_name, height=size, width=size))
        for ann in anns:
            annotations.append(dict(id=len(annotations) + 1, image_id=image_id, **ann))
    coco = dict(info=dict(description=f"hieradet-mmdet synthetic shapes ({split}, seed {seed})", version="1.0"),
                licenses=[], images=images, annotations=annotations, categories=list(CATEGORIES))
    path = os.path.join(ann_dir, f"instances_{split}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(coco, f)
    return path


def generate(out_dir: str, num_train: int = 64, num_val: int = 16, size: int = 256, seed: int = 0,
             max_shapes: int = 3) -> dict:
    """Write both splits; returns {'train': json path, 'val': json path}."""
    return generate_splits(generate_split, out_dir, num_train, num_val, size, seed, max_shapes)


def generate_splits(generate_split, out_dir: str, num_train: int, num_val: int, size: int, seed: int,
                    max_shapes: int) -> dict:
    """``generate_split`` for the train and the val split: {'train': ..., 'val': ...}."""
    if size < 32:
        raise ValueError(f"size must be at least 32 px, got {size}")
    return {split: generate_split(out_dir, split, n, size, seed, max_shapes)
            for split, n in (("train", num_train), ("val", num_val))}


def mmdet_dataset_overrides(data_root: str, with_mask: bool = True, image_size: Optional[int] = None) -> dict:
    """Config entries that point an MMDetection COCO config (CocoDataset + FastCocoMetric) here.

    Merge the result into a config (``cfg.merge_from_dict``); it sets the data root, annotation
    files, image folders, class names/palette and the evaluator's annotation file for the train,
    val and test loaders and evaluators (val and test both use the val split). With
    ``image_size`` the pipelines are replaced by ones that resize to that scale (and flip for
    training) instead of COCO's 1333x800.
    """
    data_root = os.path.abspath(data_root).rstrip("/") + "/"
    metainfo = dict(classes=CLASSES, palette=PALETTE)
    metrics = ["bbox", "segm"] if with_mask else ["bbox"]

    def dataset(split, pipeline):
        out = dict(data_root=data_root, metainfo=metainfo, ann_file=f"annotations/instances_{split}.json",
                   data_prefix=dict(img=f"{split}/"))
        if pipeline is not None:
            out["pipeline"] = pipeline
        return out

    def evaluator():
        return dict(type="FastCocoMetric", ann_file=f"{data_root}annotations/instances_val.json", metric=metrics,
                    format_only=False)

    train_pipeline, test_pipeline = resized_pipelines(
        image_size, dict(type="LoadAnnotations", with_bbox=True, with_mask=with_mask))
    return {
        "train_dataloader.dataset": dataset("train", train_pipeline),
        "val_dataloader.dataset": dataset("val", test_pipeline),
        "test_dataloader.dataset": dataset("val", test_pipeline),
        "val_evaluator": evaluator(),
        "test_evaluator": evaluator(),
    }


def resized_pipelines(image_size: Optional[int], annotations: dict) -> tuple:
    """(train, test) pipelines that load ``annotations`` and resize to ``image_size`` (the train one
    also flips); (None, None) without a size, to keep the config's own."""
    if image_size is None:
        return None, None
    scale = (int(image_size), int(image_size))
    train = [dict(type="LoadImageFromFile"), annotations, dict(type="Resize", scale=scale, keep_ratio=True),
             dict(type="RandomFlip", prob=0.5), dict(type="PackDetInputs")]
    test = [dict(type="LoadImageFromFile"), dict(type="Resize", scale=scale, keep_ratio=True), dict(annotations),
            dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor"))]
    return train, test
