r"""Multi-turn rollouts: a continuing turn that prefills the whole conversation again, against one that continues
from the KV cache the previous call left.

A turn after the first samples with the conversation so far as context (C tokens) and O new observation tokens.
This case times, with the compiled programs, for ``--batch`` rows and T = ``--new_tokens`` decode steps:

- ``re-prefill``: ``Sampler.sample`` with the C + O tokens as its prompt (``rlj.agents.rollout`` without
  ``turns``);
- ``KV reuse``: ``TurnSampler.next_turn`` from a cache holding the C tokens: it gathers the rows into a cache of
  C + O + T slots, prefills the O tokens and decodes (``rlj.turn_sampler``);
- ``prefill C``: ``Sampler.sample`` with T = 1 on the C tokens (the prefill that reuse saves).

  python -m launch.bench --case agent_turns --model small-32m --batch 16 --new_tokens 64
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from launch import bench
from models import presets
from models.transformer import Transformer
from rlj.buckets import round_up
from rlj.sampler import Sampler, SamplerConfig
from rlj.turn_sampler import TurnSampler


def measure(*, model: str, rows: int, contexts: tuple[int, ...], observation: int, new_tokens: int, dtype: str,
            repeats: int) -> list[dict]:
  mc = dataclasses.replace(presets.get(model), dtype=dtype, param_dtype=dtype)
  m = Transformer(mc)
  tok = jnp.zeros((1, 1), jnp.int32)
  params = nn.unbox(jax.jit(lambda r: m.init(r, tok, tok, tok + 1)["params"])(jax.random.key(0)))
  rng = np.random.default_rng(0)
  cfg = dict(num_samples=1, eos_id=None, temperature=1.0)

  def median(fn) -> float:
    return statistics.median(bench.time_calls(fn, repeats=repeats))

  out = []
  for c in contexts:
    context = rng.integers(4, mc.vocab_size, size=(rows, c)).astype(np.int32)
    obs = rng.integers(4, mc.vocab_size, size=(rows, observation)).astype(np.int32)
    whole = np.concatenate([context, obs], 1)
    again = Sampler(m, SamplerConfig(max_new_tokens=new_tokens, keep_cache=True, **cfg))
    t_again = median(lambda: again.sample(params, whole, np.ones_like(whole), jax.random.key(1)).tokens)
    pre = Sampler(m, SamplerConfig(max_new_tokens=1, **cfg))
    t_pre = median(lambda: pre.sample(params, context, np.ones_like(context), jax.random.key(1)).tokens)
    _, cache = pre.sample(params, context, np.ones_like(context), jax.random.key(1), return_cache=True)
    slots = round_up(c + observation + new_tokens, 64)
    turns = TurnSampler(Sampler(m, SamplerConfig(max_new_tokens=new_tokens, **cfg)), max_slots=slots,
                        chunk_buckets=(observation,))
    rows_ = np.arange(rows)
    keep = np.full((rows,), c)
    chunks = [list(o) for o in obs]
    t_reuse = median(lambda: turns.next_turn(params, cache, rows_, keep, chunks, np.full((rows,), c),
                                             jax.random.key(1))[0])
    out.append({"context C": c, "observation O": observation, "T": new_tokens, "rows": rows,
                "re-prefill ms": f"{t_again * 1e3:.1f}", "KV reuse ms": f"{t_reuse * 1e3:.1f}",
                "prefill C ms": f"{t_pre * 1e3:.1f}", "reuse / re-prefill": f"{t_reuse / t_again:.2f}"})
  return out


def run(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
  model = args.model or "small-32m"
  rows = measure(model=model, rows=args.batch or 16, contexts=(64, 256, 512), observation=16,
                 new_tokens=args.new_tokens or 64, dtype=args.dtype, repeats=args.repeats)
  return rows, [f"{model}; median wall ms of each compiled call after one warm-up (the KV-reuse call includes "
                "gathering the rows into the continued cache)."]
