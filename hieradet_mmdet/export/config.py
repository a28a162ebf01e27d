"""MMDetection glue for export: what a deployed model needs to know from the config and the
detector (preprocessing, classes, the test settings the graph bakes in), and images made into a
batch as the config's test pipeline and data preprocessor make them."""

from __future__ import annotations

from typing import Any, Optional

import torch

# Test-pipeline steps that do not change the pixels the model sees.
PASSIVE_STEPS = {"LoadImageFromFile", "LoadImageFromNDArray", "LoadAnnotations", "PackDetInputs",
                 "CheckedLoadImageFromFile"}


def detector_preprocess(cfg, model) -> tuple[dict, list[str]]:
    """How an image becomes the graph's input (the keys runtime.prepare reads), and the test
    pipeline steps that the description leaves out (empty when it is complete)."""
    from mmdet.utils import get_test_pipeline_cfg

    pre = model.data_preprocessor
    described: dict[str, Any] = {
        "image_reading": "BGR, as OpenCV decodes the file (mmcv LoadImageFromFile)",
        "channel_order": "RGB" if getattr(pre, "_channel_conversion", False) else "BGR",
        "mean": [float(v) for v in pre.mean.flatten()] if pre._enable_normalize else [0.0, 0.0, 0.0],
        "std": [float(v) for v in pre.std.flatten()] if pre._enable_normalize else [1.0, 1.0, 1.0],
        "pad_size_divisor": int(pre.pad_size_divisor), "pad_value": float(pre.pad_value),
    }
    left_out = []
    for step in get_test_pipeline_cfg(cfg):
        kind = str(step.get("type", "")).split(".")[-1]
        if kind == "Resize" and step.get("scale") is not None and not described.get("resize"):
            scale = step["scale"]
            scale = (scale, scale) if isinstance(scale, int) else tuple(int(s) for s in scale)
            described["resize"] = {"scale": list(scale), "keep_ratio": bool(step.get("keep_ratio", False)),
                                   "interpolation": step.get("interpolation", "bilinear"),
                                   "library": step.get("backend", "cv2")}
        elif kind not in PASSIVE_STEPS:
            left_out.append(kind)
    return described, left_out


def class_names(cfg, model) -> list[str]:
    """The checkpoint's classes (``model.dataset_meta``), else the config's dataset metainfo, else
    its dataset's defaults."""
    from mmdet.registry import DATASETS

    num_classes = _num_classes(model)
    candidates = [(getattr(model, "dataset_meta", None) or {}).get("classes")]
    dataset = cfg.get("test_dataloader", {}).get("dataset", {})
    while "dataset" in dataset:
        dataset = dataset["dataset"]
    candidates.append((dataset.get("metainfo") or {}).get("classes"))
    kind = DATASETS.get(dataset.get("type", "")) if dataset.get("type") else None
    candidates.append(getattr(kind, "METAINFO", {}).get("classes") if kind is not None else None)
    for names in candidates:
        if names is not None and (num_classes is None or len(names) == num_classes):
            return [str(n) for n in names]
    return [str(i) for i in range(num_classes or 0)]


def _num_classes(model) -> Optional[int]:
    head = getattr(model, "bbox_head", None) or getattr(getattr(model, "roi_head", None), "bbox_head", None)
    if isinstance(head, torch.nn.ModuleList):
        head = head[-1]
    return getattr(head, "num_classes", None)


def test_settings(model) -> dict:
    """The test_cfg thresholds the graph baked in, for the JSON."""
    if hasattr(model, "roi_head"):
        cfg = model.roi_head.test_cfg
        return {"score_thr": float(cfg.get("score_thr", 0.0)), "max_per_img": int(cfg.get("max_per_img", 100)),
                "mask_thr_binary": float(cfg.get("mask_thr_binary", 0.5))}
    cfg = model.bbox_head.test_cfg
    return {"score_thr": float(cfg.get("score_thr", 0.0)), "max_per_img": int(cfg.get("max_per_img", 100))}


def prepared_batch(model, cfg, images):
    """BGR images through the config's test pipeline and the data preprocessor, as
    inference_detector does: (inputs, img_shape (N, 2) int64, data samples)."""
    from mmdet.utils import get_test_pipeline_cfg
    from mmengine.dataset import Compose

    steps = get_test_pipeline_cfg(cfg.copy())
    steps[0].type = "mmdet.LoadImageFromNDArray"
    pipeline = Compose(steps)
    items = [pipeline(dict(img=image, img_id=i)) for i, image in enumerate(images)]
    batch = model.data_preprocessor(dict(inputs=[d["inputs"] for d in items],
                                         data_samples=[d["data_samples"] for d in items]), False)
    shapes = torch.tensor([s.metainfo["img_shape"] for s in batch["data_samples"]], dtype=torch.long)
    return batch["inputs"], shapes, batch["data_samples"]
