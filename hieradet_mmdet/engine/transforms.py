"""Image loading whose errors name the file."""

from __future__ import annotations

import io
from typing import Optional

import mmcv
from mmcv.transforms import LoadImageFromFile
from mmdet.registry import TRANSFORMS
from mmengine import fileio
from PIL import Image, ImageFile


def _looks_truncated(data: bytes) -> Optional[str]:
    """End-of-file checks for JPEG and PNG (OpenCV decodes a cut-off file without complaint,
    filling the rest grey); None if the file looks complete.

    Only when the end marker is not near the end (trailing data after it is legal) is the
    file fully decoded by Pillow, which tells a truncated file from one with a long trailer."""
    if data[:3] == b"\xff\xd8\xff" and b"\xff\xd9" not in data[-1024:]:
        kind = "JPEG without its end-of-image marker (truncated)"
    elif data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in data[-64:]:
        kind = "PNG without its IEND chunk (truncated)"
    else:
        return None
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        return kind
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Exception:  # noqa: BLE001 - any decoder complaint confirms it
        return kind
    return None


@TRANSFORMS.register_module()
class CheckedLoadImageFromFile(LoadImageFromFile):
    """``LoadImageFromFile`` whose errors name the file (missing, truncated, undecodable)."""

    def transform(self, results: dict) -> Optional[dict]:
        filename = results["img_path"]
        try:
            data = fileio.get(filename, backend_args=self.backend_args)
        except FileNotFoundError:
            if self.ignore_empty:
                return None
            raise FileNotFoundError(f"image file {filename} does not exist") from None
        problem = "empty file" if not data else _looks_truncated(data)
        img = None
        if problem is None:
            try:
                img = mmcv.imfrombytes(data, flag=self.color_type, backend=self.imdecode_backend)
            except Exception as err:  # noqa: BLE001 - decoders raise anything; we add the file name
                problem = f"{type(err).__name__}: {err}"
            if img is None and problem is None:
                problem = "not a decodable image"
        if problem is not None:
            if self.ignore_empty:
                return None
            raise ValueError(f"cannot read image {filename} ({len(data)} bytes): {problem}")
        if self.to_float32:
            img = img.astype("float32")
        results["img"] = img
        results["img_shape"] = img.shape[:2]
        results["ori_shape"] = img.shape[:2]
        return results
