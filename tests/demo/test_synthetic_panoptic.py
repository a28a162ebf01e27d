"""The synthetic COCO-panoptic set: its files agree with each other, MMDetection loads it, and
MMDetection's PQ on it is panopticapi's (a perfect prediction 100, an imperfect one exactly what
panopticapi.evaluation.pq_compute computes from the same prediction files)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from hieradet_mmdet.demo import synthetic_coco, synthetic_panoptic

SIZE = 96


@pytest.fixture(scope="module")
def panoptic_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("panoptic")
    paths = synthetic_panoptic.generate(str(root), num_train=2, num_val=4, size=SIZE, seed=2)
    return dict(root=root, **paths["val"])


def segment_ids(path) -> np.ndarray:
    rgb = cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1].astype(np.uint32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 ** 2 * rgb[..., 2]


def test_segment_maps_json_and_instances_agree(panoptic_set):
    panoptic = json.loads(open(panoptic_set["panoptic"]).read())
    instances = json.loads(open(panoptic_set["instances"]).read())
    categories = {c["id"]: c for c in panoptic["categories"]}
    assert {c["name"] for c in categories.values() if c["isthing"]} == set(synthetic_coco.CLASSES)
    assert {c["name"] for c in categories.values() if not c["isthing"]} == {"wall", "floor"}
    assert [i["id"] for i in instances["images"]] == [i["id"] for i in panoptic["images"]]
    for ann in panoptic["annotations"]:
        ids = segment_ids(f"{panoptic_set['segments']}/{ann['file_name']}")
        present, counts = np.unique(ids, return_counts=True)
        areas = dict(zip(present.tolist(), counts.tolist()))
        assert 0 in areas, "no void pixels around the things"
        assert set(areas) - {0} == {s["id"] for s in ann["segments_info"]}
        for seg in ann["segments_info"]:
            assert areas[seg["id"]] == seg["area"] and seg["iscrowd"] == 0
            ys, xs = np.nonzero(ids == seg["id"])
            assert seg["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        things = sorted((s["category_id"], s["area"]) for s in ann["segments_info"]
                        if categories[s["category_id"]]["isthing"])
        objects = sorted((a["category_id"], a["area"]) for a in instances["annotations"]
                         if a["image_id"] == ann["image_id"])
        assert things == objects and things
        assert {categories[s["category_id"]]["name"] for s in ann["segments_info"]} >= {"wall", "floor"}


def test_same_seed_same_bytes(tmp_path):
    a = synthetic_panoptic.generate(str(tmp_path / "a"), num_train=1, num_val=1, size=64, seed=4)
    b = synthetic_panoptic.generate(str(tmp_path / "b"), num_train=1, num_val=1, size=64, seed=4)
    for key in ("panoptic", "instances"):
        assert open(a["val"][key], "rb").read() == open(b["val"][key], "rb").read()
    for name in ("annotations/panoptic_val/000000.png", "val/000000.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_mmdetection_loads_things_stuff_and_void(panoptic_set):
    from mmdet.registry import DATASETS
    from mmdet.utils import register_all_modules

    register_all_modules()
    overrides = synthetic_panoptic.mmdet_dataset_overrides(str(panoptic_set["root"]), image_size=SIZE)
    dataset = DATASETS.build(overrides["val_dataloader.dataset"])
    assert len(dataset) == 4 and dataset.metainfo["stuff_classes"] == ("wall", "floor")
    sample = dataset[0]["data_samples"]
    labels = set(np.unique(sample.gt_sem_seg.sem_seg.numpy()).tolist())
    assert {3, 4, 255} <= labels <= {0, 1, 2, 3, 4, 255}  # stuff, void and the things' labels
    assert len(sample.gt_instances) >= 1 and int(sample.gt_instances.labels.max()) <= 2


def predictions(panoptic_set, perturb: bool) -> list[dict]:
    """Data samples whose panoptic prediction is the ground truth (MMDetection's encoding: label +
    instance * INSTANCE_OFFSET, void = number of classes), or the ground truth with a thing missed,
    a thing mislabelled and part of the floor called wall."""
    import torch
    from mmdet.evaluation.functional import INSTANCE_OFFSET

    panoptic = json.loads(open(panoptic_set["panoptic"]).read())
    label = {c["id"]: i for i, c in enumerate(panoptic["categories"])}
    void = len(synthetic_panoptic.CLASSES)
    samples = []
    for n, ann in enumerate(panoptic["annotations"]):
        ids = segment_ids(f"{panoptic_set['segments']}/{ann['file_name']}")
        pan = np.full(ids.shape, void, np.int64)
        for k, seg in enumerate(ann["segments_info"], start=1):
            lab = label[seg["category_id"]]
            thing = lab < len(synthetic_panoptic.THING_CLASSES)
            pan[ids == seg["id"]] = lab + (k * INSTANCE_OFFSET if thing else 0)
        if perturb and n == 0:
            pan[pan == pan.flat[np.argmax(pan >= INSTANCE_OFFSET)]] = void  # a thing missed
        if perturb and n == 1:
            first = pan.flat[np.argmax(pan >= INSTANCE_OFFSET)]
            pan[pan == first] = first - first % INSTANCE_OFFSET + (first % INSTANCE_OFFSET + 1) % 3  # mislabelled
        if perturb and n == 2:
            floor = pan == label[5]
            pan[floor & (np.arange(SIZE)[:, None] < SIZE * 0.8)] = label[4]  # floor up to 80% called wall
        samples.append(dict(img_id=ann["image_id"], img_path=f"{panoptic_set['root']}/val/{ann['file_name']}",
                            ori_shape=ids.shape, pred_panoptic_seg=dict(sem_seg=torch.from_numpy(pan)[None])))
    return samples


def mmdet_pq(panoptic_set, samples, outfile_prefix=None) -> dict:
    from mmdet.evaluation import CocoPanopticMetric

    metric = CocoPanopticMetric(ann_file=panoptic_set["panoptic"], seg_prefix=panoptic_set["segments"],
                                outfile_prefix=outfile_prefix, nproc=1)
    metric.dataset_meta = dict(classes=synthetic_panoptic.CLASSES, thing_classes=synthetic_panoptic.THING_CLASSES,
                               stuff_classes=synthetic_panoptic.STUFF_CLASSES)
    metric.process({}, samples)
    return metric.evaluate(len(samples))


KEYS = {"PQ": ("All", "pq"), "SQ": ("All", "sq"), "RQ": ("All", "rq"), "PQ_th": ("Things", "pq"),
        "SQ_th": ("Things", "sq"), "RQ_th": ("Things", "rq"), "PQ_st": ("Stuff", "pq"), "SQ_st": ("Stuff", "sq"),
        "RQ_st": ("Stuff", "rq")}


def test_perfect_prediction_scores_pq_100(panoptic_set):
    from panopticapi.evaluation import pq_compute

    metrics = mmdet_pq(panoptic_set, predictions(panoptic_set, perturb=False))
    assert {k.split("/")[-1] for k in metrics} == set(KEYS)
    assert all(v == pytest.approx(100.0, abs=1e-9) for v in metrics.values()), metrics
    truth = pq_compute(panoptic_set["panoptic"], panoptic_set["panoptic"], panoptic_set["segments"],
                       panoptic_set["segments"])
    assert truth["All"]["pq"] == 1.0 and truth["Things"]["n"] == 3 and truth["Stuff"]["n"] == 2


def test_mmdetections_pq_is_panopticapis_on_the_same_prediction_files(panoptic_set, tmp_path):
    from panopticapi.evaluation import pq_compute

    prefix = tmp_path / "pred"
    metrics = mmdet_pq(panoptic_set, predictions(panoptic_set, perturb=True), outfile_prefix=str(prefix))
    truth = pq_compute(panoptic_set["panoptic"], f"{prefix}.panoptic.json", panoptic_set["segments"],
                       f"{prefix}.panoptic")
    for key, (group, stat) in KEYS.items():
        assert metrics[f"coco_panoptic/{key}"] == pytest.approx(100 * truth[group][stat], abs=1e-9), key
    assert 40 < metrics["coco_panoptic/PQ"] < 99 and metrics["coco_panoptic/PQ_st"] < 99, metrics
