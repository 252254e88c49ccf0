"""GSPO: Group Sequence Policy Optimization, the clipped surrogate on a sequence-level importance ratio.

Source: "Group Sequence Policy Optimization" (Zheng et al., arXiv:2507.18071). Shape letters: N sequences, T tokens.
"""
from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

from algorithms import common
from algorithms import kl as kl_lib

VARIANTS = ("sequence", "token")


def sequence_log_ratio(logp: jax.Array, old_logp: jax.Array, mask: jax.Array) -> jax.Array:
  """log s_i = (1 / |y_i|) sum_t (logp - old_logp)[i, t] over the completion's tokens: [N] (0 for empty rows).

  s_i = (pi_theta(y_i | x) / pi_old(y_i | x))^(1 / |y_i|), the length-normalised sequence ratio of GSPO.
  """
  logp, old_logp, mask = common.f32(logp, old_logp, mask)
  length = jnp.sum(mask, axis=-1)
  return jnp.sum(mask * (logp - old_logp), axis=-1) / jnp.maximum(length, 1.0)


def loss(logp: jax.Array, old_logp: jax.Array, ref_logp: Optional[jax.Array], adv: jax.Array, mask: jax.Array, *,
         clip_eps: float = 3e-4, clip_eps_high: Optional[float] = None, variant: str = "sequence", kl_coef=0.0,
         kl_estimator: str = "k3", num_seqs=None):
  """GSPO's clipped surrogate with one importance ratio per sequence.

  With s_i = exp(clamp(log s_i)) (``sequence_log_ratio``) and A_i the group-normalised advantage:

    sequence (Eq. 5):  J = (1 / n_seq) sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)
    token (GSPO-token): s_it = sg[s_i] * pi_theta(y_it) / sg[pi_theta(y_it)]  (value s_i, gradient s_i grad logp_it)
                        J = (1 / n_seq) sum_i (1 / |y_i|) sum_t min(s_it A_i, clip(s_it, ...) A_i)

  The loss is -J (+ kl_coef times the per-token KL, sequence-mean-token-mean, when a reference is given). With
  one advantage per sequence the two variants have the same value and gradients (the paper's remark on
  GSPO-token); with one token per sequence s_i is GRPO's token ratio.

  Args:
    logp: [N, T] log-probs under the current parameters.
    old_logp: [N, T] log-probs under the sampling policy (stop-gradient applied).
    ref_logp: [N, T] reference log-probs, or None when ``kl_coef`` is the Python 0.
    adv: [N] advantages.
    mask: [N, T] 1.0 on completion tokens.
    clip_eps, clip_eps_high: the sequence clip range (the paper uses 3e-4 and 4e-4: sequence ratios are
      geometric means and stay far closer to 1 than token ratios); ``clip_eps_high`` None means ``clip_eps``.
    variant: "sequence" or "token".
    num_seqs: n_seq of the whole optimizer step (for summed micro-batches); None counts the non-empty rows.

  Returns:
    (loss, metrics) float32; ``clip_frac`` counts the sequences whose clip removes the gradient.
  """
  chex.assert_rank([logp, old_logp, mask, adv], [2, 2, 2, 1])
  chex.assert_equal_shape([logp, old_logp, mask])
  if variant not in VARIANTS:
    raise ValueError(f"unknown GSPO variant {variant!r}; choose one of {VARIANTS}")
  eps_low, eps_high = clip_eps, clip_eps if clip_eps_high is None else clip_eps_high
  logp, old_logp, mask = common.f32(logp, old_logp, mask)
  old_logp = jax.lax.stop_gradient(old_logp)
  a = jax.lax.stop_gradient(common.f32(adv))
  log_s = common.clamp_log_ratio(sequence_log_ratio(logp, old_logp, mask))     # [N]
  s = jnp.exp(log_s)
  rows = (jnp.sum(mask, axis=-1) > 0).astype(jnp.float32)
  n_seq = jnp.sum(rows) if num_seqs is None else common.f32(num_seqs)
  if variant == "sequence":
    obj = jnp.minimum(s * a, jnp.clip(s, 1.0 - eps_low, 1.0 + eps_high) * a)                 # [N]
    total = -jnp.sum(obj * rows) / jnp.maximum(n_seq, 1.0)
  else:
    s_t = jax.lax.stop_gradient(s)[:, None] * jnp.exp(logp - jax.lax.stop_gradient(logp))   # [N, T]
    obj_t = jnp.minimum(s_t * a[:, None], jnp.clip(s_t, 1.0 - eps_low, 1.0 + eps_high) * a[:, None])
    total = common.aggregate(-obj_t, mask, agg="seq_mean_token_mean", num_seqs=num_seqs)
  s_sg = jax.lax.stop_gradient(s)
  clipped = ((s_sg < 1.0 - eps_low) & (a < 0)) | ((s_sg > 1.0 + eps_high) & (a > 0))
  metrics = {"pg_loss": jax.lax.stop_gradient(total), "clip_frac": common.masked_mean(clipped, rows),
             "seq_ratio_mean": common.masked_mean(s_sg, rows)}
  lo, hi = common.masked_min_max(s_sg, rows)
  metrics.update(seq_ratio_min=lo, seq_ratio_max=hi, num_tokens=jnp.sum(mask))
  kl_term, kl_metrics = kl_lib.penalty(logp, ref_logp, mask, coef=kl_coef, kind=kl_estimator,
                                       agg="seq_mean_token_mean", num_seqs=num_seqs)
  total = total + kl_term
  metrics.update(kl_metrics)
  metrics.update(common.stats("adv", a, rows))
  return total, metrics
