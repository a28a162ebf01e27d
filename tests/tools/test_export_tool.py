"""tools/export.py, tools/onnx_infer.py and tools/classify.py --onnx, run as users run them.

A narrow Mask R-CNN (tests/detector_families.py) is exported to ONNX by the tool and run with
onnxruntime through the code of tools/onnx_infer.py; its detections in original-image pixels are
compared with ``mmdet.apis.inference_detector`` on the same checkpoint at two image sizes. The
other families are exported in-process: tests/export/test_detector_export.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detector_families import (BOX_TOL, SCORE_TOL, SIZE, assert_same_detections, make_detector, onnx_detections,
                               reference_detections, write_data)
from helpers import ROOT, fail_text, run_tool


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("export_data"))


def export_with_tool(config, checkpoint, out: Path, *extra):
    proc = run_tool("tools/export.py", config, checkpoint, "--out", out, *extra, timeout=600)
    assert proc.returncode == 0, fail_text(proc)
    return proc


@pytest.fixture(scope="module")
def mask_rcnn(data, tmp_path_factory):
    directory = tmp_path_factory.mktemp("mask_rcnn")
    config, checkpoint = make_detector("mask_rcnn", directory, data[0] / "data")
    model_path = directory / "mask_rcnn.onnx"
    proc = export_with_tool(config, checkpoint, model_path)
    return config, checkpoint, model_path, proc


def test_exported_mask_rcnn_equals_inference_detector(data, mask_rcnn):
    """tools/export.py, then onnx_infer's preprocessing, onnxruntime and post-processing, against
    inference_detector, at two image sizes (two padded input shapes, neither the traced one)."""
    root, images = data
    config, checkpoint, model_path, proc = mask_rcnn
    assert "0 unmatched" in proc.stdout, proc.stdout  # the tool's own check, on its synthetic images

    ours = onnx_detections(model_path, images)
    refs = reference_detections(config, checkpoint, images)
    for found, ref in zip(ours, refs):
        assert_same_detections(found, ref)
    # The comparison can fail: the two images' detections differ far beyond the tolerances.
    assert not np.allclose(refs[0].bboxes[:3].numpy(), refs[1].bboxes[:3].numpy(), atol=5 * BOX_TOL)

    meta = json.loads(Path(str(model_path) + ".json").read_text())
    assert [o["name"] for o in meta["outputs"]] == ["dets", "labels", "masks"]
    assert [i["name"] for i in meta["inputs"]] == ["input", "img_shape"]
    assert meta["classes"] == ["circle", "rectangle", "triangle"]
    assert meta["preprocess"]["channel_order"] == "RGB" and meta["preprocess"]["pad_size_divisor"] == 32
    assert meta["preprocess"]["resize"] == {"scale": [SIZE, SIZE], "keep_ratio": True, "interpolation": "bilinear",
                                            "library": "cv2"}
    assert meta["versions"]["torch"] == torch.__version__ and meta["versions"]["opset"] >= 16


def test_padded_batch_of_two_equals_mmdetection_predict(mask_rcnn, data):
    """Two images of different sizes in one padded batch: each image's rows equal MMDetection's
    predict on that batch (img_shape clips each image's boxes to its own extent)."""
    from hieradet_mmdet.detectors import build_detector, load_config
    from hieradet_mmdet.export.config import prepared_batch
    from hieradet_mmdet.export.exporting import onnx_session
    from hieradet_mmdet.export.metadata import read_metadata
    from hieradet_mmdet.export.runtime import prepare, read_bgr_image

    config, checkpoint, model_path, _ = mask_rcnn
    cfg = load_config(str(config))
    model = build_detector(cfg, str(checkpoint))

    images = [read_bgr_image(p) for p in data[1]]
    inputs, img_shape, samples = prepared_batch(model, cfg, images)
    ours = prepare(images, read_metadata(model_path)["preprocess"])
    np.testing.assert_array_equal(ours.input, inputs.numpy())  # runtime.prepare is the data preprocessor
    np.testing.assert_array_equal(ours.img_shape, img_shape.numpy())
    dets, labels, masks = onnx_session(model_path).run(None, {"input": ours.input, "img_shape": ours.img_shape})
    with torch.no_grad():
        refs = model.predict(inputs, samples, rescale=False)
    for i, ref in enumerate(refs):
        ref = ref.pred_instances
        count = len(ref.scores)
        assert count > 3 and (labels[i] >= 0).sum() == count and (labels[i, count:] == -1).all()
        np.testing.assert_array_equal(labels[i, :count], ref.labels.numpy())
        np.testing.assert_allclose(dets[i, :count, 4], ref.scores.numpy(), atol=SCORE_TOL, rtol=0)
        np.testing.assert_allclose(dets[i, :count, :4], ref.bboxes.numpy(), atol=BOX_TOL, rtol=0)
        assert (dets[i, :count, 2] <= img_shape[i, 1].item()).all() and (dets[i, :count, 3] <= img_shape[i, 0].item()).all()


def test_onnx_infer_cli_prints_detections_and_writes_pictures(mask_rcnn, data, tmp_path):
    _, _, model_path, _ = mask_rcnn
    images = data[1]
    missing = tmp_path / "missing.png"
    proc = run_tool("tools/onnx_infer.py", *images, missing, "--model", model_path, "--out", tmp_path / "pictures",
                    "--score-thr", "0.5", "--json")
    assert proc.returncode == 1, fail_text(proc)  # one image could not be read; the others ran
    assert f"error: cannot read image {missing}" in proc.stderr and "Traceback" not in proc.stderr
    listing = json.loads(proc.stdout)
    expected = onnx_detections(model_path, images)
    assert [entry["image"] for entry in listing] == [str(p) for p in images]
    for entry, found in zip(listing, expected):
        keep = found["scores"] >= 0.5
        assert len(entry["detections"]) == int(keep.sum()) > 0
        np.testing.assert_allclose([d["box"] for d in entry["detections"]], found["boxes"][keep], atol=1e-4)
        assert {d["class"] for d in entry["detections"]} <= {"circle", "rectangle", "triangle"}
        assert [d["mask_area"] for d in entry["detections"]] == found["masks"][keep].sum(axis=(1, 2)).tolist()
    for image in images:
        picture = cv2.imread(str(tmp_path / "pictures" / image.name))
        assert picture is not None and picture.shape[:2] == cv2.imread(str(image)).shape[:2]


def test_onnx_benchmark_times_the_three_runtimes_of_the_backbone(tmp_path):
    """tools/onnx_benchmark.py from the repository (its code is benchmarks/, outside the package):
    eager fast path, eager reference path and onnxruntime, one row each, the first the yardstick."""
    proc = run_tool(ROOT / "tools" / "onnx_benchmark.py", "--sizes", "64x96", "--detector-size", "", "--iters", "1",
                    "--threads", "1", "--out", tmp_path / "onnx.json", cwd=tmp_path)
    assert proc.returncode == 0, fail_text(proc)
    rows = json.loads((tmp_path / "onnx.json").read_text())["rows"]
    assert [(r["input"], r["runtime"].split(" (")[0]) for r in rows] == [("64x96", "PyTorch eager")] * 2 + [
        ("64x96", "onnxruntime")]
    assert rows[0]["vs_eager"] == 1.0 and all(r["ms"] > 0 for r in rows)
    assert "| HieraDet-S backbone | 64x96 | onnxruntime |" in proc.stdout


def test_classifier_onnx_probabilities_equal_classify_tool(birder_files, tmp_path):
    """tools/export.py --classifier, then tools/classify.py --onnx against tools/classify.py
    --checkpoint (whose numbers tests/tools/test_classify_tool.py holds to birder's)."""
    from helpers import write_test_images

    images = write_test_images(tmp_path)
    model_path = tmp_path / "classifier.onnx"
    proc = run_tool("tools/export.py", "--classifier", birder_files["pt"], "--out", model_path)
    assert proc.returncode == 0, fail_text(proc)
    meta = json.loads(Path(str(model_path) + ".json").read_text())
    assert meta["model"] == "classifier" and [o["name"] for o in meta["outputs"]] == ["probs", "embedding"]
    assert meta["preprocess"]["input_size"] == [64, 64] and meta["classes"][0] == "Eurasian jay"

    names = [images[n] for n in ("rgb_png", "rgb_jpeg", "grey")]
    results = {}
    for source in (["--checkpoint", birder_files["pt"]], ["--onnx", model_path]):
        out = tmp_path / f"embeddings_{source[0][2:]}.npy"
        proc = run_tool("tools/classify.py", *names, *source, "--topk", 7, "--json", "--embeddings", out)
        assert proc.returncode == 0, fail_text(proc)
        results[source[0]] = (json.loads(proc.stdout), np.load(out))
    (eager, eager_emb), (onnx, onnx_emb) = results["--checkpoint"], results["--onnx"]
    for ours, ref in zip(onnx, eager):
        assert [t["index"] for t in ours["topk"]] == [t["index"] for t in ref["topk"]]
        np.testing.assert_allclose([t["prob"] for t in ours["topk"]], [t["prob"] for t in ref["topk"]],
                                   rtol=0, atol=1e-4)
    assert np.abs(onnx_emb - eager_emb).max() <= 1e-4 * np.abs(eager_emb).max()
    assert np.abs(eager_emb[0] - eager_emb[1]).max() > 0.1  # images differ: the comparison can fail


def test_bad_input_is_a_one_line_error(mask_rcnn, tmp_path):
    config, checkpoint, _, _ = mask_rcnn
    state = torch.load(checkpoint, weights_only=True)
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if not k.startswith("roi_head.mask_head")}
    partial = tmp_path / "partial.pth"
    torch.save(state, partial)
    proc = run_tool("tools/export.py", config, partial, "--out", tmp_path / "x.onnx")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, fail_text(proc)
    assert "does not fit the detector" in proc.stderr and "roi_head.mask_head" in proc.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_export_arguments_are_checked_before_any_work():
    for argv, message in [(["c.py", "--out", "m.pt"], "--out must end in .onnx"),
                          (["c.py", "--out", "m.onnx", "--format", "pt2"], "--out must end in .pt2"),
                          (["c.py", "--classifier", "x", "--out", "m.onnx"], "either CONFIG"),
                          (["--out", "m.onnx"], "either CONFIG"),
                          (["--classifier", "x", "--backbone-only", "--out", "m.onnx"], "go with a CONFIG")]:
        proc = run_tool("tools/export.py", *argv)
        assert proc.returncode == 2 and message in proc.stderr, fail_text(proc)


def test_a_family_without_export_is_named_in_one_line(tmp_path):
    """Mask2Former has no exportable form: the tool says so and which families have one, exits
    non-zero and writes nothing."""
    proc = run_tool("tools/export.py", "configs/mask2former_hieradet-s_lsj-50e_coco.py", "--out", tmp_path / "x.onnx",
                    "--cfg-options", "model.backbone.init_cfg=None")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, fail_text(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: Mask2Former detectors cannot be exported yet; exportable: RetinaNet, FCOS, Faster R-CNN, "
                      "Mask R-CNN, Cascade (Mask) R-CNN, DINO, Deformable DETR"], proc.stderr
    assert not (tmp_path / "x.onnx").exists()
