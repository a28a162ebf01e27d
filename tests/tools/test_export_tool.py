"""tools/export.py, tools/onnx_infer.py and tools/classify.py --onnx, run as users run them.

Detectors of every family we ship (narrow HieraDet, heads sized to match, weights random but
perturbed so that there are real detections of varied scores) are exported to ONNX and run with
onnxruntime through the code of tools/onnx_infer.py; their detections in original-image pixels
are compared with ``mmdet.apis.inference_detector`` on the same checkpoint at two image sizes.
"""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from helpers import fail_text, load_config, random_detector, run_tool

SIZE = 256  # the configs' test scale
IMAGE_SIZES = ((220, 300), (330, 200))  # (h, w) of the test images: landscape and portrait
SCORE_TOL, BOX_TOL, MASK_IOU = 1e-4, 0.5, 0.99
TOP = 30  # detections compared per image, best first
# Noise on the classification layers, per family, that spreads the scores out.
CLASSIFIER_NOISE = {"retinanet": 3.0, "fcos": 0.03, "faster_rcnn": 0.3, "mask_rcnn": 0.3, "cascade_mask_rcnn": 0.3}

NARROW_TRUNK = {"model.backbone.arch": dict(_delete_=True, depths=(1, 1, 2, 1), embed_dim=16, num_heads=1,
                                            global_pos_size=(7, 7), global_att_blocks=(3,),
                                            window_spec=(8, 4, 14, 7)),
                "model.backbone.drop_path_rate": 0.0,
                "model.neck.in_channels": [16, 32, 64, 128], "model.neck.out_channels": 32}
RPN = {"model.rpn_head.in_channels": 32, "model.rpn_head.feat_channels": 32,
       "model.test_cfg.rpn.nms_pre": 400, "model.test_cfg.rpn.max_per_img": 100}
BBOX_HEAD = dict(in_channels=32, fc_out_channels=64, num_classes=3)
MASK = {"model.roi_head.mask_roi_extractor.out_channels": 32, "model.roi_head.mask_head.in_channels": 32,
        "model.roi_head.mask_head.conv_out_channels": 32, "model.roi_head.mask_head.num_classes": 3}
DENSE = {"model.bbox_head.in_channels": 32, "model.bbox_head.feat_channels": 32, "model.bbox_head.num_classes": 3}
FAMILIES = {  # config, overrides, test score threshold (real, varied detections below max_per_img)
    "retinanet": ("retinanet_hieradet_s.py", DENSE, 0.36),
    "fcos": ("swap/fcos_hieradet-s_fpn_1x_coco.py", DENSE, 0.27),
    "faster_rcnn": ("swap/faster-rcnn_hieradet-s_fpn_1x_coco.py", RPN, 0.5),
    "mask_rcnn": ("maskrcnn_hieradet_s.py", {**RPN, **MASK}, 0.35),
    "cascade_mask_rcnn": ("swap/cascade-mask-rcnn_hieradet-s_fpn_1x_coco.py", {**RPN, **MASK}, 0.28),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import synthetic_coco

    root = tmp_path_factory.mktemp("export_data")
    synthetic_coco.generate(str(root / "data"), num_train=1, num_val=2, size=SIZE, seed=3)
    images = []
    for i, (h, w) in enumerate(IMAGE_SIZES):
        picture = cv2.imread(str(root / "data" / "val" / f"{i:06d}.png"))
        images.append(root / f"test_{h}x{w}.png")
        cv2.imwrite(str(images[-1]), cv2.resize(picture, (w, h)))
    return root, images


def make_detector(family: str, directory: Path, data_root: Path) -> tuple[Path, Path]:
    """A narrow config of ``family`` on the synthetic dataset and a checkpoint of perturbed
    random weights for it (an MMEngine checkpoint with the dataset's classes)."""
    import synthetic_coco

    base, overrides, score_thr = FAMILIES[family]
    cfg = load_config(base)
    with_mask = "mask" in family
    cfg.merge_from_dict(synthetic_coco.mmdet_dataset_overrides(str(data_root), with_mask=with_mask, image_size=SIZE))
    cfg.merge_from_dict({**NARROW_TRUNK, **overrides})
    if "roi_head" in cfg.model:
        cfg.model.roi_head.bbox_roi_extractor.out_channels = 32
        heads = cfg.model.roi_head.bbox_head
        for head in heads if isinstance(heads, list) else [heads]:
            head.update(BBOX_HEAD)
        cfg.model.test_cfg.rcnn.update(score_thr=score_thr, max_per_img=TOP + 20)
    else:
        cfg.model.test_cfg.score_thr = score_thr
    cfg.model.backbone.init_cfg = None
    config = directory / f"{family}.py"
    cfg.dump(str(config))

    model = random_detector(cfg, seed=1)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
        for name, module in model.named_modules():  # scores spread out, away from 0 and from 1
            if name.split(".")[-1] in ("retina_cls", "conv_cls", "conv_centerness", "rpn_cls", "fc_cls"):
                module.weight.add_(torch.randn(module.weight.shape, generator=gen) * CLASSIFIER_NOISE[family])
                if name.endswith(("retina_cls", "conv_cls")):
                    module.bias.fill_(-2.0)
    checkpoint = directory / f"{family}.pth"
    torch.save({"state_dict": model.state_dict(),
                "meta": {"dataset_meta": {"classes": list(synthetic_coco.CLASSES)}}}, checkpoint)
    return config, checkpoint


def reference_detections(config: Path, checkpoint: Path, images):
    from mmdet.apis import inference_detector, init_detector

    import hieradet_mmdet  # noqa: F401

    model = init_detector(str(config), str(checkpoint), device="cpu")
    return [inference_detector(model, str(image)).pred_instances for image in images]


def onnx_detections(model_path: Path, images):
    """What tools/onnx_infer.py computes, image by image, with every detection the graph keeps."""
    from hieradet_mmdet.export.exporting import onnx_session
    from hieradet_mmdet.export.runtime import detections, feeds, load_image, prepare, read_metadata

    meta = read_metadata(model_path)
    session = onnx_session(model_path)
    results = []
    for image in images:
        batch = prepare([load_image(image)], meta["preprocess"])
        outputs = session.run(None, feeds(batch, [i["name"] for i in meta["inputs"]]))
        results.append(detections(outputs, batch, 0, 0.0, meta["postprocess"].get("mask_thr_binary", 0.5)))
    return results


def assert_same_detections(ours: dict, ref) -> None:
    """The best TOP detections: same labels in the same order, scores within SCORE_TOL, boxes
    within BOX_TOL px, masks of IoU >= MASK_IOU; and as many detections in all."""
    count = len(ref.scores)
    assert 3 <= count < TOP + 20, f"{count} detections: no real ones, or capped by max_per_img"
    assert len(ours["scores"]) == count
    top = min(TOP, count)
    np.testing.assert_array_equal(ours["labels"][:top], ref.labels[:top].numpy())
    np.testing.assert_allclose(ours["scores"][:top], ref.scores[:top].numpy(), rtol=0, atol=SCORE_TOL)
    np.testing.assert_allclose(ours["boxes"][:top], ref.bboxes[:top].numpy(), rtol=0, atol=BOX_TOL)
    assert ref.scores[0] - ref.scores[count - 1] > 0.02, "scores too uniform for the order to mean anything"
    if "masks" in ref:
        masks, ref_masks = ours["masks"][:top], ref.masks[:top].numpy()
        assert masks.shape == ref_masks.shape
        union = (masks | ref_masks).sum(axis=(1, 2))
        iou = np.where(union > 0, (masks & ref_masks).sum(axis=(1, 2)) / np.maximum(union, 1), 1.0)
        assert iou.min() >= MASK_IOU, iou
        assert (union > 0).mean() >= 0.8 and ref_masks.sum() > 100  # mostly real masks


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


@pytest.mark.parametrize("family", ["retinanet", "faster_rcnn", "fcos", "cascade_mask_rcnn"])
def test_every_family_equals_inference_detector(family, data, tmp_path):
    """Every family we ship, exported in-process as tools/export.py exports (its CLI is run for
    Mask R-CNN above), against inference_detector at two image sizes."""
    root, images = data
    config, checkpoint = make_detector(family, tmp_path, root / "data")
    model_path = export_in_process(config, checkpoint, tmp_path / f"{family}.onnx")
    for found, ref in zip(onnx_detections(model_path, images), reference_detections(config, checkpoint, images)):
        assert_same_detections(found, ref)


def export_in_process(config: Path, checkpoint: Path, model_path: Path) -> Path:
    """The ONNX file and JSON of tools/export.py, without its subprocess and its self-check."""
    from export import synthetic_batch

    from hieradet_mmdet.detectors import build_detector, load_config as load_for_export
    from hieradet_mmdet.export.config import detector_preprocess, test_settings
    from hieradet_mmdet.export.detector import exportable_detector, output_names
    from hieradet_mmdet.export.exporting import export_onnx

    cfg = load_for_export(str(config))
    model = build_detector(cfg, str(checkpoint))
    graph = exportable_detector(model)
    export_onnx(graph, synthetic_batch(model, cfg, [(480, 640)]), model_path, ["input", "img_shape"],
                output_names(graph), {"input": {0: "N", 2: "H", 3: "W"}, "img_shape": {0: "N"}})
    meta = {"inputs": [{"name": "input"}, {"name": "img_shape"}], "preprocess": detector_preprocess(cfg, model)[0],
            "postprocess": test_settings(model)}
    Path(str(model_path) + ".json").write_text(json.dumps(meta))
    return model_path


def test_padded_batch_of_two_equals_mmdetection_predict(mask_rcnn, data):
    """Two images of different sizes in one padded batch: each image's rows equal MMDetection's
    predict on that batch (img_shape clips each image's boxes to its own extent)."""
    from hieradet_mmdet.detectors import build_detector, load_config as load_for_export
    from hieradet_mmdet.export.exporting import onnx_session
    from hieradet_mmdet.export.runtime import load_image, prepare, read_metadata

    config, checkpoint, model_path, _ = mask_rcnn
    cfg = load_for_export(str(config))
    model = build_detector(cfg, str(checkpoint))
    from export import prepared_batch

    images = [load_image(p) for p in data[1]]
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


def test_classifier_onnx_probabilities_equal_classify_tool(birder_files, tmp_path, capsys):
    """tools/export.py --classifier, then tools/classify.py --onnx against tools/classify.py
    --checkpoint (whose numbers tests/tools/test_classify_tool.py holds to birder's)."""
    import classify

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
        capsys.readouterr()
        assert classify.main([str(a) for a in (*names, *source, "--topk", 7, "--json", "--embeddings", out)]) == 0
        results[source[0]] = (json.loads(capsys.readouterr().out), np.load(out))
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



def test_export_arguments_are_checked_before_any_work(capsys):
    import export

    for argv, message in [(["c.py", "--out", "m.pt"], "--out must end in .onnx"),
                          (["c.py", "--out", "m.onnx", "--format", "pt2"], "--out must end in .pt2"),
                          (["c.py", "--classifier", "x", "--out", "m.onnx"], "either CONFIG"),
                          (["--out", "m.onnx"], "either CONFIG"),
                          (["--classifier", "x", "--backbone-only", "--out", "m.onnx"], "go with a CONFIG")]:
        with pytest.raises(SystemExit) as exit_info:
            export.parse_args(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
