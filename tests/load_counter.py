"""A pipeline step for tests that records which samples a training process loads (imported by tiny
configs through custom_imports; tests put this folder on PYTHONPATH)."""

import os

from mmcv.transforms import BaseTransform
from mmdet.registry import TRANSFORMS


@TRANSFORMS.register_module()
class RecordLoads(BaseTransform):
    """Appends '<pid> <sample index>' to ``path`` for every sample that goes through the pipeline."""

    def __init__(self, path: str) -> None:
        self.path = path

    def transform(self, results: dict) -> dict:
        with open(self.path, "a") as f:
            f.write(f"{os.getpid()} {int(results['sample_idx'])}\n")
        return results
