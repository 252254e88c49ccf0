r"""Sampling in rounds: decode on rows that have stopped, one-shot against rounds that drop them.

A random-weight model with a stop set of ``vocab / 32`` ids stops each row after about 32 tokens on average
(geometric lengths: many short rows and a tail to T), a length-skewed rollout like RL's. The case times, for
``--batch`` prompts x 8 samples, prompt ``--seq`` and T = ``--new_tokens``:

- ``one-shot``: ``Sampler.sample`` (every row decodes until the longest stops), with its measured fraction of
  row-steps spent on rows that had stopped (``decode/finished_row_frac``);
- ``R rounds``: ``RoundSampler`` with rounds of T / R tokens, later rounds on the rows still running (batch buckets
  N / 8, N / 4, N / 2, N).

  python -m launch.bench --case sampler_rounds --model small-32m --batch 8 --seq 32 --new_tokens 64
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
from rlj import rollout_stats
from rlj.sampler import Sampler, SamplerConfig
from rlj.sampler_rounds import round_sampler


def measure(*, model: str, prompts: int, prompt_len: int, new_tokens: int, rounds: tuple[int, ...], dtype: str,
            repeats: int) -> list[dict]:
  mc = dataclasses.replace(presets.get(model), dtype=dtype, param_dtype=dtype)
  m = Transformer(mc)
  tok = jnp.zeros((1, 1), jnp.int32)
  params = nn.unbox(jax.jit(lambda r: m.init(r, tok, tok, tok + 1)["params"])(jax.random.key(0)))
  g = 8
  n = prompts * g
  stops = tuple(range(4, 4 + mc.vocab_size // 32))
  prompt = np.random.default_rng(0).integers(4 + len(stops), mc.vocab_size, size=(prompts, prompt_len))
  prompt, mask = prompt.astype(np.int32), np.ones((prompts, prompt_len), np.int32)
  base = dict(eos_id=None, stop_ids=stops, temperature=1.0)

  def timed(s):
    keys = iter(range(1000))
    times = bench.time_calls(lambda: s.sample(params, prompt, mask, jax.random.key(next(keys))).tokens,
                             repeats=repeats)
    lengths = np.asarray(s.sample(params, prompt, mask, jax.random.key(999)).lengths)
    return statistics.median(times), lengths

  one = Sampler(m, SamplerConfig(max_new_tokens=new_tokens, num_samples=g, keep_cache=True, **base))
  t_one, lengths = timed(one)
  frac = rollout_stats.finished_row_steps(lengths)["decode/finished_row_frac"]
  out = [{"sampler": "one-shot", "ms": f"{t_one * 1e3:.0f}", "vs one-shot": "1.00",
          "mean length": f"{lengths.mean():.1f}", "decode on stopped rows": f"{frac:.0%}"}]
  for r in rounds:
    r_len = -(-new_tokens // r)
    rs = round_sampler(lambda c: Sampler(m, c), SamplerConfig(max_new_tokens=new_tokens, num_samples=g, **base),
                       rounds=r, max_prompt_len=prompt_len, rows=n)
    t_r, lengths_r = timed(rs)
    out.append({"sampler": f"{r} rounds of {r_len}", "ms": f"{t_r * 1e3:.0f}", "vs one-shot": f"{t_r / t_one:.2f}",
                "mean length": f"{lengths_r.mean():.1f}", "decode on stopped rows": "-"})
  return out


def run(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
  model = args.model or "small-32m"
  rows = measure(model=model, prompts=args.batch or 8, prompt_len=args.seq or 32, new_tokens=args.new_tokens or 64,
                 rounds=(2, 4), dtype=args.dtype, repeats=args.repeats)
  return rows, [f"{model}, {args.batch or 8} prompts x 8 samples; median wall ms of a whole rollout after one warm-up "
                "(rounds include the host's reads between rounds and the rows' gathers)."]
