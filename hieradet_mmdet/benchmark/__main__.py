"""``python -m hieradet_mmdet.benchmark``: tools/benchmark.py's command line (also how it runs a
case in a process of its own)."""

from .cli import main

main()
