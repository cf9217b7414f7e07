"""Benchmarks: the paper's comparison on real data, and simulation speed.

  python -m benchmarks --rounds=200 --output_dir=runs/benchmark   # accuracy vs upload
  python -m benchmarks.speed --output_dir=runs/speed              # seconds per round
"""
