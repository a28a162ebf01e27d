"""A small, deterministic COCO-panoptic dataset: the demo's shapes as things, wall and floor as stuff.

Each image is one of :mod:`.synthetic_coco`'s (a textured background with coloured circles,
rectangles and triangles, the things), split at a random horizon into a bluish "wall" above and
a brownish "floor" below (the stuff classes). The pixels of a 2-pixel ring around every thing are
unlabelled (void, segment id 0), as COCO leaves object boundaries. Written as COCO panoptic
annotations: a PNG segment map per image (segment id = R + 256 G + 256² B) and the panoptic JSON
(``segments_info`` with ``category_id``, ``area``, ``bbox``, ``iscrowd``; categories with
``isthing``), plus the matching instance JSON of the things (polygons, as :mod:`.synthetic_coco`
writes them; same image ids) for box and mask AP. The same ``seed`` gives byte-identical files.

Layout written under ``OUT_DIR``::

    annotations/panoptic_train.json  annotations/panoptic_train/000000.png ...
    annotations/instances_train.json train/000000.png ...
    (the same for val)

Written by ``tools/synthetic_coco.py OUT_DIR --panoptic`` and :func:`generate`;
:func:`mmdet_dataset_overrides` points MMDetection's panoptic configs (CocoPanopticDataset,
CocoPanopticMetric and the instance metric beside it) at it.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import cv2
import numpy as np

from . import synthetic_coco

THING_CATEGORIES = tuple(dict(c, isthing=1) for c in synthetic_coco.CATEGORIES)
STUFF_CATEGORIES = (dict(id=4, name="wall", supercategory="stuff", isthing=0),
                    dict(id=5, name="floor", supercategory="stuff", isthing=0))
CATEGORIES = THING_CATEGORIES + STUFF_CATEGORIES
THING_CLASSES = synthetic_coco.CLASSES
STUFF_CLASSES = tuple(c["name"] for c in STUFF_CATEGORIES)
CLASSES = THING_CLASSES + STUFF_CLASSES
STUFF_COLORS = {4: (120, 140, 190), 5: (150, 120, 90)}  # RGB, as the tints below
PALETTE = synthetic_coco.PALETTE + [STUFF_COLORS[c["id"]] for c in STUFF_CATEGORIES]
STUFF_TINT = {4: (-15, 0, 30), 5: (25, 5, -20)}
VOID_RING = 2  # px of unlabelled pixels around each thing
STUFF_SEGMENT_IDS = {4: 1001, 5: 1002}  # things are segments 1..n


def id2rgb(segment_ids: np.ndarray) -> np.ndarray:
    """COCO panoptic's colour encoding of segment ids (R + 256 G + 256² B), (H, W, 3) uint8 RGB."""
    ids = segment_ids.astype(np.uint32)
    return np.stack([ids % 256, ids // 256 % 256, ids // 256 ** 2 % 256], axis=-1).astype(np.uint8)


def _mask_bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def generate_image(rng: np.random.Generator, size: int, max_shapes: int = 3):
    """(RGB image, segment-id map, segments_info, thing annotations without ids)."""
    img, things = synthetic_coco.generate_image(rng, size, max_shapes)
    segments = np.zeros((size, size), np.uint32)
    thing_masks = [synthetic_coco._polygon_mask(np.asarray(a["segmentation"][0]).reshape(-1, 2), size)
                   for a in things]
    covered = np.zeros((size, size), bool)
    for mask in thing_masks:
        covered |= mask
    ring = cv2.dilate(covered.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=VOID_RING).astype(bool)
    horizon = int(rng.integers(size // 4, 3 * size // 4))
    rows = np.arange(size)[:, None]
    stuff_regions = {4: (rows < horizon) & ~covered, 5: (rows >= horizon) & ~covered}
    for cat_id, region in stuff_regions.items():
        shifted = img[region].astype(np.int16) + np.asarray(STUFF_TINT[cat_id], np.int16)
        img[region] = np.clip(shifted, 0, 255).astype(np.uint8)
    infos = []
    for k, (ann, mask) in enumerate(zip(things, thing_masks), start=1):
        segments[mask] = k
        infos.append(dict(id=k, category_id=ann["category_id"], iscrowd=0, bbox=_mask_bbox(mask),
                          area=int(mask.sum())))
    for cat_id, region in stuff_regions.items():
        labelled = region & ~ring
        if labelled.any():
            segments[labelled] = STUFF_SEGMENT_IDS[cat_id]
            infos.append(dict(id=STUFF_SEGMENT_IDS[cat_id], category_id=cat_id, iscrowd=0,
                              bbox=_mask_bbox(labelled), area=int(labelled.sum())))
    return img, segments, infos, things


def _write_png(path: str, rgb: np.ndarray) -> None:
    if not cv2.imwrite(path, rgb[..., ::-1]):
        raise OSError(f"could not write {path}")


def _write_json(path: str, content: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(content, f)
    os.replace(tmp, path)


def generate_split(out_dir: str, split: str, num_images: int, size: int = 256, seed: int = 0,
                   max_shapes: int = 3) -> dict:
    """Write ``split``'s images, segment maps and both JSON files; returns their paths."""
    if split not in synthetic_coco.SPLITS:
        raise ValueError(f"split must be one of {synthetic_coco.SPLITS}, got {split!r}")
    img_dir = os.path.join(out_dir, split)
    ann_dir = os.path.join(out_dir, "annotations")
    seg_dir = os.path.join(ann_dir, f"panoptic_{split}")
    for folder in (img_dir, seg_dir):
        os.makedirs(folder, exist_ok=True)
    images, panoptic, instances = [], [], []
    for i in range(num_images):
        # independent of the instance set's streams: one per (seed, panoptic split, image)
        rng = np.random.default_rng([seed, 10 + synthetic_coco.SPLITS.index(split), i])
        img, segments, infos, things = generate_image(rng, size, max_shapes)
        file_name = f"{i:06d}.png"
        _write_png(os.path.join(img_dir, file_name), img)
        _write_png(os.path.join(seg_dir, file_name), id2rgb(segments))
        image_id = i + 1
        images.append(dict(id=image_id, file_name=file_name, height=size, width=size))
        panoptic.append(dict(image_id=image_id, file_name=file_name, segments_info=infos))
        for ann in things:
            instances.append(dict(id=len(instances) + 1, image_id=image_id, **ann))
    info = dict(description=f"hieradet-mmdet synthetic shapes, panoptic ({split}, seed {seed})", version="1.0")
    paths = dict(panoptic=os.path.join(ann_dir, f"panoptic_{split}.json"), segments=seg_dir,
                 instances=os.path.join(ann_dir, f"instances_{split}.json"), images=img_dir)
    _write_json(paths["panoptic"], dict(info=info, licenses=[], images=images, annotations=panoptic,
                                        categories=[dict(c) for c in CATEGORIES]))
    _write_json(paths["instances"], dict(info=info, licenses=[], images=images, annotations=instances,
                                         categories=[dict(c) for c in synthetic_coco.CATEGORIES]))
    return paths


def generate(out_dir: str, num_train: int = 64, num_val: int = 16, size: int = 256, seed: int = 0,
             max_shapes: int = 3) -> dict:
    """Write both splits; returns {'train': paths, 'val': paths} (see :func:`generate_split`)."""
    return synthetic_coco.generate_splits(generate_split, out_dir, num_train, num_val, size, seed, max_shapes)


def mmdet_dataset_overrides(data_root: str, image_size: Optional[int] = None) -> dict:
    """Config entries that point an MMDetection panoptic config here: the three loaders'
    CocoPanopticDataset (images, panoptic JSON, segment maps, class names of things and stuff),
    and as evaluators CocoPanopticMetric (PQ, SQ, RQ) with FastCocoMetric (box and mask AP of the
    things) beside it, as MMDetection's Mask2Former panoptic configs have them. With
    ``image_size`` the pipelines resize to that scale (and flip for training) instead."""
    data_root = os.path.abspath(data_root).rstrip("/") + "/"
    metainfo = dict(classes=CLASSES, thing_classes=THING_CLASSES, stuff_classes=STUFF_CLASSES, palette=PALETTE)

    def dataset(split, pipeline):
        out = dict(type="CocoPanopticDataset", data_root=data_root, metainfo=metainfo,
                   ann_file=f"annotations/panoptic_{split}.json",
                   data_prefix=dict(img=f"{split}/", seg=f"annotations/panoptic_{split}/"))
        if pipeline is not None:
            out["pipeline"] = pipeline
        return out

    evaluators = [dict(type="CocoPanopticMetric", ann_file=f"{data_root}annotations/panoptic_val.json",
                       seg_prefix=f"{data_root}annotations/panoptic_val/", nproc=1),
                  dict(type="FastCocoMetric", ann_file=f"{data_root}annotations/instances_val.json",
                       metric=["bbox", "segm"])]
    train_pipeline, test_pipeline = synthetic_coco.resized_pipelines(
        image_size, dict(type="LoadPanopticAnnotations", with_bbox=True, with_mask=True, with_seg=True))
    return {
        "train_dataloader.dataset": dataset("train", train_pipeline),
        "val_dataloader.dataset": dataset("val", test_pipeline),
        "test_dataloader.dataset": dataset("val", test_pipeline),
        "val_evaluator": evaluators,
        "test_evaluator": [dict(e) for e in evaluators],
    }
