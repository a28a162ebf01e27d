"""The panoptic Mask2Former config end to end on the synthetic COCO-panoptic set (narrow, a few
iterations): trained, resumed and tested by MMDetection's tools and ours, reporting PQ / SQ / RQ
(all, things, stuff) and the things' box and mask AP; the PQ the test reports is
panopticapi.evaluation.pq_compute's on the prediction files it wrote. (A model trained for two
iterations scores PQ 0; MMDetection's PQ against pq_compute on a prediction that scores between
0 and 100, and a perfect one scoring 100: tests/demo/test_synthetic_panoptic.py.)"""

from __future__ import annotations

import json
import math
import re

import pytest

from helpers import ROOT, fail_text, mmdet_tool, run_tool, tiny_any_config

PANOPTIC = "mask2former_hieradet-s_lsj-50e_coco-panoptic.py"
PQ_KEYS = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st")


def logged(name: str, log: str) -> list[float]:
    return [float(v) for v in re.findall(rf"{re.escape(name)}: (-?[0-9.]+)", log)]


@pytest.mark.parametrize("tool", ["ours", "mmdetection's"])
def test_panoptic_config_trains_resumes_tests_and_reports_pq(tool, tmp_path):
    from panopticapi.evaluation import pq_compute

    config = tiny_any_config(tmp_path, PANOPTIC, with_mask=True)
    tools = ROOT / "tools" if tool == "ours" else mmdet_tool("train.py").parent
    work = tmp_path / "work"
    proc = run_tool(tools / "train.py", config, "--work-dir", work, "--cfg-options", "train_cfg.max_iters=1",
                    cwd=tmp_path)
    assert proc.returncode == 0, fail_text(proc)
    proc = run_tool(tools / "train.py", config, "--work-dir", work, "--resume", "--cfg-options",
                    "train_cfg.max_iters=2", cwd=tmp_path)
    assert proc.returncode == 0, fail_text(proc)
    log = proc.stdout + proc.stderr
    assert "resumed epoch: 0, iter: 1" in log, fail_text(proc)
    for key in PQ_KEYS:  # validation at iteration 2
        values = logged(f"coco_panoptic/{key}", log)
        assert values and all(0.0 <= v <= 100.0 for v in values), (key, fail_text(proc))
    assert logged("coco/bbox_mAP", log) and logged("coco/segm_mAP", log), fail_text(proc)

    prefix = tmp_path / "predictions"
    proc = run_tool(tools / "test.py", config, work / "iter_2.pth", "--work-dir", tmp_path / "test",
                    "--cfg-options", f"test_evaluator.0.outfile_prefix={prefix}",
                    # keep every query's segment: an untrained model's scores are all far below 0.8
                    "model.test_cfg.object_mask_thr=0.0", "model.test_cfg.iou_thr=0.0", cwd=tmp_path)
    assert proc.returncode == 0, fail_text(proc)
    log = proc.stdout + proc.stderr
    assert "bbox (hotcoco): done in" in log and "segm (hotcoco): done in" in log, fail_text(proc)
    reported = {}
    for path in (tmp_path / "test").glob("*/*.json"):  # MMEngine's record of the test metrics
        reported.update(json.loads(path.read_text()))
    assert all(f"coco_panoptic/{k}" in reported for k in PQ_KEYS), reported
    if tool == "ours":
        assert re.search(r"test metrics: .*PQ=[0-9.]+ .*PQ_st=[0-9.]+", log), fail_text(proc)
    predicted = json.loads((tmp_path / "predictions.panoptic.json").read_text())["annotations"]
    assert len(predicted) == 2 and all(a["segments_info"] for a in predicted)  # pq_compute has segments to match
    data = tmp_path / "data" / "annotations"
    truth = pq_compute(str(data / "panoptic_val.json"), f"{prefix}.panoptic.json", str(data / "panoptic_val"),
                       f"{prefix}.panoptic")
    for key, group, stat in (("PQ", "All", "pq"), ("PQ_th", "Things", "pq"), ("PQ_st", "Stuff", "pq"),
                             ("SQ", "All", "sq"), ("RQ", "All", "rq")):
        value = reported[f"coco_panoptic/{key}"]
        assert math.isfinite(value) and value == pytest.approx(100 * truth[group][stat], abs=1e-4), (key, reported)
