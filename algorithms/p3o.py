"""P3O: Pairwise Proximal Policy Optimization on trajectory-level reward differences.

Source: "Pairwise Proximal Policy Optimization: Harnessing Relative Feedback for LLM Alignment" (arXiv:2310.00212).
Shape letters: B pairs (prompts), T completion tokens; axis 1 of every array holds the two completions (y1, y2).
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from algorithms import common

VARIANTS = ("joint", "separate")


def pair_up(x: jax.Array, num_generations: int) -> jax.Array:
  """Splits group-major rows into disjoint pairs (2j, 2j+1) within each group [inferred pairing for G > 2].

  Args:
    x: [B*G, ...] rows group-major (log-probs and masks [B*G, T]; rewards as `rewards[B, G].reshape(-1)`).
    num_generations: G, even.

  Returns:
    [B*G/2, 2, ...] pairs; pair i holds rows 2i and 2i+1, which always belong to the same prompt.
  """
  if num_generations % 2:
    raise ValueError(f"P3O pairs completions, so num_generations must be even, got {num_generations}")
  if x.shape[0] % num_generations:
    raise ValueError(f"{x.shape[0]} rows are not whole groups of {num_generations}")
  return common.adjacent_pairs(x)


def loss(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array, rewards: jax.Array, mask: jax.Array, *,
         clip_eps: float = 0.2, kl_coef=0.05, ratio_clip: float = 10.0, variant: str = "joint",
         avg_tokenwise: bool = False, scale_q: bool = False):
  """Pairwise P3O loss with the joint (trajectory-level) or separate (token-wise) clip.

  With lambda_k = sum_t mask * (logp - ref_logp)(y_k), lambda_k^old the same with old_logp:
    q     = sg[(r_1 - r_2) - kl_coef * (lambda_1 - lambda_2)]          KL-regularised reward difference
    rho_c = clip(sg[exp((lambda_1 - lambda_1^old) + (lambda_2 - lambda_2^old))], 1/ratio_clip, ratio_clip)
    d     = lambda_1 - lambda_2,   d_old = lambda_1^old - lambda_2^old
  joint:    loss = mean_pairs max(-q rho_c d, -q rho_c clip(d, d_old - clip_eps, d_old + clip_eps)) / 2
            (avg_tokenwise: sum_pairs max(...) / total tokens of both responses)
  separate: w = -q rho_c; y1 tokens give max(w logp_t, w clip(logp_t, old_logp_t +- clip_eps)), y2 tokens the
            same with -w; the sum is divided by the total token count of both responses.

  The unclipped gradient is the pairwise policy gradient of Thm. 1, E[(r1 - r2)/2 grad(log pi(y1) - log pi(y2))];
  the clipped objectives follow the first author's code (thwu1/trlx `AccelerateP3OTrainer.p3o_loss`,
  `clip_tokenwise=False` = joint, `True` = separate). Mapping the paper's V1/V2 to separate/joint is [inferred].

  Args:
    logp, old_logp, ref_logp: [B, 2, T] token log-probs (current, sampling policy, reference).
    rewards: [B, 2] scalar rewards (divide them by a running std outside; the loss keeps raw differences).
    mask: [B, 2, T] completion mask.
    clip_eps: clip range of the log-ratio difference (log space).
    kl_coef: beta of the KL-regularised reward difference.
    ratio_clip: rho is clipped to [1/ratio_clip, ratio_clip].
    variant: "joint" or "separate".
    avg_tokenwise: joint variant only; normalise by the token count instead of the pair count.
    scale_q: divide q by its batch std (off: the loss would depend on batch composition).

  Returns:
    (loss, metrics): float32 scalar and a dict of float32 scalars.

  Warning:
    Unlike PPO and GRPO there is no per-token advantage and no std normalisation: the loss is invariant to adding
    any per-prompt constant to both rewards. q uses the CURRENT parameters' KL (detached), not the KL at rollout
    time. The name "P3O" also denotes unrelated methods; this one is arXiv:2310.00212.
  """
  chex.assert_rank([logp, old_logp, ref_logp, mask, rewards], [3, 3, 3, 3, 2])
  chex.assert_equal_shape([logp, old_logp, ref_logp, mask])
  chex.assert_axis_dimension(logp, 1, 2)
  chex.assert_shape(rewards, logp.shape[:2])
  logp, old_logp, ref_logp, mask, rewards = common.f32(logp, old_logp, ref_logp, mask, rewards)
  old_logp = jax.lax.stop_gradient(old_logp)
  ref_logp = jax.lax.stop_gradient(ref_logp)
  rewards = jax.lax.stop_gradient(rewards)

  lam = jnp.sum(mask * (logp - ref_logp), axis=-1)  # [B, 2]
  lam_old = jnp.sum(mask * (old_logp - ref_logp), axis=-1)  # [B, 2]
  q = jax.lax.stop_gradient((rewards[:, 0] - rewards[:, 1]) - kl_coef * (lam[:, 0] - lam[:, 1]))  # [B]
  if scale_q:
    q = q / (jnp.std(q) + 1e-8)
  joint_log_ratio = jax.lax.stop_gradient(jnp.sum(lam - lam_old, axis=-1))  # [B]
  ratio = jnp.exp(common.clamp_log_ratio(joint_log_ratio))
  ratio_c = jnp.clip(ratio, 1.0 / ratio_clip, ratio_clip)
  n_tok = jnp.sum(mask)

  if variant == "joint":
    d = lam[:, 0] - lam[:, 1]
    d_old = lam_old[:, 0] - lam_old[:, 1]
    loss_a = -q * ratio_c * d
    loss_b = -q * ratio_c * jnp.clip(d, d_old - clip_eps, d_old + clip_eps)
    per_pair = jnp.maximum(loss_a, loss_b)
    total = jnp.sum(per_pair) / jnp.maximum(n_tok, 1.0) if avg_tokenwise else jnp.mean(per_pair) / 2.0
    clip_frac = jnp.mean((loss_b > loss_a).astype(jnp.float32))
  elif variant == "separate":
    w = (-q * ratio_c)[:, None, None] * jnp.array([1.0, -1.0], jnp.float32)[None, :, None]  # [B, 2, 1]
    lp = logp * mask
    old = old_logp * mask
    loss_a = w * lp
    loss_b = w * jnp.clip(lp, old - clip_eps, old + clip_eps)
    total = jnp.sum(mask * jnp.maximum(loss_a, loss_b)) / jnp.maximum(n_tok, 1.0)
    clip_frac = common.masked_mean(loss_b > loss_a, mask)
  else:
    raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")

  seq_kl = jax.lax.stop_gradient(lam)
  metrics = {
      "clip_frac": clip_frac,
      "ratio_mean": jnp.mean(ratio),
      "ratio_min": jnp.min(ratio),
      "ratio_max": jnp.max(ratio),
      "ratio_clipped_frac": jnp.mean((ratio != ratio_c).astype(jnp.float32)),
      "num_clamped": common.num_clamped(joint_log_ratio, jnp.ones_like(joint_log_ratio)),
      "kl": jnp.sum(seq_kl) / jnp.maximum(n_tok, 1.0),
      "kl_per_seq": jnp.mean(seq_kl),
      "reward_diff_abs": jnp.mean(jnp.abs(rewards[:, 0] - rewards[:, 1])),
      "num_tokens": n_tok,
  }
  metrics.update(common.stats("q", q))
  return total, metrics
