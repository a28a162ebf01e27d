"""FastCocoMetric and the faster COCO evaluators against pycocotools and MMDetection's CocoMetric,
on generated COCO-like result sets (benchmarks.coco_results: COCO's image and object
sizes, crowd regions, images without objects and without detections, up to 100 detections an
image); malformed files; progress; result files written whole. The 5,000-image comparison and
the timings are in the benchmark (tools/benchmark.py --coco-eval)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from helpers import ROOT, fail_text, run_tool

from benchmarks.coco_results import describe, write_result_set
from hieradet_mmdet.engine.coco_metric import (CocoFileError, FastCocoMetric, evaluate, evaluate_files, ground_truth,
                                               read_json, resolve_backend, stats_of)

FASTER = ("hotcoco", "faster_coco_eval")
TOLERANCE = 1e-4  # every one of the 12 stats (the bound; measured: equal to 1e-16)


@pytest.fixture(scope="module")
def large_set(tmp_path_factory):
    """300 images, about 24,000 detections: big enough for every area range and crowd case."""
    gt, bbox, segm = write_result_set(str(tmp_path_factory.mktemp("coco_large")), num_images=300, seed=3)
    return dict(gt=gt, bbox=bbox, segm=segm, dataset=read_json(gt, "annotation"))


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    gt, bbox, segm = write_result_set(str(tmp_path_factory.mktemp("coco_small")), num_images=60, seed=5)
    return dict(gt=gt, bbox=bbox, segm=segm, dataset=read_json(gt, "annotation"))


@pytest.fixture(scope="module")
def pycocotools_stats(large_set):
    cache = {}

    def stats(iou_type):
        if iou_type not in cache:
            results = read_json(large_set[iou_type], "result")
            cache[iou_type] = stats_of(evaluate(ground_truth(large_set["dataset"], "pycocotools"), results, iou_type,
                                                "pycocotools"))
        return cache[iou_type]
    return stats


def test_generated_result_set_is_coco_like(large_set):
    facts = describe(large_set["dataset"], read_json(large_set["bbox"], "result"))
    assert facts["images"] == 300 and facts["crowd"] > 0 and facts["empty_images"] >= 3
    assert facts["images_without_detections"] >= 3 and facts["max_detections"] == 100
    non_crowd = facts["small"] + facts["medium"] + facts["large"]
    for size in ("small", "medium", "large"):  # COCO val: 41% / 34% / 24%
        assert 0.15 < facts[size] / non_crowd < 0.6, facts
    assert 50 < facts["detections"] / facts["images"] <= 100, facts


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("backend", FASTER)
def test_faster_backends_give_pycocotools_stats(large_set, pycocotools_stats, backend, iou_type):
    reference = pycocotools_stats(iou_type)
    assert 0.05 < reference[0] < 0.95 and all(0.0 <= v <= 1.0 for v in reference), reference  # not degenerate
    results = read_json(large_set[iou_type], "result")
    stats = stats_of(evaluate(ground_truth(large_set["dataset"], backend), results, iou_type, backend))
    diff = np.abs(np.array(stats) - np.array(reference))
    assert diff.max() <= TOLERANCE, (backend, iou_type, diff.tolist())


def predictions(dataset: dict, bbox_results: list, segm_results: list) -> list[dict]:
    """The result set as a detector's data samples (labels index the categories, boxes x1y1x2y2,
    masks as RLE), one per image, images without detections included."""
    import torch

    label = {c["id"]: i for i, c in enumerate(dataset["categories"])}
    per_image = {img["id"]: [] for img in dataset["images"]}
    for box, mask in zip(bbox_results, segm_results):
        per_image[box["image_id"]].append((box, mask))
    samples = []
    for img in dataset["images"]:
        dets = per_image[img["id"]]
        boxes = [[b["bbox"][0], b["bbox"][1], b["bbox"][0] + b["bbox"][2], b["bbox"][1] + b["bbox"][3]]
                 for b, _ in dets]
        samples.append(dict(img_id=img["id"], ori_shape=(img["height"], img["width"]), pred_instances=dict(
            bboxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            scores=torch.tensor([b["score"] for b, _ in dets], dtype=torch.float32),
            labels=torch.tensor([label[b["category_id"]] for b, _ in dets], dtype=torch.long),
            masks=[dict(m["segmentation"]) for _, m in dets])))
    return samples


def run_metric(metric, small_set) -> dict:
    dataset = small_set["dataset"]
    metric.dataset_meta = dict(classes=tuple(c["name"] for c in dataset["categories"]))
    samples = predictions(dataset, read_json(small_set["bbox"], "result"), read_json(small_set["segm"], "result"))
    metric.process({}, samples)
    return metric.evaluate(len(samples))


METRIC_ARGS = dict(metric=["bbox", "segm", "proposal"], classwise=True)


@pytest.fixture(scope="module")
def mmdet_metrics(small_set):
    from mmdet.evaluation import CocoMetric

    return run_metric(CocoMetric(ann_file=small_set["gt"], **METRIC_ARGS), small_set)


@pytest.mark.parametrize("backend", ["hotcoco", "faster_coco_eval", "pycocotools"])
def test_fast_coco_metric_reports_what_mmdetections_coco_metric_reports(small_set, mmdet_metrics, backend):
    """Every key and value of CocoMetric's report (AP, per-class AP, proposal AR), MMDetection's
    parameters (maxDets 100 / 300 / 1000) included."""
    metric = FastCocoMetric(ann_file=small_set["gt"], backend=backend, **METRIC_ARGS)
    assert metric.backend == backend
    ours = run_metric(metric, small_set)
    assert "coco/bbox_mAP" in ours and "coco/segm_mAP" in ours and "coco/AR@100" in ours
    assert list(ours) == list(mmdet_metrics)
    differ = {k: (v, mmdet_metrics[k]) for k, v in ours.items()
              if v != mmdet_metrics[k] and not (np.isnan(v) and np.isnan(mmdet_metrics[k]))}  # a class never seen: nan
    assert not differ, differ
    assert 0.05 < ours["coco/segm_mAP"] < 0.95, ours


def test_fastest_installed_backend_is_used_and_pycocotools_is_the_fallback(small_set, monkeypatch):
    assert resolve_backend("auto") == "hotcoco"
    assert FastCocoMetric(ann_file=small_set["gt"]).backend == "hotcoco"
    monkeypatch.setitem(sys.modules, "hotcoco", None)  # as if not installed: importing it fails
    assert resolve_backend("auto") == "faster_coco_eval"
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)
    assert resolve_backend("auto") == "pycocotools"
    metric = FastCocoMetric(ann_file=small_set["gt"], metric=["bbox"])
    assert metric.backend == "pycocotools"
    assert run_metric(metric, small_set)["coco/bbox_mAP"] > 0.05
    with pytest.raises(ImportError):
        resolve_backend("hotcoco")


def test_configs_evaluate_with_fast_coco_metric():
    """Every config's box / mask evaluator (panoptic beside PQ), and any config through our tools."""
    from mmengine.config import Config

    from helpers import load_config
    from hieradet_mmdet.engine.runner import prepare_config

    names = sorted(p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.py")
                   if "_base_" not in p.parts)
    assert len(names) >= 12
    for name in names:
        cfg = load_config(name)
        for key in ("val_evaluator", "test_evaluator"):
            evaluators = cfg[key] if isinstance(cfg[key], list) else [cfg[key]]
            types = [e["type"] for e in evaluators]
            assert "FastCocoMetric" in types and "CocoMetric" not in types, (name, key, types)
            if "panoptic" in name:
                assert types == ["CocoPanopticMetric", "FastCocoMetric"], types
    cfg = Config(dict(val_evaluator=dict(type="CocoMetric", metric="bbox"),
                      test_evaluator=[dict(type="CocoPanopticMetric"), dict(type="mmdet.CocoMetric")]))
    prepare_config(cfg)
    assert cfg.val_evaluator.type == "FastCocoMetric"
    assert [e["type"] for e in cfg.test_evaluator] == ["CocoPanopticMetric", "FastCocoMetric"]


def test_progress_of_a_large_evaluation_is_logged(small_set):
    dataset, results = small_set["dataset"], read_json(small_set["bbox"], "result")
    lines = []
    evaluate(ground_truth(dataset, "pycocotools"), results, "bbox", "pycocotools", log=lines.append)
    assert any("IoUs 50% of 60 images" in line for line in lines), lines
    assert any("matching 90% of 60 images" in line for line in lines), lines
    assert lines[-1].startswith("bbox (pycocotools): done in"), lines
    lines.clear()
    evaluate(ground_truth(dataset, "hotcoco"), results, "bbox", "hotcoco", log=lines.append)
    stages = [line.split(": ", 1)[1].split(" ")[0] for line in lines]
    assert stages == ["loading", "loaded", "matched", "done"], lines


def _write(path, content) -> str:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_malformed_annotation_file_is_named_with_its_first_bad_entry(small_set, tmp_path):
    good = small_set["dataset"]
    bad_box = json.loads(json.dumps(good))
    bad_box["annotations"][2]["bbox"] = [1.0, 2.0, 3.0]
    bad_box["annotations"][5]["bbox"] = "also bad, but later"
    bad_image = json.loads(json.dumps(good))
    del bad_image["annotations"][0]["image_id"]
    cases = {"empty.json": ("", "the file is empty"), "truncated.json": (json.dumps(good)[:500], "not valid JSON"),
             "bad_box.json": (bad_box, f"annotations[2] (id {good['annotations'][2]['id']}): bbox must be 4"),
             "no_image.json": (bad_image, "annotations[0] (id 1): image_id null is not in images"),
             "a_list.json": ([], "not COCO annotations")}
    for name, (content, expected) in cases.items():
        path = _write(tmp_path / name, content)
        with pytest.raises(CocoFileError) as info:
            FastCocoMetric(ann_file=path)
        message = str(info.value)
        assert path in message and expected in message and "\n" not in message, message


def test_malformed_result_file_is_named_with_its_first_bad_entry(small_set, tmp_path):
    results = read_json(small_set["segm"], "result")
    unknown_image = [dict(r) for r in results]
    unknown_image[4]["image_id"] = 123456
    wrong_size = [dict(r) for r in results]
    wrong_size[7]["segmentation"] = dict(wrong_size[7]["segmentation"], size=[10, 10])
    no_score = [dict(r) for r in results]
    del no_score[0]["score"]
    cases = {"unknown_image.json": (unknown_image, "entry 4: image_id 123456 is not in"),
             "wrong_size.json": (wrong_size, "entry 7: RLE size [10, 10] is not the image's"),
             "no_score.json": (no_score, "entry 0: no 'score'"),
             "not_a_list.json": (dict(annotations=results[:3]), "must be a JSON list")}
    for name, (content, expected) in cases.items():
        path = _write(tmp_path / name, content)
        with pytest.raises(CocoFileError) as info:
            evaluate_files(small_set["gt"], path, "segm")
        message = str(info.value)
        assert path in message and expected in message and "\n" not in message, message


def test_coco_eval_tool_prints_pycocotools_stats_and_refuses_bad_files_writing_nothing(small_set, tmp_path):
    reference = evaluate_files(small_set["gt"], small_set["segm"], "segm", "pycocotools", log=lambda m: None)
    out = tmp_path / "stats.json"
    proc = run_tool(ROOT / "tools" / "coco_eval.py", small_set["gt"], small_set["segm"], "--iou-type", "segm",
                    "--out", out)
    assert proc.returncode == 0, fail_text(proc)
    assert "segm (hotcoco): done in" in proc.stdout
    written = json.loads(out.read_text())
    assert all(abs(written[name] - value) <= TOLERANCE for name, value in reference.items()), (written, reference)
    bad = _write(tmp_path / "bad.json", [{"image_id": 1}])
    out.unlink()
    proc = run_tool(ROOT / "tools" / "coco_eval.py", small_set["gt"], bad, "--out", out)
    assert proc.returncode == 1, fail_text(proc)
    assert proc.stderr.strip().count("\n") == 0 and bad in proc.stderr and "entry 0: no 'category_id'" in proc.stderr
    assert not out.exists() and list(tmp_path.glob("stats.json*")) == []


def test_result_files_are_written_whole_or_not_at_all(small_set, tmp_path, monkeypatch):
    import mmdet.evaluation.metrics.coco_metric as mmdet_coco_metric

    prefix = tmp_path / "results"
    metric = FastCocoMetric(ann_file=small_set["gt"], metric=["bbox", "segm"], format_only=True,
                            outfile_prefix=str(prefix))
    assert run_metric(metric, small_set) == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.bbox.json", "results.segm.json"]
    assert len(read_json(f"{prefix}.segm.json", "result")) == len(read_json(small_set["segm"], "result"))

    real_dump = mmdet_coco_metric.dump

    def dump_that_dies_in_segm(obj, file, **kwargs):
        if str(file).endswith(".segm.json"):
            with open(file, "w") as f:
                f.write("[{")  # as far as a crash would get
            raise OSError("disk full")
        return real_dump(obj, file, **kwargs)

    monkeypatch.setattr(mmdet_coco_metric, "dump", dump_that_dies_in_segm)
    other = tmp_path / "other"
    metric = FastCocoMetric(ann_file=small_set["gt"], metric=["bbox", "segm"], format_only=True,
                            outfile_prefix=str(other))
    with pytest.raises(OSError, match="disk full"):
        run_metric(metric, small_set)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.bbox.json", "results.segm.json"]
