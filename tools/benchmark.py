#!/usr/bin/env python
"""Speed, memory and FLOPs of HieraDet-S against birder's HieraDet-S, Swin-T and ResNet-50, and with
``--checks`` its correctness on the device (``--help``; docs/benchmarks.md). The benchmark itself:
the repository's ``benchmarks`` package (not installed with hieradet_mmdet)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cli import main  # noqa: E402  (the repository's root on the path first)

if __name__ == "__main__":
    sys.exit(1 if main().get("checks_failed") else 0)
