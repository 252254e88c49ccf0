"""The reward-model training loop: jitted steps on preference pairs, held-out evaluation, checkpoints.

The steps are ``rlj.rm_step``'s (Bradley-Terry or pairwise IQN); checkpoints, resume and stop requests follow
the one job lifecycle (``rlj.lifecycle``), whose meta record here also carries ``reward_model`` (everything
``rlj.rm_reward`` needs to rebuild the model from the run folder alone) and the last held-out metrics.

The host never waits for the device inside the loop: a step's skip counters are read one step late
(``_LaggedSkips``), and metrics are fetched only every ``log_every`` steps.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import jax

from rlj import rm_step, train_state


class _LaggedSkips:
  """``train_state.SkipCounter`` fed each step's counters one step late, so the host never waits for the
  device; ``flush`` reads the pending ones (before a checkpoint)."""

  def __init__(self, limit: int):
    self.counter = train_state.SkipCounter(limit, what="steps", hint="Lower optim.learning_rate")
    self._pending = None

  def add(self, step: int, metrics: dict) -> None:
    self.flush()
    self._pending = (step, {k: metrics[k] for k in train_state.SKIP_KEYS})

  def flush(self) -> None:
    if self._pending is not None:
      step, counters = self._pending
      self._pending = None
      self.counter.update(jax.device_get(counters), f"at step {step}")


def run_rm(state, *, train_fn: Callable, eval_fn: Callable, batches: Iterator, eval_batches: list, job, writer,
           total_steps: int, start_step: int = 0, log_every: int = 1, eval_every: int = 0, seed: int = 0,
           max_consecutive_skips: int = 0, meta: dict | None = None) -> tuple[Any, dict | None, bool]:
  """Trains steps ``start_step + 1 .. total_steps``; returns ``(state, held-out metrics, stopped)``.

  Args:
    train_fn: ``rm_step.make_train_step(...)``: ``(state, batch, rng) -> (state, metrics)``.
    eval_fn: ``rm_step.make_eval_step(...)``, run over ``eval_batches`` every ``eval_every`` steps and at the end.
    batches: training ``PreferenceBatch``es on the mesh.
    job: the run's ``rlj.lifecycle.Lifecycle`` (its data iterator feeds ``batches``).
    writer: ``rlj.metrics_writer.MetricsWriter``.
    meta: extra checkpoint meta (the ``reward_model`` record).

  Held-out metrics are None when no step ran (a finished run was relaunched).
  """
  root = jax.random.key(seed)
  skips = _LaggedSkips(max_consecutive_skips)
  held_out = None

  def evaluate(step: int) -> dict:
    out = rm_step.evaluate(eval_fn, state.params, eval_batches)
    writer.write(step, {f"eval/{k}": v for k, v in out.items()})
    return out

  def save(step: int, st) -> None:
    skips.flush()
    job.save(step, st, meta={**(meta or {}), "eval": held_out})

  on_step_end = job.hook(save)
  t0, pairs = time.time(), 0
  stopped = False
  for step in range(start_step + 1, total_steps + 1):
    batch = next(batches)
    state, metrics = train_fn(state, batch, jax.random.fold_in(root, step))
    skips.add(step, metrics)
    pairs += batch.chosen_tokens.shape[0]
    if step % log_every == 0 or step == total_steps:
      metrics = {k: v for k, v in jax.device_get(metrics).items() if k not in train_state.SKIP_KEYS}
      metrics["pairs_per_s"] = pairs / max(time.time() - t0, 1e-9)
      writer.write(step, metrics)
      t0, pairs = time.time(), 0
    if step == total_steps or (eval_every and step % eval_every == 0):
      held_out = evaluate(step)
    stopped = on_step_end(step, state)
    if stopped:
      break
  skips.flush()
  if not stopped and held_out is None:  # the run had already finished: report the restored model
    held_out = evaluate(start_step)
  return state, held_out, stopped
