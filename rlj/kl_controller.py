"""The adaptive KL coefficient in the RL loop (config keys ``algo.kl_control.target`` / ``horizon``).

With a target, the KL coefficient beta of the row's objective (``algo.kwargs.kl_coef`` is beta_0) follows
``algorithms.kl_control.adaptive_kl_update`` (Ziegler et al., arXiv:1909.08593, Sec. 2.2) once per RL step:

  step t trains with beta_t  ->  KL_t = the mean of the ``kl`` metric over the step's optimizer updates
                             ->  beta_{t+1} with n_steps = the step's completions (train-batch rows)

KL_t is the objective's own per-token KL metric (``kl``: the token mean of the configured estimator against
the reference; P3O's token mean of log pi - log pi_ref), so ``target`` is in nats per token, not per
sequence as in the paper (whose KL_target of 6 nats is a sequence sum). A step whose KL is not finite (all of
its updates skipped) leaves beta unchanged.

beta reaches the jitted loss as a scalar of the train batch (``kl_coef``, which the rows' objectives read in
place of the configured value), so changing it never recompiles. The minibatches keep 0-d batch entries whole
(``rlj.batches.take_units``) and the micro-batch split broadcasts them.

State: beta lives on the host with the loop and goes into every checkpoint as host state (``host_state``,
saved per process by ``rlj.lifecycle.Lifecycle.save(host=...)``). That is simpler than a train-state field
(no change to the state tree, its shardings or the restore of older checkpoints) and it is correct with
several processes: KL_t comes from the step's replicated metrics, so every process computes the same beta and
saves the same value. A checkpoint without it (written before the controller was on) resumes from beta_0.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from algorithms import kl_control

BATCH_KEY = "kl_coef"          # the scalar the objectives read in place of algo.kwargs.kl_coef
_STATE_KEY = "kl_control/beta"


@dataclasses.dataclass(frozen=True)
class KLControl:
  """``algo.kl_control``: ``target`` KL in nats per token (0: off, beta stays ``algo.kwargs.kl_coef``) and
  ``horizon`` in completions (K_beta = completions per step / horizon)."""
  target: float = 0.0
  horizon: float = 10000.0

  @property
  def enabled(self) -> bool:
    return self.target > 0


class AdaptiveKL:
  """beta of one run: ``batch_fields`` for the step's batch, ``update`` after its optimizer updates."""

  def __init__(self, cfg: KLControl, beta0: float):
    self.cfg = cfg
    self.beta = float(beta0)

  @classmethod
  def for_loop(cls, loop_config) -> "AdaptiveKL":
    """The controller of an ``rl_loop.LoopConfig`` (beta_0: its objective's ``kl_coef``)."""
    return cls(loop_config.kl_control, float(loop_config.loss_kwargs.get("kl_coef", 0.0)))

  def batch_fields(self) -> dict[str, np.ndarray]:
    """``{"kl_coef": beta_t}`` (float32 0-d) while the controller is on, else nothing."""
    return {BATCH_KEY: np.float32(self.beta)} if self.cfg.enabled else {}

  def update(self, kl: float | None, n_steps: int) -> dict[str, float]:
    """beta_{t+1} from the step's KL; returns the step's metrics (the beta it trained with, the error)."""
    if not self.cfg.enabled:
      return {}
    m = {"kl_control/beta": self.beta}
    if kl is not None and np.isfinite(kl):
      m["kl_control/error"] = kl_control.proportional_error(kl, self.cfg.target)
      self.beta = kl_control.adaptive_kl_update(self.beta, kl, target=self.cfg.target, horizon=self.cfg.horizon,
                                                n_steps=n_steps)
    return m

  def host_state(self) -> dict[str, np.ndarray]:
    return {_STATE_KEY: np.float64(self.beta)} if self.cfg.enabled else {}

  def load_host_state(self, host: Mapping[str, np.ndarray]) -> None:
    if self.cfg.enabled and _STATE_KEY in host:
      self.beta = float(host[_STATE_KEY])
