"""Pieces shared by the policy losses: log-ratio clamp, masked statistics and loss aggregation.

Everything here is a pure function of arrays, computed in float32, with shapes checked at trace time.
Shape letters: B prompts, G generations per prompt, N = B*G sequences, T completion tokens.
"""
from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

# Every exponentiated log-ratio is clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] before `exp` (a numerical guard,
# not a trust region; same value as verl and tunix).
LOG_RATIO_CLAMP = 20.0

AGG_MODES = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum", "dr_grpo")


def f32(*xs):
  """Casts every argument to float32 (bf16, ints and bools go up; float64 inputs, used by tests, stay float64)."""
  def cast(x):
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))
  out = tuple(cast(x) for x in xs)
  return out[0] if len(out) == 1 else out


def adjacent_pairs(x: jax.Array) -> jax.Array:
  """Rows (2i, 2i+1) as pair i: [2M, ...] -> [M, 2, ...]. Pairwise losses keep a pair's members adjacent so that
  shuffles, minibatches and micro-batches split whole pairs."""
  if x.shape[0] % 2:
    raise ValueError(f"{x.shape[0]} rows do not form pairs of adjacent rows")
  return x.reshape((x.shape[0] // 2, 2) + x.shape[1:])


def clamp_log_ratio(log_ratio: jax.Array) -> jax.Array:
  """Clamps a log-ratio to [-20, 20] so that `exp` of it stays finite."""
  return jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def num_clamped(log_ratio: jax.Array, mask: jax.Array) -> jax.Array:
  """Counts the valid entries whose log-ratio the clamp changes (a metric)."""
  return jnp.sum(jnp.where(jnp.abs(log_ratio) > LOG_RATIO_CLAMP, mask, 0.0))


def masked_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(jnp.where(mask > 0, x * mask, 0.0))


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of `x` over entries where `mask` > 0 (weighted by the mask); 0 when nothing is valid."""
  x, mask = f32(x, mask)
  return masked_sum(x, mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_min_max(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Min and max of `x` over valid entries; (0, 0) when nothing is valid."""
  x = f32(x)
  valid = mask > 0
  any_valid = jnp.any(valid)
  lo = jnp.min(jnp.where(valid, x, jnp.inf))
  hi = jnp.max(jnp.where(valid, x, -jnp.inf))
  return jnp.where(any_valid, lo, 0.0), jnp.where(any_valid, hi, 0.0)


def stats(prefix: str, x: jax.Array, mask: Optional[jax.Array] = None) -> dict[str, jax.Array]:
  """Scalar metrics `{prefix}_mean/std/min/max` of `x` over valid entries (population std)."""
  x = f32(x)
  mask = jnp.ones_like(x) if mask is None else f32(mask)
  mean = masked_mean(x, mask)
  std = jnp.sqrt(masked_mean(jnp.square(x - mean), mask))
  lo, hi = masked_min_max(x, mask)
  return {f"{prefix}_mean": mean, f"{prefix}_std": std, f"{prefix}_min": lo, f"{prefix}_max": hi}


def group_stats(x: jax.Array, valid: jax.Array, *, ddof: int = 1):
  """NaN-aware statistics along the last axis.

  Args:
    x: [..., G] values; entries where `valid` is False are ignored (they may be NaN).
    valid: [..., G] bool.
    ddof: delta degrees of freedom of the std.

  Returns:
    (mean [..., 1], std [..., 1], count [..., 1], constant [..., 1]) where `constant` is True when every valid
    value is equal (so that a constant group gets an advantage of exactly 0 whatever the rounding of its mean).
  """
  chex.assert_equal_shape((x, valid))
  x = f32(x)
  xz = jnp.where(valid, x, 0.0)
  count = jnp.sum(valid, axis=-1, keepdims=True).astype(jnp.float32)
  mean = jnp.sum(xz, axis=-1, keepdims=True) / jnp.maximum(count, 1.0)
  sq = jnp.where(valid, jnp.square(x - mean), 0.0)
  var = jnp.sum(sq, axis=-1, keepdims=True) / jnp.maximum(count - ddof, 1.0)
  hi = jnp.max(jnp.where(valid, x, -jnp.inf), axis=-1, keepdims=True)
  lo = jnp.min(jnp.where(valid, x, jnp.inf), axis=-1, keepdims=True)
  return mean, jnp.sqrt(var), count, hi == lo


def frac_constant_groups(x: jax.Array, valid: Optional[jax.Array] = None) -> jax.Array:
  """Fraction of groups (rows of [..., G]) whose valid values are all equal: the groups that carry no learning
  signal for a group-normalised advantage (reported as ``frac_reward_zero_std``). ``valid`` defaults to the
  non-NaN entries; a group with no valid value is not constant."""
  x = f32(x)
  valid = ~jnp.isnan(x) if valid is None else valid
  _, _, _, constant = group_stats(x, valid)
  return jnp.mean(constant.astype(jnp.float32))


def aggregate(loss: jax.Array, mask: jax.Array, *, agg: str = "token_mean", num_tokens=None, num_seqs=None,
              max_len: Optional[int] = None) -> jax.Array:
  """Reduces a per-token loss [N, T] to a scalar.

  With S_i = sum_t mask[i,t] * loss[i,t], |o_i| = sum_t mask[i,t], n_seq = number of rows with |o_i| > 0:

    seq_mean_token_mean:  sum_i (S_i / |o_i|) / n_seq      GRPO (arXiv:2402.03300, Eq. 3)
    token_mean:           sum_i S_i / n_tok                DAPO token-level loss (arXiv:2503.14476, Sec. 3.3)
    seq_mean_token_sum:   sum_i S_i / n_seq
    dr_grpo:              sum_i S_i / (n_seq * L)          Dr. GRPO (arXiv:2503.20783, Sec. 3.2)

  Fully masked rows contribute nothing and are not counted.

  Args:
    loss: [N, T] per-token loss.
    mask: [N, T] 1.0 on completion tokens that count.
    agg: one of `AGG_MODES`.
    num_tokens: n_tok of the whole optimizer step (every device, every micro-batch); `None` uses `mask.sum()`.
    num_seqs: n_seq of the whole optimizer step; `None` counts the non-empty rows of `mask`.
    max_len: L, the configured maximum completion length (a Python int); required by `dr_grpo`.

  Returns:
    float32 scalar.

  Warning:
    Pass the global `num_tokens` / `num_seqs` of the optimizer step and SUM micro-batch gradients
    (`optax.MultiSteps(use_grad_mean=False)`); local counts are right only when one call sees the whole step.
    TRL `grpo` / `dr_grpo` count fully masked rows in their denominators; we do not. `dr_grpo` divides by the
    configured `max_len`, never by the padded T.
  """
  chex.assert_rank(loss, 2)
  chex.assert_equal_shape((loss, mask))
  loss, mask = f32(loss, mask)
  per_seq_sum = jnp.sum(jnp.where(mask > 0, loss * mask, 0.0), axis=-1)  # [N]
  seq_len = jnp.sum(mask, axis=-1)  # [N]
  n_seq = jnp.sum(seq_len > 0).astype(jnp.float32) if num_seqs is None else f32(num_seqs)
  if agg == "seq_mean_token_mean":
    return jnp.sum(per_seq_sum / jnp.maximum(seq_len, 1e-8)) / jnp.maximum(n_seq, 1.0)
  if agg == "token_mean":
    n_tok = jnp.sum(mask) if num_tokens is None else f32(num_tokens)
    return jnp.sum(per_seq_sum) / jnp.maximum(n_tok, 1.0)
  if agg == "seq_mean_token_sum":
    return jnp.sum(per_seq_sum) / jnp.maximum(n_seq, 1.0)
  if agg == "dr_grpo":
    if max_len is None:
      raise ValueError("agg='dr_grpo' needs max_len (the configured maximum completion length)")
    return jnp.sum(per_seq_sum) / (jnp.maximum(n_seq, 1.0) * float(max_len))
  raise ValueError(f"unknown agg {agg!r}; choose one of {sorted(AGG_MODES)}")
