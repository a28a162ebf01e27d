#!/usr/bin/env python
"""Speed, memory and FLOPs of HieraDet-S against birder's HieraDet-S, Swin-T and ResNet-50
(``--help``; docs/benchmarks.md). The benchmark itself: hieradet_mmdet.benchmark."""

from hieradet_mmdet.benchmark.cli import main

if __name__ == "__main__":
    main()
