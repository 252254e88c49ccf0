"""Per-token KL estimators between the policy and the reference, and which KL each one's gradient targets.

Samples are y ~ pi_theta and the target is KL(pi_theta || pi_ref). With delta = ref_logp - logp:

  kind       value                        expectation          expected gradient when ADDED TO THE LOSS
  k1         -delta                       KL(pi || ref)        0  (E_pi[grad log pi] = 0; k1 belongs in the reward)
  k2         delta^2 / 2                  biased, >= 0         grad KL(pi || ref)  (reverse)
  k3         exp(delta) - delta - 1       KL(pi || ref)        grad KL(ref || pi)  (FORWARD)
  k3_ratio   rho * k3, rho = exp(logp - sg(old_logp))
                                          KL(pi || ref)        grad KL(pi || ref)  (reverse), on- and off-policy

See J. Schulman, "Approximating KL Divergence" (2020, blog note, no arXiv) for k1/k2/k3, and "A Comedy of
Estimators: On KL Regularization in RL Training of LLMs" (arXiv:2512.21852) for the gradient analysis.
"""
from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

from algorithms import common

KINDS = ("k1", "k2", "k3", "k3_ratio")


def estimate(logp: jax.Array, ref_logp: jax.Array, kind: str = "k3", *, old_logp: Optional[jax.Array] = None,
             value_clip: Optional[float] = None) -> jax.Array:
  """Per-token estimate of KL(pi_theta || pi_ref) from log-probs of tokens sampled from the policy.

  delta = ref_logp - logp (clamped to [-20, 20] wherever it is exponentiated);
  k1 = -delta;  k2 = delta^2 / 2;  k3 = expm1(delta) - delta;  k3_ratio = exp(logp - sg(old_logp)) * k3.

  The DeepSeekMath GRPO objective (arXiv:2402.03300, Eq. 4) uses k3 with a "-beta * KL" term in the objective.

  Args:
    logp: [...] log pi_theta of the sampled tokens (carries the gradient).
    ref_logp: [...] log pi_ref of the same tokens (treated as a constant).
    kind: "k1" | "k2" | "k3" | "k3_ratio".
    old_logp: [...] log-probs under the sampling policy; required by "k3_ratio" (stop-gradient is applied).
    value_clip: optional symmetric clamp of the result (verl's +-10 in `kl_penalty_forward`); off by default.

  Returns:
    float32 [...] per-token KL estimate (mask it yourself).

  Warning:
    The gradient of k3 added to a loss is the gradient of the FORWARD KL(ref || pi), not of the KL it estimates;
    k3_ratio fixes that and is this project's default inside `grpo.loss`. k1 in the loss has zero expected
    gradient (tunix's default `kl_loss_mode="kl"` does that; we do not copy it). verl's `low_var_kl` and TRL before
    PR #6503 use k3; TRL `use_bias_correction_kl` is k3_ratio.
  """
  chex.assert_equal_shape((logp, ref_logp))
  logp, ref_logp = common.f32(logp, ref_logp)
  ref_logp = jax.lax.stop_gradient(ref_logp)
  delta = ref_logp - logp
  if kind == "k1":
    kl = -delta
  elif kind == "k2":
    kl = 0.5 * jnp.square(delta)
  elif kind in ("k3", "k3_ratio"):
    d = common.clamp_log_ratio(delta)
    kl = jnp.expm1(d) - d
    if kind == "k3_ratio":
      if old_logp is None:
        raise ValueError("kind='k3_ratio' needs old_logp (the log-probs of the sampling policy)")
      chex.assert_equal_shape((logp, old_logp))
      old_logp = jax.lax.stop_gradient(common.f32(old_logp))
      kl = jnp.exp(common.clamp_log_ratio(logp - old_logp)) * kl
  else:
    raise ValueError(f"unknown KL estimator {kind!r}; choose one of {sorted(KINDS)}")
  if value_clip is not None:
    kl = jnp.clip(kl, -value_clip, value_clip)
  return kl


def penalty(logp: jax.Array, ref_logp: Optional[jax.Array], mask: jax.Array, *, coef, kind: str = "k3",
            **aggregate_kwargs) -> tuple[jax.Array, dict]:
  """``coef * aggregate(KL_kind(logp, ref_logp), mask)`` and the metric ``kl`` (token mean, no gradient), for
  losses that add the KL term after their own aggregation; ``(0, {})`` without a reference.

  ``aggregate_kwargs`` go to ``common.aggregate`` (``agg``, ``num_tokens``, ``num_seqs``, ``max_len``).

  Raises:
    ValueError: ``ref_logp`` is None but ``coef`` is not the Python 0.
  """
  if ref_logp is None:
    if not (isinstance(coef, (int, float)) and coef == 0):
      raise ValueError("ref_logp is None but kl_coef is not 0")
    return jnp.zeros((), jnp.float32), {}
  chex.assert_equal_shape([logp, ref_logp])
  kl = estimate(logp, ref_logp, kind)
  return (coef * common.aggregate(kl, mask, **aggregate_kwargs),
          {"kl": common.masked_mean(jax.lax.stop_gradient(kl), mask)})
