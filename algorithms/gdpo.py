"""GDPO: group reward-decoupled normalisation of several reward components, then the GRPO loss.

Source: "GDPO: Group reward-Decoupled Normalization Policy Optimization for Multi-reward RL Optimization"
(arXiv:2601.05242). Shape letters: B prompts, G generations per prompt, K reward components.
"""
from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

from algorithms import common
from algorithms import grpo

# GDPO trains with the GRPO clipped surrogate unchanged.
loss = grpo.loss


def advantages(rewards: jax.Array, weights: Optional[jax.Array] = None, *, eps: float = 1e-4,
               ddof: int = 1) -> jax.Array:
  """Per-component group normalisation, weighted sum, then whitening over the whole batch.

    A_k  = (r_k - nanmean_g r_k) / (nanstd_g(r_k; ddof) + eps)      per prompt, per component
    A    = sum_k w_k * A_k                                           NaN components skipped
    A'   = A / (std(A; ddof) + eps)                                  over every row of the batch with a valid reward

  A component with fewer than 2 valid values (or constant) in a group contributes 0 there; a row whose K rewards
  are all NaN gets 0 and is left out of the whitening statistics. The batch mean of A is exactly 0 (each
  normalised component sums to 0 over the valid rows of its group), so it is not subtracted: subtracting it would
  only add rounding noise to rows that must stay 0 (constant groups). See arXiv:2601.05242 (the GDPO advantage,
  Sec. 3) and upstream TRL `multi_objective_aggregation="normalize_then_sum"` (huggingface/trl PR #4785).

  Args:
    rewards: [B, G, K] reward components (NaN = does not apply to this row).
    weights: [K] component weights; None means all ones.
    eps: added to each std.
    ddof: delta degrees of freedom of both stds.

  Returns:
    float32 [B, G] advantages; their batch mean is 0 and their std about 1.

  Warning:
    Whitening is per sequence over the GLOBAL batch (TRL), not per token as in NVlabs' verl-GDPO
    (`masked_whiten`), whose length-weighted mean gives constant groups a spurious advantage. NVlabs' TRL fork
    runs `nan_to_num` first, treating "not applicable" as reward 0; we ignore NaNs instead. Call it on the whole
    rollout batch, not per shard. With K = 1 the result is GRPO's advantage times a global constant.
  """
  chex.assert_rank(rewards, 3)
  summed = advantages_before_whitening(rewards, weights, eps=eps, ddof=ddof)  # [B, G]
  row_valid = jnp.any(~jnp.isnan(common.f32(rewards)), axis=-1)  # [B, G]
  _, std, _, _ = common.group_stats(summed.reshape(1, -1), row_valid.reshape(1, -1), ddof=ddof)
  return jnp.where(row_valid, summed / (std[0, 0] + eps), 0.0)


def advantages_before_whitening(rewards: jax.Array, weights: Optional[jax.Array] = None, *, eps: float = 1e-4,
                                ddof: int = 1) -> jax.Array:
  """The weighted sum of per-component group-normalised rewards, A = sum_k w_k A_k (steps 1-2 of `advantages`).

  Args:
    rewards: [B, G, K]; weights: [K] or None; eps, ddof as in `advantages`.

  Returns:
    float32 [B, G].
  """
  chex.assert_rank(rewards, 3)
  r = common.f32(rewards)
  num_k = r.shape[-1]
  w = jnp.ones((num_k,), jnp.float32) if weights is None else common.f32(weights)
  chex.assert_shape(w, (num_k,))
  rk = jnp.moveaxis(r, -1, 1)  # [B, K, G]
  valid = ~jnp.isnan(rk)
  mean, std, count, constant = common.group_stats(rk, valid, ddof=ddof)
  norm = jnp.where(valid & (count >= 2) & ~constant, (rk - mean) / (std + eps), 0.0)
  return jnp.einsum("bkg,k->bg", norm, w)
