"""The jitted optimizer step: ``train_step(state, batch, rng) -> (state, metrics)``.

Everything else (the log-prob function, the loss, the optimizer, the micro-batch count) is bound with
``functools.partial`` before ``jax.jit``, so nothing inside the step reads a config. The step

- computes per-token log-probs of the batch's completions under the current params (``logp_fn``; on its packed
  rows when the batch carries them, ``rlj.packing``),
- evaluates ``objective(logp, batch) -> (loss, metrics)`` (an algorithm's loss with its batch fields),
- accumulates gradients over ``num_microbatches`` slices with ``lax.scan``: summed when the objective's
  normaliser already counts the whole optimizer step (GRPO ``token_mean`` with a global ``num_tokens``;
  ALGORITHMS.md §3.3), averaged otherwise,
- with ``combine`` (LoRA, ``rlj.lora_policy``), runs the model on ``combine(frozen, state.params)``: the state
  holds the trainable part, ``frozen`` (an argument, never donated) the rest, which gets no gradient;
- skips the update when the loss or the gradient norm is not finite (the state passes through unchanged but for
  its skip counters, ``skipped`` is 1), so a checkpoint never holds NaNs; the metrics carry the state's counters
  (``train_state.SkipCounter`` checks them on the host).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from rlj import packing
from rlj.train_state import TrainState, apply_if_finite, skip_metrics

Batch = Mapping[str, jax.Array]
Objective = Callable[[jax.Array, Batch], tuple[jax.Array, dict]]


def _split_microbatches(batch: Batch, n: int) -> Batch:
  def split(x):
    if x.ndim == 0:
      return jnp.broadcast_to(x, (n,))
    if x.shape[0] % n:
      raise ValueError(f"batch leading dim {x.shape[0]} is not divisible by num_microbatches={n}")
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])
  return {k: split(v) for k, v in batch.items()}


def loss_and_grads(params: Any, batch: Batch, *, logp_fn, objective: Objective, num_microbatches: int = 1,
                   sum_microbatches: bool = True, frozen: Any = None, combine: Callable | None = None):
  """Loss, metrics and gradients (w.r.t. ``params``) of one optimizer step's batch, accumulated over micro-batches;
  the model runs on ``combine(frozen, params)`` when ``combine`` is given."""

  def loss_of(p, mb):
    logp = logp_fn(p if combine is None else combine(frozen, p), mb["tokens"], mb["attn_mask"], packing.of(mb))
    return objective(logp, mb)

  grad_fn = jax.value_and_grad(loss_of, has_aux=True)
  if num_microbatches == 1:
    (loss, metrics), grads = grad_fn(params, batch)
    return loss, metrics, grads

  mbs = _split_microbatches(batch, num_microbatches)
  zeros = jax.tree.map(jnp.zeros_like, params)

  def body(acc, mb):
    (loss, metrics), grads = grad_fn(params, mb)
    acc = jax.tree.map(jnp.add, acc, grads)
    return acc, (loss, metrics)

  grads, (losses, metrics) = jax.lax.scan(body, zeros, mbs)
  scale = 1.0 if sum_microbatches else 1.0 / num_microbatches
  grads = jax.tree.map(lambda g: g * scale, grads)
  loss = losses.sum() * scale
  metrics = jax.tree.map(lambda m: m.mean(axis=0), metrics)
  return loss, metrics, grads


def train_step(state: TrainState, batch: Batch, rng: jax.Array, frozen: Any = None, *, logp_fn,
               objective: Objective, tx: optax.GradientTransformation, num_microbatches: int = 1,
               sum_microbatches: bool = True, combine: Callable | None = None):
  """One optimizer update; returns ``(new_state, metrics)`` with float32 scalar metrics. ``frozen``: the weights
  that do not train (the LoRA base), read through ``combine``; None otherwise."""
  del rng  # no dropout in the policy; kept so every step has the same signature
  loss, metrics, grads = loss_and_grads(state.params, batch, logp_fn=logp_fn, objective=objective,
                                        num_microbatches=num_microbatches, sum_microbatches=sum_microbatches,
                                        frozen=frozen, combine=combine)
  new_state, grad_norm, skipped = apply_if_finite(state, grads, loss, tx)
  metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
  metrics.update(loss=loss.astype(jnp.float32), grad_norm=grad_norm.astype(jnp.float32), skipped=skipped)
  return new_state, {**metrics, **skip_metrics(new_state)}
