"""Shape buckets: sequences and batches are padded up to the smallest configured size that holds them, so each
program compiles once per bucket (``data.buckets``, ``sampler.batch_buckets``)."""
from __future__ import annotations

from typing import Sequence


def pick_bucket(size: int, buckets: Sequence[int], what: str = "length") -> int:
  """The smallest bucket ``>= size`` (``size`` itself when there are no buckets); ValueError naming ``what``
  when none holds it."""
  if not buckets:
    return size
  for b in sorted(buckets):
    if b >= size:
      return b
  raise ValueError(f"{what} {size} exceeds the largest bucket {max(buckets)}; add a larger bucket")


def round_up(size: int, multiple: int) -> int:
  """``size`` rounded up to a multiple of ``multiple``."""
  return -(-size // multiple) * multiple


def shrinking_buckets(rows: int) -> tuple[int, ...]:
  """Batch buckets for calls whose rows shrink as rows finish: ``rows`` / 8, / 4, / 2 and ``rows`` (at least 1)."""
  return tuple(sorted({max(1, rows // d) for d in (8, 4, 2, 1)}))
