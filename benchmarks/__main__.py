"""``python -m benchmarks`` (from the repository): tools/benchmark.py's command line (also how it runs a
case in a process of its own)."""

import sys

from .cli import main

sys.exit(1 if (main() or {}).get("checks_failed") else 0)
