"""Every detector family we ship, exported in-process as tools/export.py exports it (its command
line is run for Mask R-CNN in tests/tools/test_export_tool.py), against inference_detector at two
image sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detector_families import assert_same_detections, make_detector, onnx_detections, reference_detections, write_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("export_data"))


@pytest.mark.parametrize("family", ["retinanet", "faster_rcnn", "fcos", "cascade_mask_rcnn", "dino",
                                    "deformable_detr"])
def test_every_family_equals_inference_detector(family, data, tmp_path):
    """Every family we ship, exported in-process as tools/export.py exports, against
    inference_detector at two image sizes."""
    root, images = data
    config, checkpoint = make_detector(family, tmp_path, root / "data")
    model_path = export_in_process(config, checkpoint, tmp_path / f"{family}.onnx")
    for found, ref in zip(onnx_detections(model_path, images), reference_detections(config, checkpoint, images)):
        assert_same_detections(found, ref)


def export_in_process(config: Path, checkpoint: Path, model_path: Path) -> Path:
    """The ONNX file and JSON of tools/export.py, without its subprocess and its self-check."""
    from hieradet_mmdet.detectors import build_detector, load_config
    from hieradet_mmdet.export.config import detector_preprocess, test_settings
    from hieradet_mmdet.export.detector import exportable_detector, output_names, synthetic_batch
    from hieradet_mmdet.export.exporting import export_onnx

    cfg = load_config(str(config))
    model = build_detector(cfg, str(checkpoint))
    graph = exportable_detector(model)
    export_onnx(graph, synthetic_batch(model, cfg, [(480, 640)]), model_path, ["input", "img_shape"],
                output_names(graph), {"input": {0: "N", 2: "H", 3: "W"}, "img_shape": {0: "N"}})
    meta = {"inputs": [{"name": "input"}, {"name": "img_shape"}], "preprocess": detector_preprocess(cfg, model)[0],
            "postprocess": test_settings(model)}
    Path(str(model_path) + ".json").write_text(json.dumps(meta))
    return model_path
