"""Train state and optimizer: AdamW with warmup + cosine decay and global-norm clipping.

The state is a flat pytree (params, opt_state, step and the non-finite skip counters) so that it can be sharded,
donated to the jitted step and checkpointed as one unit: the counters live in the state (the shape of optax's
``apply_if_finite``), so every job resumes them with its checkpoint.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimizer hyperparameters (config section ``optim``)."""
  learning_rate: float = 1e-6
  warmup_steps: int = 0
  decay_steps: int = 0            # 0: constant after warmup; else cosine to end_lr_factor * lr over this many
  end_lr_factor: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_norm: float = 1.0          # global-norm clipping; 0 disables


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
  """Linear warmup from 0 to ``learning_rate``, then constant or cosine decay."""
  if cfg.decay_steps > 0:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=max(cfg.warmup_steps, 0),
        decay_steps=cfg.warmup_steps + cfg.decay_steps, end_value=cfg.learning_rate * cfg.end_lr_factor)
  if cfg.warmup_steps > 0:
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps), optax.constant_schedule(cfg.learning_rate)],
        [cfg.warmup_steps])
  return optax.constant_schedule(cfg.learning_rate)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """AdamW (decoupled weight decay) behind global-norm clipping."""
  parts = []
  if cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay))
  return optax.chain(*parts)


@flax.struct.dataclass
class TrainState:
  """Everything an optimizer step changes. ``step`` counts applied updates; ``skips_in_row`` and ``skips_total``
  count the updates ``apply_if_finite`` skipped (in a row, and in all)."""
  params: Any
  opt_state: Any
  step: jax.Array
  skips_in_row: jax.Array
  skips_total: jax.Array

  @classmethod
  def create(cls, params: Any, tx: optax.GradientTransformation) -> "TrainState":
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731 (three buffers: the jitted step donates each)
    return cls(params=params, opt_state=tx.init(params), step=zero(), skips_in_row=zero(), skips_total=zero())

  def apply_gradients(self, grads: Any, tx: optax.GradientTransformation) -> "TrainState":
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    return self.replace(params=optax.apply_updates(self.params, updates), opt_state=opt_state, step=self.step + 1)


def apply_if_finite(state: TrainState, grads: Any, loss: jax.Array,
                    tx: optax.GradientTransformation) -> tuple[TrainState, jax.Array, jax.Array]:
  """The update when ``loss`` and the gradient norm are finite, else ``state`` unchanged (step included) but for
  its skip counters.

  Returns ``(new_state, grad_norm, skipped)`` with ``skipped`` a float32 0/1, so a NaN/Inf step never
  reaches the params, the optimizer moments or a checkpoint; the loops limit the skips (``SkipCounter``).
  """
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = state.apply_gradients(grads, tx)
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  skipped = (~finite).astype(jnp.int32)
  new_state = new_state.replace(skips_in_row=jnp.where(finite, 0, state.skips_in_row + 1),
                                skips_total=state.skips_total + skipped)
  return new_state, grad_norm, skipped.astype(jnp.float32)


SKIP_KEYS = ("skips_in_row", "skips_total")


def skip_metrics(state: TrainState) -> dict[str, jax.Array]:
  """The state's skip counters as step metrics (``SkipCounter.update`` pops them on the host)."""
  return {k: getattr(state, k) for k in SKIP_KEYS}


class NonFiniteUpdates(RuntimeError):
  """Too many updates in a row had a non-finite loss or gradient."""


class SkipCounter:
  """Reads the train state's skip counters (from step metrics) on the host and stops a run that keeps skipping.

  Args:
    limit: raise ``NonFiniteUpdates`` after this many skips in a row (0: never); config key
      ``train.max_consecutive_skips``.
    what: what one update is called in the message ("optimizer updates", "SFT updates", ...).
    hint: the fix the message suggests.
  """

  def __init__(self, limit: int, *, what: str, hint: str):
    self.limit, self.what, self.hint = int(limit), what, hint
    self.in_row = self.total = 0

  def update(self, metrics: dict, where: str) -> dict:
    """Pops the counters (``skip_metrics``, fetched to the host) from one update's metrics and checks the limit;
    ``where`` names the update in the message (e.g. "at step 7"). Returns the other metrics."""
    metrics = dict(metrics)
    self.in_row, self.total = (int(metrics.pop(k)) for k in SKIP_KEYS)
    if self.limit and self.in_row >= self.limit:
      raise NonFiniteUpdates(
          f"{self.in_row} {self.what} in a row had a non-finite loss or gradient (the last {where}); each was "
          f"skipped, so the params and the checkpoints stay finite. {self.hint}, or raise "
          f"train.max_consecutive_skips (now {self.limit}).")
    return metrics


def state_shardings(params_shardings: Any, tx: optax.GradientTransformation, params_abstract: Any, mesh) -> Any:
  """Shardings for a TrainState: optimizer moments follow their parameter, scalars are replicated."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = jax.eval_shape(lambda p: TrainState.create(p, tx), params_abstract)
  # Optimizer state trees (mu, nu) mirror the params tree; match them structurally, others replicate.
  params_def = jax.tree.structure(params_abstract)

  def shard_subtree(sub):
    if jax.tree.structure(sub) == params_def:
      return params_shardings
    return jax.tree.map(lambda _: replicated, sub)

  opt_shardings = jax.tree.map(shard_subtree, abstract.opt_state,
                               is_leaf=lambda x: jax.tree.structure(x) == params_def)
  return TrainState(params=params_shardings, opt_state=opt_shardings, step=replicated, skips_in_row=replicated,
                    skips_total=replicated)
