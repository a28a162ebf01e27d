#!/usr/bin/env python
"""Speed, memory and FLOPs of HieraDet-S against birder's HieraDet-S, Swin-T and ResNet-50, and with
``--checks`` its correctness on the device (``--help``; docs/benchmarks.md). The benchmark itself:
hieradet_mmdet.benchmark."""

import sys

from hieradet_mmdet.benchmark.cli import main

if __name__ == "__main__":
    sys.exit(1 if main().get("checks_failed") else 0)
