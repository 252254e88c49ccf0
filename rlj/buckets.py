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
