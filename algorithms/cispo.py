"""CISPO: the policy gradient weighted by a clipped, stop-gradient importance ratio, so no token loses its gradient.

Source: "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention" (arXiv:2506.13585), §3.1,
Eq. 4 (the objective) and Eq. 5 (the clipped weight). Shape letters: N sequences, T tokens.
"""
from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

from algorithms import common
from algorithms import kl as kl_lib


def loss(logp: jax.Array, old_logp: jax.Array, ref_logp: Optional[jax.Array], adv: jax.Array, mask: jax.Array, *,
         clip_eps: float = 1.0, clip_eps_high: float = 0.28, kl_coef=0.0, kl_estimator: str = "k3",
         agg: str = "token_mean", num_tokens=None, num_seqs=None, max_len: Optional[int] = None):
  """CISPO's token-level REINFORCE with clipped importance weights.

    r_it  = pi_theta(o_it) / pi_old(o_it) = exp(clamp(logp - old_logp))
    w_it  = sg(clip(r_it, 1 - eps_low, 1 + eps_high))                                   Eq. 5
    J     = (1 / sum_i |o_i|) sum_i sum_t w_it A_i log pi_theta(o_it)                     Eq. 4

  The loss is -J aggregated with ``common.aggregate`` (``token_mean``, the paper's 1 / sum_i |o_i|, by default),
  plus kl_coef times the per-token KL when a reference is given. Unlike PPO's clip, a token whose ratio leaves the
  band keeps its gradient, only with a bounded weight.

  Args:
    logp, old_logp, ref_logp, adv, mask: as in ``algorithms.grpo.loss``.
    clip_eps: eps_low. The paper imposes no lower bound; the default 1.0 keeps none (ratios are positive).
    clip_eps_high: eps_high, the bound the paper tunes (our default: DAPO's 0.28).
    agg, num_tokens, num_seqs, max_len: see ``common.aggregate``.

  Returns:
    (loss, metrics) float32; ``clip_frac_low`` / ``clip_frac_high`` count the tokens whose weight is clipped.
  """
  chex.assert_rank([logp, old_logp, mask, adv], [2, 2, 2, 1])
  chex.assert_equal_shape([logp, old_logp, mask])
  logp, old_logp, mask = common.f32(logp, old_logp, mask)
  old_logp = jax.lax.stop_gradient(old_logp)
  a = jax.lax.stop_gradient(common.f32(adv))[:, None]
  log_ratio = logp - old_logp
  ratio = jax.lax.stop_gradient(jnp.exp(common.clamp_log_ratio(log_ratio)))
  weight = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps_high)
  per_token = -weight * a * logp
  total = common.aggregate(per_token, mask, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
  lo, hi = common.masked_min_max(ratio, mask)
  metrics = {"pg_loss": jax.lax.stop_gradient(total),
             "clip_frac_low": common.masked_mean(ratio < 1.0 - clip_eps, mask),
             "clip_frac_high": common.masked_mean(ratio > 1.0 + clip_eps_high, mask),
             "ratio_mean": common.masked_mean(ratio, mask), "ratio_min": lo, "ratio_max": hi,
             "num_clamped": common.num_clamped(jax.lax.stop_gradient(log_ratio), mask), "num_tokens": jnp.sum(mask)}
  kl_term, kl_metrics = kl_lib.penalty(logp, ref_logp, mask, coef=kl_coef, kind=kl_estimator, agg=agg,
                                       num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
  total = total + kl_term
  metrics.update(kl_metrics)
  rows = (jnp.sum(mask, axis=-1) > 0).astype(jnp.float32)
  metrics.update(common.stats("adv", a[:, 0], rows))
  return total, metrics
