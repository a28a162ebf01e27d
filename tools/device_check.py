#!/usr/bin/env python
"""HieraDet on a GPU: correctness against birder, speed and memory (``--help``; docs/gpu.md).
Run it through tools/device_check.sh, which puts the repository on PYTHONPATH. The check
itself: hieradet_mmdet.benchmark.device_check."""

import sys

from hieradet_mmdet.benchmark.device_check import main

if __name__ == "__main__":
    sys.exit(main())
