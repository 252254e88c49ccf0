"""Sampling one step ahead (``train.sample_ahead``): the next RL step's rollout is sampled while the host scores
this one, so detokenising, the rewards and loading the next prompts overlap the device's work.

On-policy RL cannot overlap the rewards of step k with anything but the log-prob passes of step k: the update
needs them, and the next rollout needs the update. Sampling ahead breaks the second dependency. In step k the
loop dispatches rollout k + 1 with the policy *before* update k (JAX dispatches asynchronously), then scores
rollout k on the host while the device samples, then dispatches update k. Rollout k is therefore sampled by the
policy of step k - 1, one update behind the one it trains: asynchronous RL with its staleness bounded by one
("AReaL: A Large-Scale Asynchronous Reinforcement Learning System for Language Reasoning", arXiv:2505.24298; verl's
one-step off-policy recipe). An expensive reward (a code runner, an HTTP judge) then costs wall time only where it
is longer than the device's work.

The old log-probs must then be the behaviour policy's: ``train.old_logp="sampler"`` (PPO's ratio against the
policy that sampled, which ``auto`` picks in this mode), or ``"recompute"`` with a ``train.mismatch_correction``
(AReaL's decoupled objective: the clipped ratio against the current policy, the proximal one, times a truncated
importance weight between it and the sampling policy).

``Lookahead`` keeps the data position honest: the prompt batch drawn ahead is not consumed until the loop takes
it, so a checkpoint saved at the end of step k records the position before step k + 1's prompts, and a resumed
run samples them again (with the restored policy: the first step after a resume is on-policy).
"""
from __future__ import annotations

from typing import Any


class Lookahead:
  """A batch iterator whose next batch can be drawn early (``peek``) without counting as consumed.

  ``next`` returns the peeked batch first; ``get_state`` (what a checkpoint records) is the position before the
  oldest batch not yet trained: with ``track``, every batch handed out counts until ``trained`` is called for it;
  without, only an unconsumed peeked batch. ``set_state`` drops both, and ``started``: the rollouts ``run``
  started ahead, {step: (its prompt batch, the started rollout)}.
  """

  def __init__(self, iterator, track: bool = False):
    self.iterator = iterator
    self.track = track
    self._peeked: tuple[Any, Any] | None = None     # (position before it, batch)
    self._untrained: list = []                       # positions before the batches handed out, not yet trained
    self.started: dict = {}                          # run's rollouts sampled ahead, by step

  def __iter__(self):
    return self

  def __next__(self):
    if self._peeked is not None:
      (state, batch), self._peeked = self._peeked, None
    else:
      state = self.iterator.get_state() if self.track else None
      batch = next(self.iterator)
    if self.track:
      self._untrained.append(state)
    return batch

  def peek(self):
    """The next batch, drawn now; ``next`` returns it."""
    if self._peeked is None:
      state = self.iterator.get_state()
      self._peeked = (state, next(self.iterator))
    return self._peeked[1]

  def trained(self) -> None:
    """The oldest batch handed out is trained: a checkpoint from now on counts it as consumed."""
    if self._untrained:
      self._untrained.pop(0)

  def get_state(self) -> dict:
    if self._untrained:
      return self._untrained[0]
    return self._peeked[0] if self._peeked is not None else self.iterator.get_state()

  def set_state(self, state: dict) -> None:
    self._peeked, self._untrained, self.started = None, [], {}
    self.iterator.set_state(state)

  def __getattr__(self, name):
    return getattr(self.iterator, name)


def wrap(iterator, *, track: bool = False) -> Lookahead:
  """``iterator`` as a ``Lookahead`` (itself when it is one; ``track`` turned on when asked)."""
  it = iterator if isinstance(iterator, Lookahead) else Lookahead(iterator)
  it.track = it.track or track
  return it


def run(trainer, state, ref_params, *, start_step: int, end_step: int, on_step_end, history: list):
  """``rlj.rl_loop.Trainer.run``'s steps with the rollout sampled one step ahead; returns ``(state, ref_params)``.

  Step k, on the host: take rollout k (started in step k - 1, or now), start rollout k + 1 with the policy before
  update k, score rollout k, finish step k - 1 (read its update metrics, evaluate, write, checkpoint when due; a
  stop request ends the loop here and rollout k is dropped, its prompts not saved as consumed), then build and
  dispatch update k. The device meanwhile runs update k - 1 and sampling k + 1, so the host's scoring of rollout
  k overlaps both. Metrics: ``time/step`` is the wall time between two step ends; ``time/update`` the host's time
  building and dispatching the update plus its wait for the update metrics; ``sample_ahead/stale`` is 1 for a
  rollout sampled by the policy one update back.
  """
  import time

  cfg, c = trainer.cfg, trainer.c
  it = c.train_iter
  open_step = None       # the step whose update is dispatched and not yet finished
  last_end = time.perf_counter()

  def finish(o) -> bool:
    nonlocal last_end
    t0 = time.perf_counter()
    um = trainer.finish_update(o["pending"], o["step"])
    now = time.perf_counter()
    m = o["metrics"]
    m["time/update"] = o["dispatch"] + now - t0
    m["time/step"] = now - last_end
    last_end = now
    it.trained()
    return trainer.end_step(o["state"], o["ref"], o["step"], m, um, o["rows"], history, on_step_end)

  for step in range(start_step, end_step):
    ref_params = trainer.batcher.begin_step(step, state.params, ref_params)
    rng_sample, rng_train = trainer.step_rngs(step)
    started = it.started.pop(step, None)
    it.started.clear()
    prompts = next(it)                         # the batch peeked for this step, when one was
    stale = started is not None and started[0] is prompts
    sampled = started[1] if stale else trainer.sample(state, prompts, rng_sample)
    if step + 1 < cfg.total_steps:
      ahead = it.peek()
      it.started[step + 1] = (ahead, trainer.sample(state, ahead, trainer.step_rngs(step + 1)[0]))
    arrays, rewards, metrics = trainer.rollout(state, prompts, rng_sample, step, ref_params, sampled=sampled)
    metrics["sample_ahead/stale"] = float(stale)
    if open_step is not None:
      stop, open_step = finish(open_step), None
      if stop:
        return state, ref_params
    t1 = time.perf_counter()
    batch, reference_time = trainer.train_batch(arrays, rewards, ref_params, step, metrics)
    state, pending = trainer.dispatch_update(state, batch, rng_train, step)
    open_step = {"step": step, "metrics": metrics, "pending": pending, "state": state, "ref": ref_params,
                 "rows": batch["tokens"].shape[0], "dispatch": time.perf_counter() - t1 - reference_time}
  if open_step is not None:
    finish(open_step)
  return state, ref_params
