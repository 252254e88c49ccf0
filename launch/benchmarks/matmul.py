"""Benchmark case ``decode_matmuls``: each weight matmul of one decode step, timed alone.

A decode step of an L-layer model multiplies its [rows, D] activations by seven weight matrices per layer
(q, k, v, o, gate, up, down) and then by the [D, V] output projection. Here each distinct shape is timed on its
own: ``x @ W`` inside a jitted ``fori_loop``, one W reused by every iteration, so W stays in the processor's
caches when it fits them. A row gives the time per matmul, its FLOP rate, how many of them a step runs and
their share of a step. Together with the sampler case's "matmuls alone" column it shows whether the step's
matmuls are bound by their size (small N or K pay a fixed cost per call) or by streaming weights from memory.
"""
from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np

from launch import bench
from models import presets


def layer_shapes(config) -> dict[str, tuple[int, int]]:
  """(K, N) of each weight matmul of one layer of a decode step, by name: x [rows, K] @ W [K, N]."""
  c = config
  d, f, hq, hkv = c.embed_dim, c.mlp_dim, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  return dict(q=(d, hq), k=(d, hkv), v=(d, hkv), o=(hq, d), gate=(d, f), up=(d, f), down=(f, d))


def step_shapes(config) -> dict[tuple[int, int], int]:
  """(K, N) of each weight matmul of one decode step -> how many the step runs (``layer_shapes`` per layer,
  then the output projection)."""
  counts: collections.Counter = collections.Counter()
  for k_n in layer_shapes(config).values():
    counts[k_n] += config.num_layers
  counts[(config.embed_dim, config.vocab_size)] += 1
  return dict(counts)


def time_matmul(rows: int, k: int, n: int, *, dtype: str, iters: int = 100, repeats: int = 3) -> float:
  """Seconds per [rows, k] x [k, n] matmul: ``iters`` dependent matmuls in a jitted loop, best of ``repeats``.

  Each iteration's input depends on the previous output (one column of it), so XLA can neither hoist nor
  overlap the matmuls; the extra add is [rows, k] elementwise, small next to the matmul.
  """
  dt = jnp.dtype(dtype)
  x = jnp.ones((rows, k), dt)
  w = jnp.asarray(np.random.default_rng(0).random((k, n)) * 1e-4, dt)   # small: the loop's values stay O(1)

  def body(_, acc):
    return (x + acc[:, :1]) @ w

  run = jax.jit(lambda x, w: jax.lax.fori_loop(0, iters, body, jnp.zeros((rows, n), dt)))
  return min(bench.time_calls(lambda: run(x, w), repeats=repeats)) / iters


def rows_for(model_name: str, *, rows: int, dtype: str, iters: int = 100, repeats: int = 3) -> list[dict]:
  """One result row per distinct weight shape of ``model_name``'s decode step, then one for the whole step."""
  shapes = step_shapes(presets.get(model_name))
  itemsize = jnp.dtype(dtype).itemsize
  times = {kn: time_matmul(rows, *kn, dtype=dtype, iters=iters, repeats=repeats) for kn in shapes}
  step_s = sum(times[kn] * count for kn, count in shapes.items())
  out = [{"model": model_name, "rows": rows, "dtype": dtype, "weight [K, N]": f"[{k}, {n}]",
          "weight MB": k * n * itemsize / 2**20, "us per matmul": t * 1e6, "GFLOP/s": 2 * rows * k * n / t / 1e9,
          "per step": shapes[(k, n)], "ms per step": t * shapes[(k, n)] * 1e3,
          "share of step": t * shapes[(k, n)] / step_s}
         for (k, n), t in times.items()]
  flops = sum(2 * rows * k * n * count for (k, n), count in shapes.items())
  out.append({"model": model_name, "rows": rows, "dtype": dtype, "weight [K, N]": "all, one step",
              "weight MB": sum(k * n * count for (k, n), count in shapes.items()) * itemsize / 2**20,
              "GFLOP/s": flops / step_s / 1e9, "per step": sum(shapes.values()), "ms per step": step_s * 1e3,
              "share of step": 1.0})
  return out


def run(args) -> tuple[list[dict], list[str]]:
  """``launch.bench`` case ``decode_matmuls``."""
  rows = rows_for(args.model or "small-50m", rows=args.batch or 32, dtype=args.dtype, repeats=args.repeats)
  return rows, ["Each distinct weight shape of a decode step: x [rows, K] @ W [K, N] in a jitted fori_loop of "
                "100 dependent matmuls with one W (cache-resident when it fits), best of --repeats. "
                "ms per step = us per matmul x per step; the last row sums them (no norms, attention, cache "
                "or sampling)."]
