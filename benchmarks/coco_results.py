"""A COCO-val-sized ground truth and result set, generated, for timing and checking COCO evaluation.

The ground truth is shaped like COCO val2017: 5,000 images of COCO's sizes, 80 categories under
COCO's ids, about 7 objects an image (some images empty), object sizes spread over COCO's small
(< 32²), medium and large ranges in about its proportions, polygons for ordinary objects and
uncompressed RLE for about 1% crowd regions. The results are shaped like a detector's: up to 100
detections an image (most images 100), each a jittered copy of an object, with the right category
most of the time, or a false positive somewhere in the image; a box and a compressed-RLE mask each,
as MMDetection's CocoMetric writes them. Some images have no detections. The same arguments give
the same files.

    gt, bbox, segm = write_result_set(out_dir, num_images=5000)   # three JSON paths

Needs numpy and pycocotools only.
"""

from __future__ import annotations

import json
import math
import os
import numpy as np
from pycocotools import mask as mask_utils

# COCO's 80 category ids (1..90 with its 10 gaps).
COCO_CATEGORY_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))
IMAGE_SIZES = ((480, 640), (427, 640), (640, 480), (640, 427), (375, 500), (500, 375), (424, 640), (512, 640))
# Every 100 images: one without annotations (COCO val2017 has 48 of 5,000) and one without
# detections, at fixed places so that even a small set has both.
EMPTY_GT_EVERY, EMPTY_GT_AT, NO_DETECTIONS_AT = 100, 7, 42
CROWD = 0.01          # share of crowd regions among objects
MAX_DETS = 100
GENERATOR_VERSION = 1  # in the folder name: a changed generator never reuses an old set


def _polygon(rng: np.random.Generator, cx: float, cy: float, w: float, h: float) -> np.ndarray:
    """A star-shaped blob with 8-24 vertices inside the w x h box centred at (cx, cy)."""
    n = int(rng.integers(8, 25))
    t = np.sort(rng.uniform(0, 2 * math.pi, n))
    radius = rng.uniform(0.7, 1.0, n)
    return np.stack([cx + 0.5 * w * radius * np.cos(t), cy + 0.5 * h * radius * np.sin(t)], axis=1)


def _object_size(rng: np.random.Generator, height: int, width: int) -> tuple[float, float]:
    """Width and height: sqrt(area) log-uniform between 6 px and most of the image (COCO's mix of
    small, medium and large), aspect ratio log-normal."""
    side = math.exp(rng.uniform(math.log(6), math.log(0.8 * min(height, width))))
    aspect = math.exp(rng.normal(0, 0.5))
    return min(side * math.sqrt(aspect), width - 2.0), min(side / math.sqrt(aspect), height - 2.0)


def _clip(poly: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.stack([poly[:, 0].clip(0, width - 1), poly[:, 1].clip(0, height - 1)], axis=1).round(2)


def _bbox(poly: np.ndarray) -> list[float]:
    x0, y0 = poly.min(axis=0)
    x1, y1 = poly.max(axis=0)
    return [round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2), round(float(y1 - y0), 2)]


def _rles(polys: list, height: int, width: int) -> list[dict]:
    return mask_utils.frPyObjects([p.reshape(-1).tolist() for p in polys], height, width)


def _uncompressed(rle: dict) -> dict:
    """COCO's crowd form: run lengths as a list, column-major, starting with a run of zeros."""
    flat = mask_utils.decode(rle).reshape(-1, order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"counts": counts, "size": list(rle["size"])}


def generate_image(rng: np.random.Generator, image_id: int) -> tuple[dict, list, list, list]:
    """One image: its entry, its annotations (without ids), its bbox and its segm results."""
    height, width = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
    image = dict(id=image_id, file_name=f"{image_id:012d}.jpg", height=height, width=width)
    empty = image_id % EMPTY_GT_EVERY == EMPTY_GT_AT
    n_objects = 0 if empty else int(min(rng.geometric(1 / 7.3), 60))
    polys, anns = [], []
    for _ in range(n_objects):
        w, h = _object_size(rng, height, width)
        cx, cy = rng.uniform(w / 2, width - w / 2), rng.uniform(h / 2, height - h / 2)
        polys.append((_clip(_polygon(rng, cx, cy, w, h), height, width), (cx, cy, w, h)))
    rles = _rles([p for p, _ in polys], height, width) if polys else []
    for (poly, _), rle in zip(polys, rles):
        crowd = rng.random() < CROWD
        anns.append(dict(category_id=int(rng.choice(COCO_CATEGORY_IDS)), iscrowd=int(crowd),
                         area=float(mask_utils.area(rle)), bbox=_bbox(poly),
                         segmentation=_uncompressed(rle) if crowd else [poly.reshape(-1).tolist()]))

    if image_id % EMPTY_GT_EVERY == NO_DETECTIONS_AT:
        return image, anns, [], []
    n_dets = MAX_DETS if rng.random() < 0.6 else int(rng.integers(1, MAX_DETS + 1))
    det_polys, det_meta = [], []
    for k in range(n_dets):
        if anns and k < 3 * len(anns) and rng.random() < 0.8:  # a detection of an object
            i = int(rng.integers(len(anns)))
            cx, cy, w, h = polys[i][1]
            jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
            cx, cy, w, h = cx + jitter[0], cy + jitter[1], max(2.0, w + jitter[2]), max(2.0, h + jitter[3])
            category = anns[i]["category_id"] if rng.random() < 0.85 else int(rng.choice(COCO_CATEGORY_IDS))
            score = float(rng.beta(5, 2))
        else:  # a false positive
            w, h = _object_size(rng, height, width)
            cx, cy = rng.uniform(w / 2, width - w / 2), rng.uniform(h / 2, height - h / 2)
            category, score = int(rng.choice(COCO_CATEGORY_IDS)), float(rng.beta(1.2, 6))
        det_polys.append(_clip(_polygon(rng, cx, cy, w, h), height, width))
        det_meta.append((category, round(score, 5)))
    bbox_results, segm_results = [], []
    for poly, rle, (category, score) in zip(det_polys, _rles(det_polys, height, width), det_meta):
        bbox_results.append(dict(image_id=image_id, category_id=category, bbox=_bbox(poly), score=score))
        segm_results.append(dict(image_id=image_id, category_id=category, score=score,
                                 segmentation={"size": rle["size"], "counts": rle["counts"].decode()}))
    return image, anns, bbox_results, segm_results


def generate(num_images: int = 5000, seed: int = 0) -> tuple[dict, list, list]:
    """(ground truth dict, bbox results, segm results) for ``num_images`` images."""
    images, annotations, bbox_results, segm_results = [], [], [], []
    for i in range(num_images):
        image, anns, boxes, masks = generate_image(np.random.default_rng([seed, i]), i + 1)
        images.append(image)
        for ann in anns:
            annotations.append(dict(id=len(annotations) + 1, image_id=image["id"], **ann))
        bbox_results += boxes
        segm_results += masks
    categories = [dict(id=c, name=f"category_{c}", supercategory="object") for c in COCO_CATEGORY_IDS]
    gt = dict(info=dict(description=f"hieradet-mmdet generated COCO-val-like set ({num_images} images, seed {seed})"),
              licenses=[], images=images, annotations=annotations, categories=categories)
    return gt, bbox_results, segm_results


def write_result_set(out_dir: str, num_images: int = 5000, seed: int = 0,
                     reuse: bool = True) -> tuple[str, str, str]:
    """Write (or, with ``reuse``, find already written) instances.json, bbox.json and segm.json for
    ``num_images`` images under ``out_dir``/v{GENERATOR_VERSION}-n{num_images}-s{seed}; returns their paths."""
    folder = os.path.join(out_dir, f"v{GENERATOR_VERSION}-n{num_images}-s{seed}")
    paths = tuple(os.path.join(folder, name) for name in ("instances.json", "bbox.json", "segm.json"))
    if reuse and all(os.path.isfile(p) for p in paths):
        return paths
    os.makedirs(folder, exist_ok=True)
    for path, content in zip(paths, generate(num_images, seed)):
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(content, f)
        os.replace(tmp, path)  # a reader never sees a half-written set
    return paths


def describe(gt: dict, bbox_results: list) -> dict:
    """Counts that show the set is COCO-like: images, objects by size, crowd, empty images, detections."""
    areas = np.array([a["area"] for a in gt["annotations"] if not a["iscrowd"]])
    with_gt = {a["image_id"] for a in gt["annotations"]}
    per_image = np.bincount([r["image_id"] for r in bbox_results], minlength=len(gt["images"]) + 1)[1:]
    return dict(images=len(gt["images"]), objects=len(gt["annotations"]),
                crowd=sum(a["iscrowd"] for a in gt["annotations"]),
                empty_images=len(gt["images"]) - len(with_gt),
                small=int((areas < 32 ** 2).sum()), medium=int(((areas >= 32 ** 2) & (areas < 96 ** 2)).sum()),
                large=int((areas >= 96 ** 2).sum()), detections=len(bbox_results),
                images_without_detections=int((per_image == 0).sum()), max_detections=int(per_image.max()))
