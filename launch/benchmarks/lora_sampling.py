r"""LoRA sampling: decode on merged weights vs on the base plus unmerged adapters.

With LoRA the sampler can read W0 + (alpha / r) B A merged once per rollout (``rlj.lora_policy.LoraPolicy.merged``,
one program over the targeted kernels), or the base kernels and the adapters, computing x W0 + x A B in every
projection of every decode step (``models.lora.unmerged_variables``, ``models.layers.with_lora``). This case
times, on the same weights, cache and tokens:

- ``merge``: the merge program (once per rollout);
- ``decode step``: one cached forward of ``--batch`` rows at prompt length ``--seq``, each form;
- ``rollout``: ``merge + T x merged step`` against ``T x unmerged step`` for ``--new_tokens`` T.

The decode steps use the scanned model with its KV cache, the same for both forms.

  python -m launch.bench --case lora_sampling --model small-32m --batch 64 --seq 32 --new_tokens 64 --rank 16
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp

from launch import bench
from models import kv_cache, lora, presets
from models.transformer import Transformer


def measure(*, model: str, rows: int, prompt_len: int, new_tokens: int, rank: int, dtype: str,
            repeats: int) -> list[dict]:
  mc = dataclasses.replace(presets.get(model), dtype=dtype, param_dtype=dtype)
  m = Transformer(mc)
  tok = jnp.zeros((rows, 1), jnp.int32)
  params = nn.unbox(jax.jit(lambda r: m.init(r, tok, tok, tok + 1)["params"])(jax.random.key(0)))
  cfg = lora.LoraConfig(rank=rank, alpha=2.0 * rank)
  adapters = lora.init_adapters(jax.random.key(1), params, cfg)
  adapters = jax.tree.map(lambda x: x + 1e-3, adapters)   # b != 0: the unmerged matmuls do real work
  cache = jax.jit(lambda: kv_cache.init_cache(mc, rows, prompt_len + new_tokens))()
  pos = jnp.full((rows, 1), prompt_len, jnp.int32)
  cache = cache._replace(index=jnp.asarray(prompt_len, jnp.int32))   # decode at slot P, as after a prefill

  merge = jax.jit(lambda p, a: lora.merge(p, a, cfg))

  @jax.jit
  def step_merged(p, c):
    return m.apply({"params": p}, tok, pos, tok + 1, cache=c)[0]

  @jax.jit
  def step_unmerged(p, a, c):
    return m.apply(lora.unmerged_variables(p, a, cfg), tok, pos, tok + 1, cache=c)[0]

  merged = merge(params, adapters)
  t_merge = statistics.median(bench.time_calls(lambda: merge(params, adapters), repeats=repeats))
  t_m = statistics.median(bench.time_calls(lambda: step_merged(merged, cache), repeats=repeats * 3))
  t_u = statistics.median(bench.time_calls(lambda: step_unmerged(params, adapters, cache), repeats=repeats * 3))
  shape = f"{model} rank {rank}, {rows} rows, prompt {prompt_len}, T={new_tokens}"
  return [
      {"case": "merge (once per rollout)", "shape": shape, "ms": f"{t_merge * 1e3:.2f}"},
      {"case": "decode step, merged weights", "shape": shape, "ms": f"{t_m * 1e3:.2f}"},
      {"case": "decode step, base + adapters", "shape": shape, "ms": f"{t_u * 1e3:.2f}"},
      {"case": "rollout, merged (merge + T steps)", "shape": shape, "ms": f"{(t_merge + new_tokens * t_m) * 1e3:.1f}"},
      {"case": "rollout, base + adapters (T steps)", "shape": shape, "ms": f"{new_tokens * t_u * 1e3:.1f}"},
  ]


def run(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
  rows = measure(model=args.model or "small-32m", rows=args.batch or 64, prompt_len=args.seq or 32,
                 new_tokens=args.new_tokens or 64, rank=args.rank or 16, dtype=args.dtype, repeats=args.repeats)
  return rows, ["Median wall ms of each program after one warm-up call; the decode steps use the same KV cache "
                "and tokens. The sampler decodes on merged weights (rlj/rl_loop.py Trainer.sampler_params)."]
