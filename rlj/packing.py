"""Sequence packing: the real tokens of a batch's rows, without their padding, laid end to end in fewer rows.

A rollout row is a left-padded prompt and a completion padded to T; with the spread of lengths real rollouts
have, much of a teacher-forced pass over [N, P + T] runs on padding. ``pack`` (host, numpy) keeps of each row
only what its trained tokens need, its real (``attn_mask``) columns up to the one that predicts its last
trained completion token, and packs these segments into bins as wide as the rows (S = P + T), first fit by
decreasing length. Each segment has its own positions 0, 1, ... (those of the unpacked row:
``max(cumsum(attn_mask) - 1, 0)``) and its own segment id, and the model attends only within a segment
(``models.transformer.Transformer`` with ``segment_ids``: the einsum mask, the splash kernel's segment ids).
``pack_index`` lists, per group, the packed positions whose hidden states predict the trained completion tokens,
and ``pack_slot[n, t]`` where token t of row n sits in that list. The model's output projection then runs on
the trained tokens only, never on the padding of short completions (``rlj.logprobs.packed_completion_logprobs``:
``unpack`` gathers their final hidden states, ``to_rows`` puts their log-probs back in [N, T]), and the log-probs,
the loss and its gradients are those of the unpacked batch. A row with no trained token takes no space.

Groups: the rows are packed in G contiguous groups of N / G rows, every group into the same number kb of bins
(the largest need, rounded up to a bucket), with ``index`` local to its group. The trainer makes a group one
(micro-batch, batch shard) pair (``groups_for``): splitting the leading axis into micro-batches splits rows and
bins alike, and the gather runs on each shard's own rows under ``jax.shard_map`` (no all-gather of the hidden
states). Buckets: one j = 1..8 sizes both a group's bins, kb = ceil(r * j / 8) for r rows per group, and its list
of trained tokens, m = ceil(r * T * j / 8) (the smallest j that holds both), so a packed program compiles at most
eight times per row width.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from rlj import sharding

KEYS = ("pack_tokens", "pack_segments", "pack_positions", "pack_index", "pack_targets", "pack_slot")
BUCKETS = 8


def bucket_of(need: int, size: int) -> int:
  """The smallest j = 1..8 with ceil(size * j / 8) >= ``need``."""
  for j in range(1, BUCKETS + 1):
    if max(1, -(-size * j // BUCKETS)) >= need:
      return j
  raise ValueError(f"{need} items do not fit in {size}")


def bucket_size(size: int, j: int) -> int:
  """ceil(size * j / 8), at least 1."""
  return max(1, -(-size * j // BUCKETS))


def bins_bucket(need: int, rows: int) -> int:
  """The smallest ceil(rows * j / 8), j = 1..8, that holds ``need`` bins (at least 1)."""
  try:
    return bucket_size(rows, bucket_of(need, rows))
  except ValueError:
    raise ValueError(f"{need} bins for {rows} rows: a row's segment is never wider than its row") from None


def segments(attn_mask: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Which columns of each row the packed row keeps: [N, S] bool.

  A row keeps its real columns (``attn_mask``) up to the one before its last trained completion token (``mask``,
  [N, T] over the last T columns): the last token is only a target, and nothing after it changes a trained
  log-prob (the model is causal).

  Raises:
    ValueError: a trained completion token whose preceding column is padding (its log-prob would be read from a
      padding position, which packing does not keep).
  """
  attn, m = np.asarray(attn_mask) > 0, np.asarray(mask) > 0
  s, t = attn.shape[1], m.shape[1]
  p = s - t
  if p < 1:
    raise ValueError(f"rows of width {s} have no prompt before their {t} completion columns")
  if np.any(m & ~attn[:, p - 1:s - 1]):
    n = int(np.argmax(np.any(m & ~attn[:, p - 1:s - 1], axis=1)))
    raise ValueError(f"row {n}: a trained completion token follows a padding column; packing needs the column "
                     "before every trained token to be real (attn_mask 1)")
  has = m.any(axis=1)
  last = np.where(has, p - 1 + (t - 1 - np.argmax(m[:, ::-1], axis=1)), -1)    # column predicting the last token
  return attn & (np.arange(s)[None, :] <= last[:, None])


def _first_fit(lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, int]:
  """First fit by decreasing length: (bin, offset) of each item ([r] each; items of length 0 get bin 0) and the
  number of bins used."""
  order = np.argsort(-lengths, kind="stable")
  free = np.zeros(len(lengths), np.int64)     # at most one bin per item
  used = 0
  bins, offsets = np.zeros(len(lengths), np.int64), np.zeros(len(lengths), np.int64)
  for i in order:
    size = lengths[i]
    if size == 0:
      break                                   # the rest are empty too (decreasing order)
    fits = np.flatnonzero(free[:used] >= size)
    b = int(fits[0]) if fits.size else used
    if b == used:
      free[b], used = width, used + 1
    bins[i], offsets[i] = b, width - free[b]
    free[b] -= size
  return bins, offsets, used


def pack(tokens: np.ndarray, attn_mask: np.ndarray, mask: np.ndarray, *, groups: int = 1, pad_id: int = 0,
         bins: int | None = None) -> dict[str, np.ndarray]:
  """Packs rows of prompt + completion into rows of the same width S.

  Args:
    tokens: [N, S] int prompt + completion (left-padded prompt).
    attn_mask: [N, S] 1 on real tokens.
    mask: [N, T] the trained completion tokens (the last T columns).
    groups: G; N must divide by it (contiguous groups of r = N / G rows, each packed into its own bins).
    pad_id: the token of unused packed slots.
    bins: kb, bins per group, instead of the bucket of the largest need (it must hold every group).

  Returns:
    ``pack_tokens`` [G * kb, S] int32, ``pack_segments`` [G * kb, S] int32 (0 on unused slots, 1, 2, ... for the
    segments of a bin), ``pack_positions`` [G * kb, S] int32; per group a list of m trained tokens (row-major,
    padded with 0): ``pack_index`` [G * m] int32, the flat position (bin within the group * S + slot) that predicts
    the token, and ``pack_targets`` [G * m] int32, the token; ``pack_slot`` [N, T] int32, where completion token t
    of row n sits in its group's list (0 where ``mask`` is 0).
  """
  tokens = np.asarray(tokens)
  n, s = tokens.shape
  t = np.asarray(mask).shape[1]
  if groups < 1 or n % groups:
    raise ValueError(f"{n} rows do not split into {groups} packing groups")
  keep = segments(attn_mask, mask)
  lengths = keep.sum(axis=1)
  m = np.asarray(mask) > 0
  r = n // groups
  placed = [_first_fit(lengths[g * r:(g + 1) * r], s) for g in range(groups)]
  need = max(used for _, _, used in placed)
  trained = int(max(m[g * r:(g + 1) * r].sum() for g in range(groups)))
  j_tokens = bucket_of(trained, r * t)
  if bins is None:
    j = max(bucket_of(need, r), j_tokens)     # a nonempty row needs at most one bin: need <= r
    kb = bucket_size(r, j)
  else:
    j, kb = j_tokens, int(bins)
  if kb < need:
    raise ValueError(f"bins={kb} per group cannot hold rows that need {need}")
  mt = bucket_size(r * t, j)
  out = {"pack_tokens": np.full((groups * kb, s), pad_id, np.int32),
         "pack_segments": np.zeros((groups * kb, s), np.int32),
         "pack_positions": np.zeros((groups * kb, s), np.int32),
         "pack_index": np.zeros((groups * mt,), np.int32),
         "pack_targets": np.zeros((groups * mt,), np.int32),
         "pack_slot": np.zeros((n, t), np.int32)}
  rank = np.cumsum(keep, axis=1) - 1                                       # slot of each kept column in its segment
  for g, (b_of, off, _) in enumerate(placed):
    count = np.zeros(kb, np.int32)
    where = np.zeros((r, t), np.int64)                                    # predicting position of each token
    for j_row in np.flatnonzero(lengths[g * r:(g + 1) * r]):
      row, b, o, size = g * r + j_row, int(b_of[j_row]), int(off[j_row]), int(lengths[g * r + j_row])
      k = g * kb + b
      count[b] += 1
      out["pack_tokens"][k, o:o + size] = tokens[row, keep[row]]
      out["pack_segments"][k, o:o + size] = count[b]
      out["pack_positions"][k, o:o + size] = np.arange(size, dtype=np.int32)
      where[j_row] = b * s + o + rank[row, s - t - 1:s - 1]
    mg = m[g * r:(g + 1) * r]
    rows_of, cols_of = np.nonzero(mg)                                    # row-major: the list's order
    out["pack_index"][g * mt:g * mt + rows_of.size] = where[rows_of, cols_of]
    out["pack_targets"][g * mt:g * mt + rows_of.size] = tokens[g * r + rows_of, s - t + cols_of]
    out["pack_slot"][g * r + rows_of, cols_of] = np.arange(rows_of.size, dtype=np.int32)
  return out


def worst_case(rows: int, width: int, completion_len: int) -> dict[str, np.ndarray]:
  """Packing arrays of the largest bucket (a bin per row, every completion token trained: rows that fill their
  width pack no better), the shapes ``launch.aot`` compiles a packed program at. Zeros: only shapes and dtypes
  matter."""
  zeros = lambda *shape: np.zeros(shape, np.int32)  # noqa: E731
  return {"pack_tokens": zeros(rows, width), "pack_segments": zeros(rows, width),
          "pack_positions": zeros(rows, width), "pack_index": zeros(rows * completion_len),
          "pack_targets": zeros(rows * completion_len), "pack_slot": zeros(rows, completion_len)}


def fill(packed: Mapping[str, np.ndarray]) -> float:
  """The fraction of packed slots that hold a token."""
  seg = packed["pack_segments"]
  return float((seg > 0).sum() / max(seg.size, 1))


def batch_axes(mesh, rules=sharding.DEFAULT_RULES) -> Any:
  """The mesh axes the batch is split over (the "batch" rule), or None."""
  spec = sharding.logical_to_spec(("batch",), mesh, rules)
  return spec[0] if len(spec) else None


def group_shards(mesh, rules, rows: int) -> int:
  """Batch shards a chunk of ``rows`` rows is packed for: the batch axes' size when it divides ``rows``, else 1.
  The host (``groups_for``) and the device (``unpack``) both ask here, so their layouts agree."""
  if mesh is None:
    return 1
  dp = sharding.data_parallel_size(mesh, sharding.DEFAULT_RULES if rules is None else rules)
  return dp if dp > 1 and rows % dp == 0 else 1


def groups_for(rows: int, chunks: int, mesh, rules) -> int:
  """Packing groups of ``rows`` rows run in ``chunks`` chunks (micro-batches, log-prob row chunks) on ``mesh``."""
  if rows % chunks:
    raise ValueError(f"{rows} rows do not split into {chunks} chunks")
  return chunks * group_shards(mesh, rules, rows // chunks)


def _per_group(fn, rows: int, mesh, rules, *arrays):
  """``fn`` on each batch shard's own group (``group_shards`` of ``rows`` rows) under ``jax.shard_map``, or on
  the whole arrays when there is one shard: every array's leading axis splits over the shards."""
  shards = group_shards(mesh, rules, rows)
  if shards == 1:
    return fn(*arrays)
  if any(x.shape[0] % shards for x in arrays):
    raise ValueError(f"packed arrays of {[x.shape[0] for x in arrays]} rows do not split over {shards} batch shards")
  axes = batch_axes(mesh, sharding.DEFAULT_RULES if rules is None else rules)
  spec = P(axes)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * len(arrays), out_specs=spec)(*arrays)


def unpack(hidden: jax.Array, index: jax.Array, *, rows: int, mesh=None, rules=None) -> jax.Array:
  """The hidden states of a group's listed positions: hidden [K, S, D], index [G * m] -> [G * m, D].

  ``rows``: the N rows these groups pack (``group_shards``). With ``mesh`` and more than one batch shard, each
  shard gathers from its own bins under ``jax.shard_map``: ``index`` is local to a group, and a group is a
  shard's rows.
  """
  return _per_group(lambda h, i: h.reshape((-1, h.shape[-1]))[i], rows, mesh, rules, hidden, index)


def to_rows(values: jax.Array, slot: jax.Array, *, mesh=None, rules=None) -> jax.Array:
  """Per-token values of the groups' lists back in rows: values [G * m], slot [N, T] -> [N, T] (``slot`` local
  to its group; where the mask is 0 the value is another token's, to be weighted by 0)."""
  return _per_group(lambda v, i: v[i], slot.shape[0], mesh, rules, values, slot)


def packed_batch(batch: Mapping[str, Any], *, chunks: int, mesh, rules, pad_id: int) -> dict:
  """``batch`` with the packing of its rows added (``KEYS``), for a program that runs them in ``chunks`` chunks."""
  rows = batch["tokens"].shape[0]
  out = dict(batch)
  out.update(pack(batch["tokens"], batch["attn_mask"], batch["mask"], groups=groups_for(rows, chunks, mesh, rules),
                  pad_id=pad_id))
  return out


def of(batch: Mapping[str, Any]) -> dict | None:
  """The packing arrays of a batch, or None when it is not packed."""
  if "pack_tokens" not in batch:
    return None
  return {k: batch[k] for k in KEYS}
