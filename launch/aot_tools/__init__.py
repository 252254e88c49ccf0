"""Helpers of ``python -m launch.aot``: TPU topologies, per-chip HBM accounting, FLOP counts."""
