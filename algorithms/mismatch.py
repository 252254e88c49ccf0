"""Sampler-trainer mismatch: how far the rollout engine's log-probs are from the trainer's, and the importance
weights that correct the policy gradient for it.

The sampler (a KV-cache decode program, possibly in bfloat16) and the trainer (a teacher-forced pass) compute the
log-probs of the same tokens under the same parameters with different programs. The tokens are drawn from the
sampler's distribution pi_s, while the objective is written for the trainer's pi_t, so the update is slightly
off-policy. With d_t = logp_trainer - logp_sampler on completion token t of sequence i:

  token weight      w_it = exp(d_it) = pi_t(o_it) / pi_s(o_it)
  sequence weight   w_i  = exp(mean_t d_it)       (the geometric mean of the token weights of the sequence)

  truncate (TIS):   w -> min(w, high)
  mask:             w -> w if low <= w <= high, else 0

The weight multiplies the per-token policy-gradient term (never the KL term), as in truncated importance sampling:
E. L. Ionides, "Truncated Importance Sampling", J. Comput. Graph. Stat. 17(2), 2008 (the estimator with weights
min(w, tau)), applied to the rollout / trainer mismatch by F. Yao, L. Liu et al., "Your Efficient RL Framework
Secretly Brings You Off-Policy RL Training" (2025 blog, section "Truncated Importance Sampling"): the policy
gradient E_{a ~ pi_sampler}[min(pi_trainer(a; theta_old) / pi_sampler(a; theta_old), C) * grad ...].

Warning:
  Conventions differ. TRL (``vllm_importance_sampling_mode``, the same four mode names) masks only above the cap
  and uses the sequence product; verl's rollout correction offers token / sequence / geometric-mean levels with
  both thresholds. Here the sequence level is the geometric mean, masks use both thresholds, and truncation only
  the upper one. Every log-ratio is clamped to [-20, 20] before ``exp`` (``common.clamp_log_ratio``).

Shape letters: N sequences, T completion tokens.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from algorithms import common

MODES = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def _sequence_log_ratio(d: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of ``d`` over each row's valid tokens [N] (0 for a fully masked row)."""
  return jnp.sum(d * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def _prepare(trainer_logp, sampler_logp, mask):
  chex.assert_rank([trainer_logp, sampler_logp, mask], 2)
  chex.assert_equal_shape([trainer_logp, sampler_logp, mask])
  trainer_logp, sampler_logp, mask = common.f32(trainer_logp, sampler_logp, mask)
  d = jnp.where(mask > 0, trainer_logp - sampler_logp, 0.0)
  return d, mask


def weights(trainer_logp: jax.Array, sampler_logp: jax.Array, mask: jax.Array, *, mode: str, low: float,
            high: float) -> jax.Array:
  """Per-token importance weights [N, T] of the policy-gradient term (0 on masked tokens; ``mode="none"``: 1).

  Args:
    trainer_logp: [N, T] the trainer's log-probs of the sampled tokens under the rollout's parameters.
    sampler_logp: [N, T] the sampler's log-probs of the same tokens.
    mask: [N, T] 1.0 on completion tokens.
    mode: one of ``MODES``.
    low, high: the band [low, high] of the mask modes; truncation caps at ``high``.

  Returns:
    float32 [N, T], no gradient.
  """
  if mode not in MODES:
    raise ValueError(f"unknown mismatch correction {mode!r}; choose one of {MODES}")
  d, mask = _prepare(trainer_logp, sampler_logp, mask)
  if mode == "none":
    return mask
  if mode.startswith("sequence"):
    d = jnp.broadcast_to(_sequence_log_ratio(d, mask)[:, None], d.shape)
  w = jnp.exp(common.clamp_log_ratio(d))
  if mode.endswith("truncate"):
    w = jnp.minimum(w, high)
  else:
    w = jnp.where((w >= low) & (w <= high), w, 0.0)
  return jax.lax.stop_gradient(w * mask)


def diagnostics(trainer_logp: jax.Array, sampler_logp: jax.Array, mask: jax.Array, *, low: float,
                high: float) -> dict[str, jax.Array]:
  """Scalar mismatch metrics over completion tokens.

  - ``logp_abs_diff_mean`` / ``logp_abs_diff_max``: mean and max of |logp_sampler - logp_trainer|;
  - ``kl_k3``: the k3 estimate of KL(pi_s || pi_t) from tokens drawn from pi_s: mean of r - 1 - log r with
    r = pi_t / pi_s = exp(d) (Schulman, "Approximating KL Divergence", 2020; ``algorithms.kl``);
  - ``frac_tokens_out``: fraction of tokens whose weight exp(d) is outside [low, high];
  - ``frac_seqs_out``: fraction of sequences (with a token) whose geometric-mean weight is outside [low, high].

  Args: as in ``weights``.

  Returns:
    dict of float32 scalars.
  """
  d, mask = _prepare(trainer_logp, sampler_logp, mask)
  _, hi = common.masked_min_max(jnp.abs(d), mask)
  dc = common.clamp_log_ratio(d)
  w = jnp.exp(dc)
  seq_w = jnp.exp(common.clamp_log_ratio(_sequence_log_ratio(d, mask)))
  rows = (jnp.sum(mask, axis=-1) > 0).astype(mask.dtype)
  outside = lambda x: ((x < low) | (x > high)).astype(mask.dtype)
  return {"logp_abs_diff_mean": common.masked_mean(jnp.abs(d), mask), "logp_abs_diff_max": hi,
          "kl_k3": common.masked_mean(jnp.expm1(dc) - dc, mask),
          "frac_tokens_out": common.masked_mean(outside(w), mask),
          "frac_seqs_out": jnp.sum(outside(seq_w) * rows) / jnp.maximum(jnp.sum(rows), 1.0)}
