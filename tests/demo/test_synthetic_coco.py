"""The synthetic COCO generator: valid COCO files, masks equal to the drawn pixels, AP 1.0 for GT."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os

import numpy as np
import pytest

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from hieradet_mmdet.demo import synthetic_coco

SIZE = 128


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    synthetic_coco.generate(str(out), num_train=6, num_val=4, size=SIZE, seed=3)
    return out


def _quiet_coco(path):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _digest(folder):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            with open(os.path.join(dirpath, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def test_layout_and_coco_fields(dataset):
    for split, n in (("train", 6), ("val", 4)):
        coco = _quiet_coco(dataset / "annotations" / f"instances_{split}.json")
        assert len(coco.getImgIds()) == n
        assert sorted(c["name"] for c in coco.loadCats(coco.getCatIds())) == sorted(synthetic_coco.CLASSES)
        assert len(coco.getAnnIds()) >= n  # at least one shape per image
        for img in coco.loadImgs(coco.getImgIds()):
            assert (dataset / split / img["file_name"]).is_file()
            assert img["height"] == img["width"] == SIZE
        for ann in coco.loadAnns(coco.getAnnIds()):
            assert ann["iscrowd"] == 0
            assert isinstance(ann["segmentation"], list) and len(ann["segmentation"][0]) >= 6
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= SIZE and y + h <= SIZE
            assert ann["area"] == coco.annToMask(ann).sum() > 0


def test_masks_agree_with_drawn_pixels(dataset):
    import cv2

    coco = _quiet_coco(dataset / "annotations" / "instances_train.json")
    for img_info in coco.loadImgs(coco.getImgIds()):
        rgb = cv2.imread(str(dataset / "train" / img_info["file_name"]))[..., ::-1].astype(np.float32)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_info["id"]))
        union = np.zeros(rgb.shape[:2], bool)
        for ann in anns:
            mask = coco.annToMask(ann).astype(bool)
            color = np.array(synthetic_coco.COLORS[ann["category_id"]], np.float32)
            painted = np.linalg.norm(rgb - color, axis=-1) < 50
            # every mask pixel carries the category's colour; outside the shape nothing nearby does
            assert painted[mask].all(), f"{img_info['file_name']}: mask pixels not drawn in the class colour"
            x, y, w, h = ann["bbox"]
            box = np.zeros_like(mask)
            box[int(y):int(np.ceil(y + h)) + 1, int(x):int(np.ceil(x + w)) + 1] = True
            assert not (painted & box & ~mask).any(), f"{img_info['file_name']}: coloured pixels outside the mask"
            ys, xs = np.nonzero(mask)
            assert x - 1 <= xs.min() and xs.max() <= x + w + 1 and y - 1 <= ys.min() and ys.max() <= y + h + 1
            union |= mask
        # the background never looks like any shape colour
        for color in synthetic_coco.COLORS.values():
            assert not (np.linalg.norm(rgb - np.array(color, np.float32), axis=-1) < 50)[~union].any()


def test_ground_truth_as_predictions_scores_ap_one(dataset):
    from pycocotools import mask as mask_utils

    gt = _quiet_coco(dataset / "annotations" / "instances_val.json")
    bbox_dets, segm_dets = [], []
    for ann in gt.loadAnns(gt.getAnnIds()):
        common = dict(image_id=ann["image_id"], category_id=ann["category_id"], score=1.0)
        bbox_dets.append(dict(common, bbox=ann["bbox"]))
        rle = gt.annToRLE(ann)
        rle["counts"] = rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"]
        segm_dets.append(dict(common, segmentation=rle))
        assert mask_utils.area(rle) == ann["area"]
    for iou_type, dets in (("bbox", bbox_dets), ("segm", segm_dets)):
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(gt, gt.loadRes(dets), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        assert ev.stats[0] == pytest.approx(1.0), f"{iou_type} AP {ev.stats[0]}"  # AP@[.5:.95]
        assert ev.stats[1] == pytest.approx(1.0)  # AP@.5


def test_deterministic_and_seed_dependent(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    synthetic_coco.generate(str(a), 3, 2, size=64, seed=7)
    synthetic_coco.generate(str(b), 3, 2, size=64, seed=7)
    synthetic_coco.generate(str(c), 3, 2, size=64, seed=8)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_mmdet_overrides_point_at_the_files(dataset):
    over = synthetic_coco.mmdet_dataset_overrides(str(dataset))
    ds = over["train_dataloader.dataset"]
    assert os.path.isfile(os.path.join(ds["data_root"], ds["ann_file"]))
    assert os.path.isdir(os.path.join(ds["data_root"], ds["data_prefix"]["img"]))
    assert ds["metainfo"]["classes"] == synthetic_coco.CLASSES
    assert os.path.isfile(over["test_evaluator"]["ann_file"])
    assert over["test_evaluator"]["metric"] == ["bbox", "segm"]
