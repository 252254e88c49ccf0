"""GRPO family: group-relative advantages (GRPO, Lite PPO batch std, Dr. GRPO), RLOO, and the clipped surrogate.

Shape letters: B prompts, G generations per prompt, N = B*G sequences (group-major: row b*G + g), T tokens.
"""
from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

from algorithms import common
from algorithms import kl as kl_lib

SCALES = ("group", "batch", "none")


def advantages(rewards: jax.Array, *, scale: str = "group", eps: float = 1e-4, ddof: int = 1) -> jax.Array:
  """Group-relative advantages.

  A_bg = (r_bg - mean_g r_b) / (s + eps), with
    s = std_g(r_b; ddof)                     scale="group"  (DeepSeekMath, arXiv:2402.03300, Sec. 4.1.2)
    s = std(all valid rewards; ddof)          scale="batch"  (Lite PPO, arXiv:2508.08221; TRL scale_rewards="batch")
    A_bg = r_bg - mean_g r_b                  scale="none"   (Dr. GRPO, arXiv:2503.20783, Sec. 3.2)

  NaN rewards are ignored; a group with fewer than 2 valid rewards, a constant group and every NaN entry get
  an advantage of exactly 0.

  Args:
    rewards: [B, G] scalar rewards (NaN = missing).
    scale: "group" | "batch" | "none".
    eps: added to the std (not inside the square root).
    ddof: delta degrees of freedom of the std.

  Returns:
    float32 [B, G] advantages.

  Warning:
    Implementations differ: TRL uses ddof=1 and eps=1e-4 (ours), verl and tunix ddof=1 with eps=1e-6, maxtext
    ddof=0. verl gives singleton groups mean 0 / std 1 (the raw reward becomes the advantage); we give them 0.
    The "batch" statistics are over the whole array passed in: call it on the global batch (under `jit` with
    global arrays), not per shard.
  """
  chex.assert_rank(rewards, 2)
  r = common.f32(rewards)
  valid = ~jnp.isnan(r)
  mean, std, count, constant = common.group_stats(r, valid, ddof=ddof)
  centered = jnp.where(valid, r - mean, 0.0)
  if scale == "group":
    adv = centered / (std + eps)
  elif scale == "batch":
    flat_mean, flat_std, _, _ = common.group_stats(r.reshape(1, -1), valid.reshape(1, -1), ddof=ddof)
    del flat_mean
    adv = centered / (flat_std + eps)
  elif scale == "none":
    adv = centered
  else:
    raise ValueError(f"unknown scale {scale!r}; choose one of {sorted(SCALES)}")
  return jnp.where(valid & (count >= 2) & ~constant, adv, 0.0)


def rloo_advantages(rewards: jax.Array) -> jax.Array:
  """Leave-one-out (RLOO) advantages: each reward minus the mean of the other rewards of its group.

  A_bg = r_bg - (1 / (n_b - 1)) * sum_{g' != g} r_bg' = n_b / (n_b - 1) * (r_bg - mean_g r_b),  n_b valid rewards.

  See "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs"
  (arXiv:2402.14740), Sec. 3.3 (the RLOO estimator, Eq. 4 of Kool et al. 2019 applied per prompt).

  Args:
    rewards: [B, G] scalar rewards (NaN = missing; such entries and groups with < 2 valid rewards get 0).

  Returns:
    float32 [B, G] advantages (not std-normalised; each group sums to 0).
  """
  chex.assert_rank(rewards, 2)
  r = common.f32(rewards)
  valid = ~jnp.isnan(r)
  mean, _, count, constant = common.group_stats(r, valid)
  adv = count / jnp.maximum(count - 1.0, 1.0) * (r - mean)
  return jnp.where(valid & (count >= 2) & ~constant, adv, 0.0)


def reward_metrics(rewards: jax.Array) -> dict[str, jax.Array]:
  """Scalar reward metrics of a [B, G] batch: mean, std, and the fraction of groups with zero std."""
  chex.assert_rank(rewards, 2)
  r = common.f32(rewards)
  valid = ~jnp.isnan(r)
  out = common.stats("reward", r, valid)
  out["frac_reward_zero_std"] = common.frac_constant_groups(r, valid)
  return out


def loss(logp: jax.Array, old_logp: jax.Array, ref_logp: Optional[jax.Array], adv: jax.Array, mask: jax.Array, *,
         clip_eps: float = 0.2, clip_eps_high: Optional[float] = None, dual_clip: Optional[float] = None,
         kl_coef=0.0, kl_estimator: str = "k3_ratio", agg: str = "token_mean", num_tokens=None, num_seqs=None,
         max_len: Optional[int] = None, num_generations: Optional[int] = None,
         token_weight: Optional[jax.Array] = None):
  """Clipped-surrogate policy loss of GRPO, with DAPO clip-higher, dual clip, a KL term and four aggregations.

  Per token, with rho = exp(clamp(logp - old_logp, -20, 20)) and A = adv[:, None] (or adv itself when it is
  per token, [N, T]: process supervision, ``algorithms.process``):
    l_pg = -min(rho * A, clip(rho, 1 - clip_eps, 1 + clip_eps_high) * A)
    l_pg = min(l_pg, -dual_clip * A)            where A < 0, when dual_clip is set
    l_pg = token_weight * l_pg                  when token_weight is given (``algorithms.mismatch.weights``)
    l    = l_pg + kl_coef * KL_kind(logp, ref_logp)
  then `common.aggregate(l, mask, agg=...)`.

  See "DeepSeekMath" (arXiv:2402.03300), Eq. 3 (GRPO objective, sequence-mean-token-mean, k3 KL of Eq. 4);
  "DAPO" (arXiv:2503.14476), Sec. 3.1 (clip-higher) and Sec. 3.3 (token-level loss); "Understanding R1-Zero-Like
  Training" (Dr. GRPO, arXiv:2503.20783); dual-clip PPO (arXiv:1912.09729).

  Args:
    logp: [N, T] log-probs under the current parameters (carries the gradient).
    old_logp: [N, T] log-probs under the sampling policy (stop-gradient applied).
    ref_logp: [N, T] log-probs under the reference (stop-gradient applied), or None when kl_coef is the Python 0.
    adv: [N] one advantage per sequence (e.g. `advantages(r).reshape(-1)`), or [N, T] one per token (e.g.
      `algorithms.process.advantages`); a [N, T] array whose rows are constant gives the loss of their [N].
    mask: [N, T] 1.0 on completion tokens up to and including the first EOS.
    clip_eps: epsilon_low.
    clip_eps_high: epsilon_high; None means clip_eps (DAPO uses 0.28).
    dual_clip: c > 1 caps the loss of A < 0 tokens at c * |A|; None disables it.
    kl_coef: beta (a float or a traced scalar, e.g. from an adaptive controller).
    kl_estimator: a `kl.estimate` kind; "k3_ratio" is the value of k3 with the gradient of the reverse KL.
    agg, num_tokens, num_seqs, max_len: see `common.aggregate`.
    num_generations: G; when given, the metrics include `frac_reward_zero_std` (groups whose advantages are
      all equal, `common.frac_constant_groups`: the constant-reward groups).
    token_weight: optional [N, T] weights of the per-token policy-gradient term (stop-gradient applied; not of
      the KL term), e.g. the sampler-trainer mismatch correction of `algorithms.mismatch.weights`.

  Returns:
    (loss, metrics): float32 scalar and a dict of float32 scalars.

  Warning:
    The KL term is added per token BEFORE aggregation (TRL semantics), so `agg` also weights it. The GRPO paper
    used k3 with beta=0.04 and sequence-mean-token-mean; our defaults (kl_coef=0, token_mean, k3_ratio) follow
    TRL/DAPO. Clip fractions count the tokens where the clip removes the gradient (TRL's definition:
    rho < 1 - eps with A < 0, rho > 1 + eps_high with A > 0).
  """
  chex.assert_rank([logp, old_logp, mask], 2)
  chex.assert_equal_shape([logp, old_logp, mask])
  per_token_adv = adv.ndim == 2
  if per_token_adv:
    chex.assert_equal_shape([logp, adv])
  else:
    chex.assert_rank(adv, 1)
    chex.assert_equal_shape_prefix([logp, adv], 1)
  eps_low = clip_eps
  eps_high = clip_eps if clip_eps_high is None else clip_eps_high
  logp, old_logp, mask = common.f32(logp, old_logp, mask)
  old_logp = jax.lax.stop_gradient(old_logp)
  a = jax.lax.stop_gradient(common.f32(adv))
  a = a if per_token_adv else a[:, None]  # [N, T] or [N, 1]

  log_ratio = logp - old_logp
  ratio = jnp.exp(common.clamp_log_ratio(log_ratio))  # [N, T]
  unclipped = ratio * a
  clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * a
  pg = -jnp.minimum(unclipped, clipped)
  metrics = {}
  if dual_clip is not None:
    if not dual_clip > 1.0:
      raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    capped = jnp.minimum(pg, -dual_clip * a)
    metrics["clip_frac_dual"] = common.masked_mean((a < 0) & (pg > -dual_clip * a), mask)
    pg = jnp.where(a < 0, capped, pg)
  if token_weight is not None:
    chex.assert_equal_shape([logp, token_weight])
    pg = jax.lax.stop_gradient(common.f32(token_weight)) * pg

  per_token = pg
  if ref_logp is None:
    if not (isinstance(kl_coef, (int, float)) and kl_coef == 0):
      raise ValueError("ref_logp is None but kl_coef is not 0")
  else:
    chex.assert_equal_shape([logp, ref_logp])
    kl = kl_lib.estimate(logp, ref_logp, kl_estimator, old_logp=old_logp)
    per_token = pg + kl_coef * kl
    metrics["kl"] = common.masked_mean(jax.lax.stop_gradient(kl), mask)

  total = common.aggregate(per_token, mask, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)

  ratio_sg = jax.lax.stop_gradient(ratio)
  lo, hi = common.masked_min_max(ratio_sg, mask)
  metrics.update({
      "pg_loss": common.aggregate(jax.lax.stop_gradient(pg), mask, agg=agg, num_tokens=num_tokens,
                                  num_seqs=num_seqs, max_len=max_len),
      "clip_frac_low": common.masked_mean((ratio_sg < 1.0 - eps_low) & (a < 0), mask),
      "clip_frac_high": common.masked_mean((ratio_sg > 1.0 + eps_high) & (a > 0), mask),
      "ratio_mean": common.masked_mean(ratio_sg, mask),
      "ratio_min": lo,
      "ratio_max": hi,
      "num_clamped": common.num_clamped(jax.lax.stop_gradient(log_ratio), mask),
      "num_tokens": jnp.sum(mask),
  })
  if per_token_adv:  # statistics over the tokens; constant groups are a notion of per-sequence advantages
    metrics.update(common.stats("adv", a, mask))
    return total, metrics
  rows = (jnp.sum(mask, axis=-1) > 0).astype(jnp.float32)
  metrics.update(common.stats("adv", a[:, 0], rows))
  if num_generations is not None:
    metrics["frac_reward_zero_std"] = common.frac_constant_groups(a[:, 0].reshape(-1, num_generations))
  return total, metrics
