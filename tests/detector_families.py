"""Detectors of every family we ship, for the export tests: narrow HieraDet, heads sized to match,
weights random but perturbed so that there are real detections of varied scores; and comparing
the detections of their exported files with ``mmdet.apis.inference_detector``'s."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from helpers import load_config, random_detector

SIZE = 256  # the configs' test scale
IMAGE_SIZES = ((220, 300), (330, 200))  # (h, w) of the test images: landscape and portrait
SCORE_TOL, BOX_TOL, MASK_IOU = 1e-4, 0.5, 0.99
TOP = 30  # detections compared per image, best first
# Noise on the classification layers, per family, that spreads the scores out.
CLASSIFIER_NOISE = {"retinanet": 3.0, "fcos": 0.03, "faster_rcnn": 0.3, "mask_rcnn": 0.3, "cascade_mask_rcnn": 0.3,
                    "dino": 0.3, "deformable_detr": 0.3}
# Their biases, where the noise alone leaves the scores near 0 or 1 (DETRs: near 1, then tied).
CLASSIFIER_BIAS = {"retinanet": -2.0, "fcos": -2.0, "dino": -8.0, "deformable_detr": -6.0}
CLASSIFIERS = {"retina_cls", "conv_cls", "conv_centerness", "rpn_cls", "fc_cls", "cls_branches"}

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
    # query-based: narrow_detector_config's form, max_per_img detections of every image, no threshold
    "dino": ("dino-4scale_hieradet-s_12e_coco.py", {"model.bbox_head.num_classes": 3}, None),
    "deformable_detr": ("swap/deformable-detr-refine-twostage_hieradet-s_50e_coco.py",
                        {"model.bbox_head.num_classes": 3}, None),
}


def write_data(root: Path) -> tuple[Path, list[Path]]:
    """The synthetic dataset the detectors are configured for under ``root``/data, and two test
    images of IMAGE_SIZES cut from its validation images: (root, image paths)."""
    from hieradet_mmdet.demo import synthetic_coco

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
    from hieradet_mmdet.demo import synthetic_coco

    base, overrides, score_thr = FAMILIES[family]
    cfg = load_config(base)
    with_mask = "mask" in family
    cfg.merge_from_dict(synthetic_coco.mmdet_dataset_overrides(str(data_root), with_mask=with_mask, image_size=SIZE))
    if "decoder" in cfg.model:  # query-based
        from narrow_configs import narrow_detector_config

        narrow_detector_config(cfg)
        cfg.merge_from_dict(overrides)
    elif "roi_head" in cfg.model:
        cfg.merge_from_dict({**NARROW_TRUNK, **overrides})
        cfg.model.roi_head.bbox_roi_extractor.out_channels = 32
        heads = cfg.model.roi_head.bbox_head
        for head in heads if isinstance(heads, list) else [heads]:
            head.update(BBOX_HEAD)
        cfg.model.test_cfg.rcnn.update(score_thr=score_thr, max_per_img=TOP + 20)
    else:
        cfg.merge_from_dict({**NARROW_TRUNK, **overrides})
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
            parts = name.split(".")
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and CLASSIFIERS.intersection(parts[-2:]):
                module.weight.add_(torch.randn(module.weight.shape, generator=gen) * CLASSIFIER_NOISE[family])
                if family in CLASSIFIER_BIAS and {"retina_cls", "conv_cls", "cls_branches"}.intersection(parts[-2:]):
                    module.bias.fill_(CLASSIFIER_BIAS[family])
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
    from hieradet_mmdet.export.metadata import read_metadata
    from hieradet_mmdet.export.runtime import detections, feeds, prepare, read_bgr_image

    meta = read_metadata(model_path)
    session = onnx_session(model_path)
    results = []
    for image in images:
        batch = prepare([read_bgr_image(image)], meta["preprocess"])
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
