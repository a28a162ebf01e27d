"""The pieces of tools/benchmark.py: cases (models, steps, timing), memory, FLOPs, reports."""
