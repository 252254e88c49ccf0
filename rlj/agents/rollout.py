"""Token-in/token-out multi-turn rollouts through the compiled sampler.

A trajectory is the prompt followed by model turns and observations. Each model turn is sampled by the compiled
sampler (``rlj.sampler.Sampler``) and kept exactly as sampled, with the sampler's log-probs; each observation is
the environment's text made into tokens by an ``ObservationFormat`` and appended. Nothing is ever decoded and
encoded again, so the trained tokens are the sampled ones and the sampler's log-probs are the teacher-forced
log-probs of the whole trajectory (the context of turn k is the prompt and every earlier token, at the same
positions).

Turn loop (host side; one compiled sampler call per turn):

1. Turn 1: when no environment adds a first observation, the ``first`` sampler prefills each prompt once and
   samples its G trajectories (rows ``b * G + g``), as a single-turn rollout does.
2. Each turn goes to its environment's ``step``; a trajectory ends when the environment says so, when the turn was
   cut before a stop token, after ``max_turns`` model turns, or when the next observation would leave no room in
   ``max_total_tokens`` (the budget of everything after the prompt).
3. Turns after the first: the trajectories still running (only those: finished ones drop out, so a short
   trajectory holds no one back) are sampled together, one sample per row, either from the KV cache the previous
   call left (``turns``, a ``rlj.turn_sampler.TurnSampler``: only the observation and any token the cache lacks
   are prefilled) or by the ``cont`` sampler with the conversation so far as their prompt, left-padded to its
   prompt bucket and prefilled again (without ``turns``, and for a turn that would not fit the continued cache).

The result is a ``Rollout`` of width P + ``max_total_tokens`` whose ``mask`` covers the model's tokens only (the
observations are attended to, ``attn_mask``, but not trained on), with the final turn's text per trajectory for the
reward functions, the sum of the environment's per-turn rewards and per-trajectory counters.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, NamedTuple

import jax
import numpy as np

from rlj.agents.env import COUNTERS, Environment, Turn
from rlj.data import encoding, stops
from rlj.sampler_config import Rollout
from rlj.turn_sampler import row_keep

STATS = ("turns",) + COUNTERS + ("hit_budget", "hit_max_turns", "turn_cut")


class AgentRollout(NamedTuple):
  """A multi-turn rollout: ``rollout`` (numpy fields, N = B * G rows), ``texts`` [N] (each trajectory's last model
  turn before its stop token), ``turn_rewards`` [N] (sum of the environment's turn rewards), ``stats`` (per
  trajectory: ``STATS``) and ``timings`` (seconds in the sampler and in the environments)."""
  rollout: Rollout
  texts: list[str]
  turn_rewards: np.ndarray
  stats: dict[str, np.ndarray]
  timings: dict[str, float]


@dataclasses.dataclass
class _Trajectory:
  ids: list = dataclasses.field(default_factory=list)
  logp: list = dataclasses.field(default_factory=list)
  model: list = dataclasses.field(default_factory=list)
  text: str = ""
  reward: float = 0.0
  stats: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(STATS, 0))

  def add(self, ids, logp=None):
    self.ids += [int(i) for i in ids]
    self.logp += [0.0] * len(ids) if logp is None else [float(x) for x in logp]
    self.model += [logp is not None] * len(ids)


class MultiTurnSampler:
  """Samples multi-turn trajectories (module docstring).

  Args:
    first: sampler of the first turn (``num_samples`` = G; its config gives the stop ids, pad id and per-turn
      ``max_new_tokens``).
    cont: sampler of later turns: one sample per row, the same stop ids and ``max_new_tokens``, prompt buckets up
      to P + ``max_total_tokens``.
    tokenizer: decodes turns for the environments (never re-encodes them).
    make_env: ``() -> Environment``, called once per trajectory.
    observations: an ``rlj.agents.observations.ObservationFormat``.
    max_turns: model turns per trajectory.
    max_total_tokens: tokens after the prompt per trajectory (model turns and observations).
    turns: a ``rlj.turn_sampler.TurnSampler`` to continue trajectories from their KV cache (None: re-prefill).
  """

  def __init__(self, *, first, cont, tokenizer, make_env: Callable[[], Environment], observations,
               max_turns: int, max_total_tokens: int, turns=None):
    if cont.config.num_samples != 1:
      raise ValueError("the sampler of later turns takes one sample per row (num_samples=1)")
    if max_turns < 1 or max_total_tokens < 1:
      raise ValueError("max_turns and max_total_tokens must be >= 1")
    self.first, self.cont, self.tokenizer = first, cont, tokenizer
    self.make_env, self.observations = make_env, observations
    self.max_turns, self.max_total_tokens = max_turns, max_total_tokens
    self.turns = turns

  @property
  def config(self):
    return self.first.config

  @property
  def num_samples(self) -> int:
    return self.first.config.num_samples

  def sample(self, params: Any, prompts: Mapping[str, np.ndarray], rng: jax.Array) -> AgentRollout:
    """Rolls out G trajectories for each prompt of ``prompts`` (a prompt batch: ``prompt_tokens``,
    ``prompt_mask``, ``prompt``, ``answer`` [, ``index``])."""
    if jax.process_count() > 1:
      raise ValueError("multi-turn rollouts run in one process")
    tok, msk = np.asarray(prompts["prompt_tokens"], np.int32), np.asarray(prompts["prompt_mask"], np.int32)
    b, p = tok.shape
    g, t_max = self.num_samples, self.max_total_tokens
    n = b * g
    stop_ids = set(self.config.stop_set)
    index = prompts.get("index", np.arange(b))
    examples = [{"prompt": str(prompts["prompt"][i]), "answer": str(prompts["answer"][i]), "index": int(index[i])}
                for i in range(b)]
    prompt_ids = [tok[i][msk[i] != 0] for i in range(b)]
    t_env, t_sample = 0.0, 0.0
    t0 = time.perf_counter()
    envs = [self.make_env() for _ in range(n)]
    trajs = [_Trajectory() for _ in range(n)]
    first_obs = [env.reset(examples[r // g]) for r, env in enumerate(envs)]
    active = []
    for r, obs in enumerate(first_obs):
      if obs is not None:
        ids = self.observations.encode(obs)
        if len(ids) >= t_max:
          trajs[r].stats["hit_budget"] = 1
          continue
        trajs[r].add(ids)
      active.append(r)
    t_env += time.perf_counter() - t0

    kv = _CacheBook(n) if self.turns is not None else None
    for turn in range(self.max_turns):
      if not active:
        break
      t0 = time.perf_counter()
      key = jax.random.fold_in(rng, turn)
      rows = active
      chunks = None if kv is None or kv.cache is None else [trajs[r].ids[kv.cached[r]:] for r in rows]
      if turn == 0 and len(active) == n and all(o is None for o in first_obs):
        comp, logp, mask, cache = self._sample(self.first, params, tok, msk, key)
        before = [0] * n
      elif chunks is not None and all(chunks) and self.turns.fits(kv.cache, max(len(c) for c in chunks)):
        comp, logp, mask, cache = self.turns.next_turn(
            params, kv.cache, rows=np.asarray([kv.row[r] for r in rows]), keep=np.asarray([kv.keep[r] for r in rows]),
            chunks=chunks, positions=np.asarray([len(prompt_ids[r // g]) + kv.cached[r] for r in rows]), rng=key)
        before = [kv.cached[r] + len(ch) for r, ch in zip(rows, chunks)]
      else:
        ctx = [np.concatenate([prompt_ids[r // g], np.asarray(trajs[r].ids, np.int32)]) for r in rows]
        ctx_tok, ctx_msk = encoding.left_pad(ctx, max(len(c) for c in ctx), self.config.pad_id)
        comp, logp, mask, cache = self._sample(self.cont, params, ctx_tok, ctx_msk, key)
        before = [len(trajs[r].ids) for r in rows]
      if kv is not None:
        kv.update(rows, before, mask.sum(1), cache)
      t1 = time.perf_counter()
      t_sample += t1 - t0
      active = [r for k, r in enumerate(rows)
                if self._take_turn(trajs[r], envs[r], comp[k][mask[k] > 0], logp[k][mask[k] > 0], turn, stop_ids)]
      t_env += time.perf_counter() - t1
    return AgentRollout(self._assemble(tok, msk, trajs, p), [t.text for t in trajs],
                        np.asarray([t.reward for t in trajs], np.float32),
                        {k: np.asarray([t.stats[k] for t in trajs], np.float32) for k in STATS},
                        {"sample": t_sample, "env": t_env})

  def _sample(self, sampler, params, tok, msk, key):
    """One prefilling call: (completion, logp, mask) as numpy, and its KV cache when turns continue from it."""
    if self.turns is None:
      ro, cache = sampler.sample(params, tok, msk, key), None
    else:
      ro, cache = sampler.sample(params, tok, msk, key, return_cache=True)
    comp, logp, mask = (np.asarray(x) for x in (ro.completion, ro.logp, ro.mask))
    return comp, logp, mask, cache

  def _take_turn(self, traj: _Trajectory, env: Environment, ids: np.ndarray, logp: np.ndarray, turn: int,
                 stop_ids: set) -> bool:
    """Appends one sampled turn and, unless the trajectory ends, its observation; returns whether it goes on."""
    room = self.max_total_tokens - len(traj.ids)
    cut_by_budget = len(ids) > room
    ids, logp = ids[:room], logp[:room]
    stopped = len(ids) > 0 and int(ids[-1]) in stop_ids and not cut_by_budget
    traj.add(ids, logp)
    traj.stats["turns"] += 1
    traj.text = stops.completion_text(self.tokenizer, ids, stop_ids=stop_ids)
    result = env.step(Turn(text=self.tokenizer.decode(ids), tokens=tuple(int(i) for i in ids), stopped=stopped,
                           index=turn))
    traj.reward += float(result.reward)
    for k in COUNTERS:
      traj.stats[k] += int(result.counts.get(k, 0))
    if result.ends:
      return False
    if not stopped:   # cut by max_new_tokens or the budget: no observation can follow a turn that never ended
      traj.stats["turn_cut"] = 1
      traj.stats["hit_budget"] = int(cut_by_budget or len(traj.ids) >= self.max_total_tokens)
      return False
    if turn + 1 >= self.max_turns:
      traj.stats["hit_max_turns"] = 1
      return False
    obs = self.observations.encode(result.observation)
    if len(traj.ids) + len(obs) >= self.max_total_tokens:   # no room for the observation and a model token
      traj.stats["hit_budget"] = 1
      return False
    traj.add(obs)
    return True

  def _assemble(self, tok: np.ndarray, msk: np.ndarray, trajs: list, p: int) -> Rollout:
    g, t_max, pad = self.num_samples, self.max_total_tokens, self.config.pad_id
    n = len(trajs)
    completion = np.full((n, t_max), pad, np.int32)
    logp = np.zeros((n, t_max), np.float32)
    mask = np.zeros((n, t_max), np.float32)
    real = np.zeros((n, t_max), np.int32)
    for r, t in enumerate(trajs):
      k = len(t.ids)
      completion[r, :k], logp[r, :k], mask[r, :k], real[r, :k] = t.ids, t.logp, t.model, 1
    prompt, prompt_mask = np.repeat(tok, g, axis=0), np.repeat(msk, g, axis=0)
    return Rollout(tokens=np.concatenate([prompt, completion], 1), completion=completion, logp=logp, mask=mask,
                   lengths=mask.sum(1).astype(np.int32), prompt_mask=prompt_mask,
                   attn_mask=np.concatenate([prompt_mask, real], 1),
                   num_steps=np.int32(max((len(t.ids) for t in trajs), default=0)))


class _CacheBook:
  """Where each trajectory lives in the last call's KV cache: its row, the slot after its last cached token
  (``keep``) and how many of its tokens after the prompt the cache holds (``cached``)."""

  def __init__(self, n: int):
    self.cache = None
    self.row, self.keep, self.cached = [0] * n, [0] * n, [0] * n

  def update(self, rows, before, lengths, cache) -> None:
    """After a call on ``rows`` whose caches held ``before`` tokens each and that sampled ``lengths`` tokens."""
    self.cache = cache
    keep = row_keep(cache, lengths)
    for k, r in enumerate(rows):
      self.row[r], self.keep[r] = k, int(keep[k])
      self.cached[r] = int(before[k]) + int(keep[k] - cache.start)


def summary(ar: AgentRollout, prefix: str = "agent/") -> dict[str, float]:
  """Means over trajectories: turns, tool calls, tool errors, malformed calls, the fractions that hit the token
  budget / the turn limit / a cut turn, and the environment's reward per turn."""
  s = ar.stats
  out = {f"{prefix}{k}": float(np.mean(v)) for k, v in s.items()}
  out[f"{prefix}tool_call_rate"] = float(np.mean(s["tool_calls"] > 0))
  out[f"{prefix}reward_per_turn"] = float(np.sum(ar.turn_rewards) / max(np.sum(s["turns"]), 1.0))
  out[f"{prefix}observation_tokens"] = float(np.mean((ar.rollout.attn_mask[:, -ar.rollout.mask.shape[1]:] > 0).sum(1)
                                                     - ar.rollout.mask.sum(1)))
  out["time/agent_env"] = ar.timings["env"]
  return out
