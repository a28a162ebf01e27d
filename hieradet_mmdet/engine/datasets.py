"""MMDetection's ``CocoDataset``, saying which annotation file is broken and what it drops.

``CocoDataset`` fails on an empty or invalid JSON file with a bare ``JSONDecodeError``, and drops
annotations with an unknown category, a box outside the image or of zero / negative size, and
(later, in ``LoadAnnotations``) polygons of fewer than three points, all silently.
``type='CheckedCocoDataset'`` reads the same data, names the file when it cannot be read, and
counts what it drops per reason in one warning naming the file and the first annotation ids;
``strict=True`` makes that an error. Our tools use it in place of ``CocoDataset``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import defaultdict

from mmdet.datasets import CocoDataset
from mmdet.registry import DATASETS
from mmengine.logging import print_log

SHOWN_IDS = 5


@DATASETS.register_module()
class CheckedCocoDataset(CocoDataset):

    def __init__(self, *args, strict: bool = False, **kwargs) -> None:
        self.strict = strict
        self._dropped: dict[str, list] = defaultdict(list)
        self._annotations = 0
        super().__init__(*args, **kwargs)

    def load_data_list(self) -> list[dict]:
        self._dropped.clear()
        self._annotations = 0
        try:
            data_list = super().load_data_list()
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            size = os.path.getsize(self.ann_file) if os.path.isfile(self.ann_file) else None
            what = "the file is empty" if size == 0 else f"not valid JSON ({err})"
            raise ValueError(f"cannot read annotation file {self.ann_file}: {what}") from None
        except (AssertionError, KeyError, TypeError, ValueError) as err:  # pycocotools asserts on the format
            raise ValueError(f"cannot read annotation file {self.ann_file}: not COCO-format annotations "
                             f"({type(err).__name__}: {err})") from None
        self._report()
        return data_list

    def parse_data_info(self, raw_data_info: dict):
        img = raw_data_info["raw_img_info"]
        for ann in raw_data_info["raw_ann_info"]:
            self._annotations += 1
            reason = self._drop_reason(ann, img["width"], img["height"])
            if reason:
                self._dropped[reason].append(ann.get("id"))
        return super().parse_data_info(raw_data_info)

    def _drop_reason(self, ann: dict, width: int, height: int):
        """Why CocoDataset / LoadAnnotations will leave this annotation out (None: they keep it)."""
        if ann.get("ignore", False):
            return None  # marked to be ignored on purpose
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            return "without a 4-number bbox"
        x1, y1, w, h = bbox
        if max(0, min(x1 + w, width) - max(x1, 0)) * max(0, min(y1 + h, height) - max(y1, 0)) == 0:
            return "with a box outside the image or of zero size"
        if ann.get("area", 0) <= 0 or w < 1 or h < 1:
            return "with a zero or negative box or area"
        if ann.get("category_id") not in self.cat_ids:
            return "with a category not in the dataset's classes"
        segmentation = ann.get("segmentation")
        if isinstance(segmentation, list) and segmentation and \
                not any(len(p) % 2 == 0 and len(p) >= 6 for p in segmentation):
            return "with no polygon of at least 3 points (mask ignored)"
        return None

    def _report(self) -> None:
        if not self._dropped:
            return
        total = sum(len(ids) for ids in self._dropped.values())
        parts = []
        for reason, ids in sorted(self._dropped.items(), key=lambda item: -len(item[1])):
            shown = ", ".join(str(i) for i in ids[:SHOWN_IDS]) + (", ..." if len(ids) > SHOWN_IDS else "")
            parts.append(f"{len(ids)} {reason} (ids {shown})")
        message = f"{self.ann_file}: {total} of {self._annotations} annotations left out: " + "; ".join(parts)
        if self.strict:
            raise ValueError(message + " (strict=True)")
        warnings.warn(message, stacklevel=2)
        print_log(message, logger="current", level=30)
