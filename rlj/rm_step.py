"""Reward-model training and evaluation steps on preference pairs (Bradley-Terry or pairwise IQN).

  loss = rewards.bradley_terry.loss(r(chosen), r(rejected))                 kind "bt"
  loss = rewards.quantile.pairwise_loss(q(chosen, tau), q(rejected, tau))   kind "iqn"

Chosen and rejected sequences go through the model in one forward pass of 2B rows. Everything is a pure
function of arrays; ``make_train_step`` / ``make_eval_step`` bind the model and hyperparameters with
``functools.partial`` and jit once, so a loop reads

  state = rm_step.init_state(model, tx, rng, batch)
  train = rm_step.make_train_step(model, tx, num_taus=32)
  evaluate = rm_step.make_eval_step(model, num_taus=32)
  for step, batch in enumerate(batches):
    state, metrics = train(state, batch, jax.random.fold_in(rng, step))
  held_out = rm_step.evaluate(evaluate, state.params, eval_batches)          # {"accuracy": ..., ...}
"""
from __future__ import annotations

import functools
from typing import Any, Iterable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from models.reward_model import RewardModel
from rewards import bradley_terry, quantile
from rlj.train_state import TrainState, apply_if_finite, skip_metrics

TAU_SAMPLING = ("midpoint", "uniform")


class PreferenceBatch(NamedTuple):
  """B preference pairs, prompt + response token ids padded on either side.

  Attributes:
    chosen_tokens: [B, S] int32 preferred sequences.
    chosen_mask: [B, S] 1 on real tokens.
    rejected_tokens: [B, S'] int32 dispreferred sequences.
    rejected_mask: [B, S'] 1 on real tokens.
    margin: optional [B] float32 Bradley-Terry margins (Llama 2 preference strength); ignored by "iqn".
  """
  chosen_tokens: jax.Array
  chosen_mask: jax.Array
  rejected_tokens: jax.Array
  rejected_mask: jax.Array
  margin: Optional[jax.Array] = None


def _pad_to(x: jax.Array, length: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1])))


def stack_pairs(batch: PreferenceBatch) -> tuple[jax.Array, jax.Array]:
  """Chosen rows then rejected rows as one [2B, S_max] batch (the shorter side right-padded with mask 0)."""
  length = max(batch.chosen_tokens.shape[1], batch.rejected_tokens.shape[1])
  tokens = jnp.concatenate([_pad_to(batch.chosen_tokens, length), _pad_to(batch.rejected_tokens, length)])
  mask = jnp.concatenate([_pad_to(batch.chosen_mask, length), _pad_to(batch.rejected_mask, length)])
  return tokens.astype(jnp.int32), mask.astype(jnp.int32)


def step_taus(rng: Optional[jax.Array], num_pairs: int, *, num_taus: int, tau_sampling: str) -> jax.Array:
  """Quantile fractions for one step, the same for both members of a pair: [N] grid or sorted [B, N] draws."""
  if tau_sampling == "midpoint":
    return quantile.midpoint_taus(num_taus)
  if tau_sampling == "uniform":
    if rng is None:
      raise ValueError("tau_sampling='uniform' needs an rng")
    return jnp.sort(quantile.sample_taus(rng, (num_pairs, num_taus)), axis=-1)
  raise ValueError(f"unknown tau_sampling {tau_sampling!r}; choose one of {list(TAU_SAMPLING)}")


def score_pairs(params: Any, batch: PreferenceBatch, rng: Optional[jax.Array] = None, *, model: RewardModel,
                num_taus: int = 32, tau_sampling: str = "midpoint") -> tuple[jax.Array, jax.Array]:
  """Rewards of both members of every pair: ([B], [B]) for "bt", ([B, N], [B, N]) quantiles for "iqn"."""
  tokens, mask = stack_pairs(batch)
  b = batch.chosen_tokens.shape[0]
  if model.kind == "bt":
    out = model.apply({"params": params}, tokens, mask)                       # [2B]
  else:
    taus = step_taus(rng, b, num_taus=num_taus, tau_sampling=tau_sampling)
    if taus.ndim == 2:
      taus = jnp.concatenate([taus, taus])                                    # [2B, N]
    out = model.apply({"params": params}, tokens, mask, taus)                 # [2B, N]
  return out[:b], out[b:]


def loss_fn(params: Any, batch: PreferenceBatch, rng: Optional[jax.Array] = None, *, model: RewardModel,
            num_taus: int = 32, tau_sampling: str = "midpoint", center_coef: float = 0.0,
            temperature: float = 1.0, mean_anchor_coef: float = 0.0, crossing_coef: float = 0.0):
  """The reward-model objective on one batch of pairs: (loss, metrics).

  "bt" uses ``rewards.bradley_terry.loss`` (margin from the batch, ``center_coef``); "iqn" uses
  ``rewards.quantile.pairwise_loss`` (``temperature``, ``center_coef``, ``mean_anchor_coef``) plus
  ``crossing_coef`` times the quantile-crossing penalty.
  """
  r_w, r_l = score_pairs(params, batch, rng, model=model, num_taus=num_taus, tau_sampling=tau_sampling)
  if model.kind == "bt":
    margin = 0.0 if batch.margin is None else batch.margin
    return bradley_terry.loss(r_w, r_l, margin=margin, center_coef=center_coef)
  loss, metrics = quantile.pairwise_loss(r_w, r_l, temperature=temperature, center_coef=center_coef,
                                         mean_anchor_coef=mean_anchor_coef)
  if crossing_coef:
    loss = loss + crossing_coef * metrics["crossing"]
  return loss, metrics


def train_step(state: TrainState, batch: PreferenceBatch, rng: jax.Array, *, model: RewardModel,
               tx: optax.GradientTransformation, **loss_kwargs) -> tuple[TrainState, dict]:
  """One optimizer step on B pairs: (new state, metrics with ``loss``, ``grad_norm``, ``skipped`` and the loss
  metrics); a step with a non-finite loss or gradient leaves the state unchanged (``skipped`` = 1)."""
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, model=model, **loss_kwargs), has_aux=True)
  (loss, metrics), grads = grad_fn(state.params, batch, rng)
  state, grad_norm, skipped = apply_if_finite(state, grads, loss, tx)
  return state, {**metrics, "loss": loss, "grad_norm": grad_norm, "skipped": skipped, **skip_metrics(state)}


def eval_step(params: Any, batch: PreferenceBatch, *, model: RewardModel, num_taus: int = 32,
              **loss_kwargs) -> dict:
  """Held-out sums on one batch (IQN on the fixed midpoint grid): ``correct``, ``count``, ``loss_sum``.

  ``correct`` counts strict wins (ties are wrong); for "iqn" it uses the hard preference probability > 1/2
  and ``correct_mean`` counts wins of the quantile means. Sums combine across batches with ``evaluate``.
  """
  loss_kwargs = {**loss_kwargs, "tau_sampling": "midpoint"}
  loss, metrics = loss_fn(params, batch, None, model=model, num_taus=num_taus, **loss_kwargs)
  b = jnp.float32(batch.chosen_tokens.shape[0])
  out = {"correct": metrics["accuracy"] * b, "count": b, "loss_sum": loss * b, "margin_sum": metrics["margin"] * b}
  if "mean_accuracy" in metrics:
    out["correct_mean"] = metrics["mean_accuracy"] * b
  return out


def make_train_step(model: RewardModel, tx: optax.GradientTransformation, *, donate: bool = True, **loss_kwargs):
  """``jit(train_step)`` with the model, optimizer and loss hyperparameters bound: f(state, batch, rng)."""
  fn = functools.partial(train_step, model=model, tx=tx, **loss_kwargs)
  return jax.jit(fn, donate_argnums=(0,) if donate else ())


def make_eval_step(model: RewardModel, **loss_kwargs):
  """``jit(eval_step)`` with the model and loss hyperparameters bound: f(params, batch) -> sums."""
  loss_kwargs.pop("tau_sampling", None)
  return jax.jit(functools.partial(eval_step, model=model, **loss_kwargs))


def evaluate(eval_fn, params: Any, batches: Iterable[PreferenceBatch]) -> dict:
  """Runs ``eval_fn`` over batches and returns held-out ``accuracy``, ``loss``, ``margin`` (and
  ``mean_accuracy`` for IQN) as Python floats, plus the pair ``count``."""
  totals: dict[str, float] = {}
  for batch in batches:
    for k, v in jax.device_get(eval_fn(params, batch)).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  n = totals.get("count", 0.0)
  if not n:
    raise ValueError("evaluate got no pairs")
  out = {"accuracy": totals["correct"] / n, "loss": totals["loss_sum"] / n, "margin": totals["margin_sum"] / n,
         "count": n}
  if "correct_mean" in totals:
    out["mean_accuracy"] = totals["correct_mean"] / n
  return out


def init_params(model: RewardModel, rng: jax.Array, batch: PreferenceBatch, *, num_taus: int = 32) -> Any:
  """Unboxed parameters shaped for ``batch`` (use ``rlj.sharding.sharded_init`` for sharded init)."""
  tokens, mask = stack_pairs(batch)
  args = (tokens, mask) if model.kind == "bt" else (tokens, mask, quantile.midpoint_taus(num_taus))
  return nn.unbox(jax.jit(model.init)(rng, *args)["params"])


def init_state(model: RewardModel, tx: optax.GradientTransformation, rng: jax.Array, batch: PreferenceBatch,
               *, num_taus: int = 32) -> TrainState:
  """A fresh ``TrainState`` (params from ``init_params``, optimizer state, step 0)."""
  return TrainState.create(init_params(model, rng, batch, num_taus=num_taus), tx)


def batch_from_numpy(chosen_tokens, chosen_mask, rejected_tokens, rejected_mask, margin=None) -> PreferenceBatch:
  """A ``PreferenceBatch`` of int32 tokens/masks (and float32 margins) from host arrays."""
  as_int = lambda x: jnp.asarray(np.asarray(x), jnp.int32)
  return PreferenceBatch(as_int(chosen_tokens), as_int(chosen_mask), as_int(rejected_tokens),
                         as_int(rejected_mask), None if margin is None else jnp.asarray(margin, jnp.float32))
