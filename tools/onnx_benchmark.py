#!/usr/bin/env python
"""Exported models in onnxruntime against the eager PyTorch models (``--help``; docs/export.md).
The benchmark itself: the repository's benchmarks.onnx_cases."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.onnx_cases import main  # noqa: E402  (the repository's root on the path first)

if __name__ == "__main__":
    sys.exit(main())
