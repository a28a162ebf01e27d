"""Running exported ONNX files with onnxruntime, as the eager models run.

* A detector, without MMDetection (NumPy, OpenCV): the preprocessing its JSON describes, done as
  MMDetection's test pipeline and data preprocessor do it, and the post-processing that turns the
  graph's outputs into boxes and masks of the original image, as ``inference_detector`` returns
  them (:class:`OnnxDetector`, or the steps :func:`prepare`, :func:`feeds`, :func:`detections`).
  Images are read and resized with OpenCV as mmcv does (``imfrombytes``, ``imrescale``), so the
  pixels the graph sees are the ones MMDetection's pipeline gives.
* The classifier (:class:`OnnxClassifier`): birder's preprocessing (Pillow) as
  :class:`~hieradet_mmdet.models.classifier.HieraDetClassifier` does it, labels and top-k.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .metadata import read_metadata


def open_exported(path: str, model: str, threads: int = 0, hint: str = "") -> tuple[dict, Any]:
    """(the JSON beside ``path``, an onnxruntime session of it) for an ONNX file of ``model``
    ('detector', 'classifier'); ValueError when it is another kind (``hint`` ends the message)."""
    from .exporting import onnx_session

    meta = read_metadata(path)
    if meta.get("model") != model or meta.get("format") != "onnx":
        raise ValueError(f"{path} is a {meta.get('format')} {meta.get('model')}, not an ONNX {model}{hint}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model file {path}")
    return meta, onnx_session(path, threads)


class OnnxDetector:
    """An exported detector, one image at a time as ``inference_detector`` runs it."""

    def __init__(self, path: str, threads: int = 0) -> None:
        self.meta, self.session = open_exported(path, "detector", threads,
                                                "; classifiers run with tools/classify.py --onnx")
        self.input_names = [i["name"] for i in self.meta["inputs"]]
        self.classes = self.meta.get("classes") or []
        self.mask_thr = self.meta.get("postprocess", {}).get("mask_thr_binary", 0.5)

    @property
    def not_reproduced(self) -> list[str]:
        """Test-pipeline steps of the config that the JSON's preprocessing leaves out."""
        return self.meta["preprocess"].get("not_reproduced") or []

    def detect(self, image: np.ndarray, score_thr: float = 0.0) -> dict:
        """A BGR uint8 image's detections, as :func:`detections` gives them."""
        batch = prepare([image], self.meta["preprocess"])
        outputs = self.session.run(None, feeds(batch, self.input_names))
        return detections(outputs, batch, 0, score_thr, self.mask_thr)


class OnnxClassifier:
    """An exported classifier behind HieraDetClassifier's predict(): onnxruntime, the same
    preprocessing, labels and top-k from the JSON beside the file."""

    def __init__(self, path: str) -> None:
        meta, self.session = open_exported(path, "classifier")
        pre = meta["preprocess"]
        self.input_size = tuple(pre["input_size"])
        self.rgb_stats = {"mean": pre["mean"], "std": pre["std"]}
        self.labels = meta["classes"]
        self.embedding_dim = meta["outputs"][1]["shape"][1]

    def to(self, device):
        return self

    def predict(self, images, topk: int = 5):
        """Top-k classes of PIL images (per image a list of {index, label, prob}) and the embeddings."""
        import torch

        from ..models.classifier import preprocess_image, top_classes

        batch = torch.stack([preprocess_image(image, self.input_size, self.rgb_stats) for image in images])
        probs, embeddings = self.session.run(None, {"input": batch.numpy()})
        return top_classes(torch.from_numpy(probs), self.labels, topk), torch.from_numpy(embeddings)


def read_bgr_image(path) -> np.ndarray:
    """An image file as BGR uint8 (H, W, 3), decoded as mmcv's LoadImageFromFile does."""
    import cv2

    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as err:
        raise ValueError(f"cannot read image {path}: {err.strerror}") from None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise ValueError(f"cannot read image {path}: not an image OpenCV can decode")
    return image


def resized_size(width: int, height: int, resize: Mapping[str, Any]) -> tuple[int, int]:
    """(new width, new height) of mmcv's Resize: with ``keep_ratio`` the largest scale that fits
    the long and short sides of ``scale`` (mmcv.rescale_size), otherwise ``scale`` itself."""
    scale = tuple(int(s) for s in resize["scale"])
    if not resize.get("keep_ratio", True):
        return scale[0], scale[1]
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(width * float(factor) + 0.5), int(height * float(factor) + 0.5)


@dataclass
class Prepared:
    """A batch as the exported detector takes it, and what maps its outputs back."""
    input: np.ndarray         # (N, 3, H, W) float32
    img_shape: np.ndarray     # (N, 2) int64: (h, w) of each resized image before padding
    scale_factor: np.ndarray  # (N, 2) float64: (w, h) resize factors
    ori_shape: list           # [(h, w)] of the original images


def prepare(images: Sequence[np.ndarray], preprocess: Mapping[str, Any]) -> Prepared:
    """BGR uint8 images -> resized, normalised, padded batch (MMDetection's test pipeline and
    DetDataPreprocessor: float32 ``(x - mean) / std`` in ``channel_order``, padded at the bottom
    and right to a multiple of ``pad_size_divisor`` with ``pad_value``)."""
    import cv2

    interpolation = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
                     "area": cv2.INTER_AREA, "lanczos": cv2.INTER_LANCZOS4}
    resize = preprocess.get("resize")
    mean = np.asarray(preprocess["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(preprocess["std"], dtype=np.float32)[:, None, None]
    planes, shapes, factors, originals = [], [], [], []
    for image in images:
        h, w = image.shape[:2]
        originals.append((h, w))
        if resize:
            new_w, new_h = resized_size(w, h, resize)
            image = cv2.resize(image, (new_w, new_h), interpolation=interpolation[resize.get("interpolation", "bilinear")])
        factors.append((image.shape[1] / w, image.shape[0] / h))
        shapes.append(image.shape[:2])
        chw = image.transpose(2, 0, 1).astype(np.float32)
        if preprocess.get("channel_order", "BGR") == "RGB":
            chw = chw[::-1]
        planes.append((chw - mean) / std)
    divisor = int(preprocess.get("pad_size_divisor", 1))
    height = -(-max(s[0] for s in shapes) // divisor) * divisor
    width = -(-max(s[1] for s in shapes) // divisor) * divisor
    batch = np.full((len(planes), 3, height, width), float(preprocess.get("pad_value", 0)), dtype=np.float32)
    for i, plane in enumerate(planes):
        batch[i, :, :plane.shape[1], :plane.shape[2]] = plane
    return Prepared(batch, np.asarray(shapes, dtype=np.int64), np.asarray(factors, dtype=np.float64), originals)


def feeds(prepared: Prepared, input_names: Sequence[str]) -> dict:
    available = {"input": prepared.input, "img_shape": prepared.img_shape}
    return {name: available[name] for name in input_names}


def detections(outputs: Sequence[np.ndarray], prepared: Prepared, index: int, score_thr: float = 0.0,
               mask_thr: float = 0.5) -> dict:
    """Image ``index``'s detections in original-image pixels, best first: boxes (K, 4) float32,
    scores (K,), labels (K,), and with a mask head masks (K, H, W) bool, pasted and thresholded as
    MMDetection's FCNMaskHead does on the CPU."""
    dets, labels = outputs[0][index], outputs[1][index]
    keep = (labels >= 0) & (dets[:, 4] >= score_thr)
    w_scale, h_scale = prepared.scale_factor[index]
    factor = np.array([w_scale, h_scale, w_scale, h_scale], dtype=np.float32)
    boxes = dets[keep, :4] / factor
    result = {"boxes": boxes, "scores": dets[keep, 4], "labels": labels[keep]}
    if len(outputs) > 2:
        result["masks"] = paste_masks(outputs[2][index][keep], boxes, prepared.ori_shape[index], mask_thr)
    return result


def paste_masks(masks: np.ndarray, boxes: np.ndarray, image_hw: tuple[int, int], threshold: float) -> np.ndarray:
    """(K, M, M) mask probabilities in their boxes -> (K, H, W) bool image masks: bilinear
    sampling at pixel centres with zeros outside the mask (grid_sample, align_corners=False),
    within the box grown to whole pixels plus one (MMDetection's CPU paste), then >= threshold."""
    height, width = image_hw
    out = np.zeros((len(masks), height, width), dtype=bool)
    for k, (mask, box) in enumerate(zip(masks.astype(np.float32), boxes.astype(np.float32))):
        x0, y0, x1, y1 = box
        left, top = max(int(np.floor(x0)) - 1, 0), max(int(np.floor(y0)) - 1, 0)
        right, bottom = min(int(np.ceil(x1)) + 1, width), min(int(np.ceil(y1)) + 1, height)
        if right <= left or bottom <= top:
            continue
        rows = _sampling_matrix(np.arange(top, bottom, dtype=np.float32) + np.float32(0.5), y0, y1, mask.shape[0])
        cols = _sampling_matrix(np.arange(left, right, dtype=np.float32) + np.float32(0.5), x0, x1, mask.shape[1])
        out[k, top:bottom, left:right] = (rows @ mask @ cols.T) >= threshold
    return out


def _sampling_matrix(centres: np.ndarray, start, end, size: int) -> np.ndarray:
    """(len(centres), size) bilinear weights of mask cells for image pixel centres in [start, end]."""
    extent = np.float32(end - start)
    if extent == 0:  # MMDetection samples the middle of a box without width or height
        grid = np.zeros_like(centres)
    else:
        grid = (centres - np.float32(start)) / extent * np.float32(2) - np.float32(1)
    position = ((grid + np.float32(1)) * np.float32(size) - np.float32(1)) / np.float32(2)
    low = np.floor(position)
    frac = position - low
    weights = np.zeros((len(centres), size), dtype=np.float32)
    for cell, weight in ((low, np.float32(1) - frac), (low + 1, frac)):
        inside = (cell >= 0) & (cell < size)
        weights[np.nonzero(inside)[0], cell[inside].astype(np.int64)] += weight[inside]
    return weights


def draw(image: np.ndarray, result: Mapping[str, np.ndarray], classes: Sequence[str]) -> np.ndarray:
    """A BGR picture of the detections: masks tinted, boxes and 'label score' drawn."""
    import cv2

    canvas = image.copy()
    rng = np.random.default_rng(0)
    palette = rng.integers(60, 255, size=(max(len(classes), 1), 3))
    for k in range(len(result["scores"])):
        label = int(result["labels"][k])
        colour = tuple(int(c) for c in palette[label % len(palette)])
        if "masks" in result:
            mask = result["masks"][k]
            canvas[mask] = (0.5 * canvas[mask] + 0.5 * np.array(colour)).astype(np.uint8)
        x0, y0, x1, y1 = (int(round(float(v))) for v in result["boxes"][k])
        cv2.rectangle(canvas, (x0, y0), (x1, y1), colour, 2)
        name = classes[label] if label < len(classes) else str(label)
        cv2.putText(canvas, f"{name} {float(result['scores'][k]):.2f}", (x0, max(y0 - 4, 10)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1, cv2.LINE_AA)
    return canvas
