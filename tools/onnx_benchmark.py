#!/usr/bin/env python
"""Exported models in onnxruntime against the eager PyTorch models (``--help``; docs/export.md).
The benchmark itself: hieradet_mmdet.benchmark.onnx_cases."""

import sys

from hieradet_mmdet.benchmark.onnx_cases import main

if __name__ == "__main__":
    sys.exit(main())
