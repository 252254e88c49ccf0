"""Single-turn rollouts in rounds: rows that have stopped leave the batch between rounds.

The compiled sampler decodes every row until the longest one stops: with completion lengths spread between 10%
and 100% of T, about 45% of its row-steps decode rows that are done (``rlj.rollout_stats.finished_row_steps``).
``RoundSampler`` splits the T decode steps into rounds of ``round_tokens``: round 1 is ``Sampler.sample`` (the
prompts prefilled once, G samples each) with its KV cache handed over; every later round continues only the rows
still running, gathered into the smallest batch bucket that holds them (``rlj.turn_sampler.TurnSampler``: the row's
last sampled token, which no forward pass has seen yet, is its one-token chunk). Each round is one compiled
program per (rows, cache) bucket; the host reads which rows stopped between rounds.

The tokens and log-probs of a row are those of one continuous decode (the same positions and keys; greedy decoding
gives the one-shot sampler's tokens exactly), but a sampled row draws other random numbers than in the one-shot
sampler, whose draws depend on the row's place in the batch.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from rlj.buckets import round_up, shrinking_buckets
from rlj.sampler_config import Rollout, SamplerConfig
from rlj.turn_sampler import TurnSampler, row_keep


class RoundSampler:
  """Samples in rounds (module docstring).

  Args:
    first: a ``Sampler`` whose ``max_new_tokens`` is one round (``num_samples`` = G).
    turns: a ``TurnSampler`` over a sampler with one sample per row and the same ``max_new_tokens``, stop ids and
      temperature; its ``batch_buckets`` are the row counts later rounds may shrink to.
    max_new_tokens: T, the completion width of the result (a multiple of the round length is not needed).
  """

  def __init__(self, first, turns: TurnSampler, *, max_new_tokens: int):
    if turns.config.max_new_tokens != first.config.max_new_tokens:
      raise ValueError("every round has the same length: first and turns need one max_new_tokens")
    self.first, self.turns, self.max_new_tokens = first, turns, int(max_new_tokens)
    self.rows_decoded = 0   # row-steps the last call decoded (rows x round length, summed over rounds)

  @property
  def config(self):
    """The first round's config with the whole rollout's ``max_new_tokens`` (what callers size completions by)."""
    return dataclasses.replace(self.first.config, max_new_tokens=self.max_new_tokens)

  def sample(self, params: Any, prompt_tokens, prompt_mask, rng: jax.Array) -> Rollout:
    """G completions of T tokens for each prompt, in rounds; the ``Rollout`` of ``Sampler.sample``."""
    c, t_max, r_len = self.config, self.max_new_tokens, self.first.config.max_new_tokens
    stops = np.asarray(sorted(c.stop_set) or [-1])
    ro, cache = self.first.sample(params, prompt_tokens, prompt_mask, jax.random.fold_in(rng, 0), return_cache=True)
    comp, logp, mask = (np.asarray(x) for x in (ro.completion, ro.logp, ro.mask))
    n = comp.shape[0]
    out_tok = np.full((n, t_max), c.pad_id, np.int32)
    out_logp = np.zeros((n, t_max), np.float32)
    out_mask = np.zeros((n, t_max), np.float32)
    lens = np.zeros(n, np.int64)
    prompt_len = np.asarray(ro.prompt_mask).sum(1).astype(np.int64)
    rows = np.arange(n)
    self.rows_decoded = cache.cache.key_mask.shape[0] * r_len
    for rnd in range(1, -(-t_max // r_len) + 1):
      got = mask.sum(1).astype(np.int64)
      for k, r in enumerate(rows):
        take = min(int(got[k]), t_max - int(lens[r]))
        out_tok[r, lens[r]:lens[r] + take] = comp[k, :take]
        out_logp[r, lens[r]:lens[r] + take] = logp[k, :take]
        out_mask[r, lens[r]:lens[r] + take] = mask[k, :take]
        lens[r] += take
      keep = row_keep(cache, got)
      last = comp[np.arange(len(rows)), np.maximum(got - 1, 0)]
      going = (got == r_len) & ~np.isin(last, stops) & (lens[rows] < t_max)
      if not going.any() or rnd * r_len >= t_max or not self.turns.fits(cache, 1):
        break
      idx = np.flatnonzero(going)
      chunks = [[int(last[k])] for k in idx]   # the last sampled token: no forward pass has seen it yet
      comp, logp, mask, cache = self.turns.next_turn(params, cache, rows=idx, keep=keep[idx], chunks=chunks,
                                                     positions=prompt_len[rows[idx]] + lens[rows[idx]] - 1,
                                                     rng=jax.random.fold_in(rng, rnd))
      rows = rows[idx]
      self.rows_decoded += cache.cache.key_mask.shape[0] * r_len
    tokens = np.concatenate([np.asarray(ro.tokens)[:, :-r_len], out_tok], 1)
    pmask = np.asarray(ro.prompt_mask)
    return Rollout(tokens=tokens, completion=out_tok, logp=out_logp, mask=out_mask,
                   lengths=out_mask.sum(1).astype(np.int32), prompt_mask=pmask,
                   attn_mask=np.concatenate([pmask, out_mask.astype(np.int32)], 1),
                   num_steps=np.int32(lens.max(initial=0)))


def round_sampler(make: Callable[[SamplerConfig], Any], config: SamplerConfig, *, rounds: int, max_prompt_len: int,
                  rows: int) -> RoundSampler:
  """A ``RoundSampler`` for ``config``'s rollouts in ``rounds`` rounds of ``ceil(max_new_tokens / rounds)`` tokens.

  ``make(sampler_config)`` builds each compiled sampler: the first round's with ``config``'s G, the later rounds'
  with one sample per row and batch buckets that shrink from ``rows`` (the rollout's rows). The continued cache
  holds ``max_prompt_len + rounds x (round + 1)`` slots (each round: its one-token chunk and its decode), rounded
  up to 64.
  """
  r_len = -(-config.max_new_tokens // rounds)
  first = make(dataclasses.replace(config, max_new_tokens=r_len))
  cont = make(dataclasses.replace(config, max_new_tokens=r_len, num_samples=1,
                                  batch_buckets=shrinking_buckets(rows)))
  slots = round_up(max_prompt_len + rounds * (r_len + 1), 64)
  return RoundSampler(first, TurnSampler(cont, max_slots=slots, chunk_buckets=(1,)),
                      max_new_tokens=config.max_new_tokens)
