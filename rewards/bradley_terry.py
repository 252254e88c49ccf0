"""Bradley-Terry pairwise loss for scalar reward models.

A reward model r(x, y) is trained on preference pairs (y_w preferred over y_l) by maximising the Bradley-Terry
likelihood P(y_w > y_l) = sigmoid(r_w - r_l). See ALGORITHMS.md section 7.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def loss(r_chosen: jax.Array, r_rejected: jax.Array, *, margin=0.0, center_coef: float = 0.0):
  """Bradley-Terry negative log-likelihood with an optional margin and reward centring.

  L = mean_b[softplus(-(r_w - r_l - m))] + c * mean_b[(r_w + r_l)^2],
  r_w = r_chosen, r_l = r_rejected, m = margin, c = center_coef.

  See Bradley & Terry (1952); the margin follows "Llama 2: Open Foundation and Fine-Tuned Chat Models"
  (arXiv:2307.09288, Sec. 3.2.2, Eq. 2) and the centring term "Helping or Herding? Reward Model Ensembles
  Mitigate but do not Eliminate Reward Hacking" (arXiv:2312.09244, Eq. 2).

  Args:
    r_chosen: [B] rewards of the preferred responses.
    r_rejected: [B] rewards of the dispreferred responses.
    margin: scalar or [B] required reward gap (Llama 2 uses 1, 2/3, 1/3, 0 by preference strength).
    center_coef: weight of the centring penalty that pins the otherwise unidentified reward offset.

  Returns:
    (loss, metrics): scalar float32 loss; metrics hold the strict ``accuracy`` mean(r_w > r_l) (ties count as
    wrong), the mean ``margin`` r_w - r_l, and reward statistics.

  Warning:
    -log sigmoid(d) is computed as softplus(-d); log(1 + exp(-d)) of the raw difference overflows (OpenRLHF's
    ``LogExpLoss``). TRL's ``center_rewards_coefficient`` is the same centring term (TRL recommends 0.01).
  """
  r_w = jnp.asarray(r_chosen, jnp.float32)
  r_l = jnp.asarray(r_rejected, jnp.float32)
  if r_w.ndim != 1 or r_w.shape != r_l.shape:
    raise ValueError(f"r_chosen {r_w.shape} and r_rejected {r_l.shape} must both be [B]")
  m = jnp.asarray(margin, jnp.float32)
  if m.ndim not in (0, 1) or (m.ndim == 1 and m.shape != r_w.shape):
    raise ValueError(f"margin must be a scalar or [B]={r_w.shape}, got {m.shape}")
  diff = r_w - r_l                                                   # [B]
  nll = jnp.mean(jax.nn.softplus(-(diff - m)))
  center = jnp.mean(jnp.square(r_w + r_l))
  total = nll + center_coef * center
  both = jnp.concatenate([r_w, r_l])
  metrics = {
      "nll": nll,
      "center": center,
      "accuracy": jnp.mean((diff > 0).astype(jnp.float32)),
      "margin": jnp.mean(diff),
      "reward_chosen": jnp.mean(r_w),
      "reward_rejected": jnp.mean(r_l),
      "reward_min": jnp.min(both),
      "reward_mean": jnp.mean(both),
      "reward_max": jnp.max(both),
  }
  return total, metrics
