"""DAPO options that live outside the loss: dynamic-sampling group filter, overlong shaping and filtering.

Clip-higher and the token-level loss are `grpo.loss(clip_eps_high=0.28, agg="token_mean")`.
Source: "DAPO: An Open-Source LLM Reinforcement Learning System at Scale" (arXiv:2503.14476).
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from algorithms import common


def dynamic_sampling_keep(metric: jax.Array) -> jax.Array:
  """Keeps a group iff its metric is not constant (std_g > 0), i.e. 0 < #correct < G for 0/1 accuracy.

  See DAPO (arXiv:2503.14476), Sec. 3.2 "Dynamic Sampling" (the 0 < #correct < G constraint of the DAPO objective).
  Inside `jit` this is only a mask: the host loop drops rejected groups and samples more until the batch is full.

  Args:
    metric: [B, G] per-completion metric (accuracy or reward); NaN entries are ignored.

  Returns:
    bool [B]: True for groups to keep (at least 2 valid values that are not all equal).
  """
  chex.assert_rank(metric, 2)
  m = common.f32(metric)
  valid = ~jnp.isnan(m)
  _, _, count, constant = common.group_stats(m, valid)
  return ((count >= 2) & ~constant)[:, 0]


def overlong_penalty(lengths: jax.Array, *, max_len: int, buffer_len: int, penalty: float = 1.0) -> jax.Array:
  """Soft overlong punishment, added to the task reward before the advantages.

  R_len(y) = 0                                      if |y| <= L - L_c
           = -p * (|y| - (L - L_c)) / L_c           if L - L_c < |y| <= L
           = -p                                     if |y| > L
  with L = max_len, L_c = buffer_len, p = penalty. See DAPO (arXiv:2503.14476), Sec. 3.4 "Overlong Reward Shaping" (R_length).

  Args:
    lengths: [N] completion lengths in tokens.
    max_len: L (the paper: 20480).
    buffer_len: L_c > 0 (the paper: 4096).
    penalty: p (the paper: 1).

  Returns:
    float32 [N] length reward (<= 0), continuous and non-increasing in the length.
  """
  if not 0 < buffer_len <= max_len:
    raise ValueError(f"need 0 < buffer_len <= max_len, got buffer_len={buffer_len}, max_len={max_len}")
  over = (common.f32(lengths) - (max_len - buffer_len)) / buffer_len
  return -penalty * jnp.clip(over, 0.0, 1.0)


def mask_truncated(mask: jax.Array, has_eos: jax.Array) -> jax.Array:
  """Overlong filtering: zeroes the mask of completions that never produced an EOS (cut at max_len).

  Like TRL `mask_truncated_completions`; DAPO (arXiv:2503.14476) Sec. 3.4 "Overlong Filtering". verl's docs note
  that the paper's best run did not use it, so it is off unless the trainer calls it.

  Args:
    mask: [N, T] completion mask.
    has_eos: [N] bool, True where the completion ended with an EOS.

  Returns:
    [N, T] mask (same dtype as `mask`).
  """
  chex.assert_rank([mask, has_eos], [2, 1])
  chex.assert_equal_shape_prefix([mask, has_eos], 1)
  return jnp.where(has_eos[:, None], mask, jnp.zeros_like(mask))
