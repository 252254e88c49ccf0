"""Adaptive KL coefficient: the proportional controller of Ziegler et al. that steers the KL to a target.

Source: "Fine-Tuning Language Models from Human Preferences" (Ziegler et al., arXiv:1909.08593), Sec. 2.2:

  e_t       = clip((KL_t - KL_target) / KL_target, -0.2, 0.2)
  beta_t+1  = beta_t (1 + K_beta e_t)

with K_beta = n_steps / horizon as in the reference implementations (the paper used K_beta = 0.1; OpenAI's
lm-human-preferences ``AdaptiveKLController`` and TRL's take ``n_steps`` = samples per update and a horizon
in samples, 10000). beta grows while the KL is above the target and shrinks while it is below, by at most
20% x K_beta per update.

Host side: beta is a float64 scalar of the loop (``rlj.kl_controller``), handed to the jitted loss as a traced
scalar, so changing it never recompiles.
"""
from __future__ import annotations

import numpy as np

ERROR_CLIP = 0.2   # |e_t| <= 0.2 (Ziegler et al., Sec. 2.2)


def proportional_error(kl: float, target: float) -> float:
  """e_t = clip((KL_t - KL_target) / KL_target, -0.2, 0.2) (arXiv:1909.08593, Sec. 2.2); ``target`` > 0."""
  if not target > 0:
    raise ValueError(f"the KL target must be > 0, got {target}")
  return float(np.clip((float(kl) - target) / target, -ERROR_CLIP, ERROR_CLIP))


def adaptive_kl_update(beta: float, kl: float, *, target: float, horizon: float, n_steps: float) -> float:
  """One controller update: beta_{t+1} = beta_t (1 + K_beta e_t), K_beta = n_steps / horizon.

  See Ziegler et al., "Fine-Tuning Language Models from Human Preferences" (arXiv:1909.08593), Sec. 2.2.

  Args:
    beta: beta_t, the KL coefficient used by the update that measured ``kl``.
    kl: KL_t, the KL between the policy and the reference measured at step t (in the unit of ``target``).
    target: KL_target > 0.
    horizon: > 0, in the unit of ``n_steps`` (e.g. completions): how fast beta follows the error.
    n_steps: the samples of step t (e.g. completions in its batch).

  Returns:
    beta_{t+1} as a Python float (float64). Positive whenever ``n_steps / horizon < 5``.
  """
  if not horizon > 0:
    raise ValueError(f"the horizon must be > 0, got {horizon}")
  return float(beta) * (1.0 + float(n_steps) / float(horizon) * proportional_error(kl, target))
