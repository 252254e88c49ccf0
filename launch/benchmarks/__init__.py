"""Benchmark cases of ``python -m launch.bench`` (one module per case family)."""
