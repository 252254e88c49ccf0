r"""Log-probs case: dense vs time-chunked vs vocab-parallel teacher-forced log-probs (``rlj.logprobs``).

Each path computes logp[n, t] = log_softmax(logits[n, t])[y[n, t]] for logits [N, T, V] in float32, forward
and backward (the gradient of sum(logp) with respect to the logits, as a train step needs), jitted once.
Reported per path: best wall time of the jitted call, and the compiled program's temporary memory
(``memory_analysis().temp_size_in_bytes``, buffers beyond the inputs and outputs), which is where a
materialised [N, T, V] log-softmax shows up. The vocab-parallel path splits V over a "tensor" mesh axis of
every device (one device: a one-shard shard_map, i.e. its overhead only).

  python -m launch.bench --case logprobs --batch 8 --new_tokens 256 --vocab 32768
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from launch import bench
from rlj import logprobs, sharding


def path_fns(mesh, *, chunk_size: int) -> dict:
  """name -> f(logits [N, T, V], targets [N, T]) -> logp [N, T]."""
  return {
      "dense": lambda lg, y: logprobs.token_logprobs(lg, y, temperature=1.0),
      f"chunked (C={chunk_size})": lambda lg, y: logprobs.token_logprobs(lg, y, temperature=1.0,
                                                                        chunk_size=chunk_size),
      "vocab-parallel": lambda lg, y: logprobs.vocab_parallel_token_logprobs(lg, y, temperature=1.0, mesh=mesh),
  }


def measure(*, rows: int, length: int, vocab: int, repeats: int, chunk_size: int = 64) -> list[dict]:
  """One row per path: forward + backward wall time and compiled temporary bytes."""
  mesh = sharding.make_mesh([("data", 1), ("fsdp", 1), ("tensor", -1)])
  rng = np.random.default_rng(0)
  logits_sh = jax.sharding.NamedSharding(mesh, jax.P(None, None, "tensor"))
  logits = jax.device_put(rng.standard_normal((rows, length, vocab), np.float32), logits_sh)
  targets = jax.device_put(rng.integers(0, vocab, (rows, length)).astype(np.int32),
                           jax.sharding.NamedSharding(mesh, jax.P()))
  out = []
  reference = None
  for name, fn in path_fns(mesh, chunk_size=chunk_size).items():
    step = jax.jit(jax.value_and_grad(lambda lg, y, f=fn: jnp.sum(f(lg, y))))
    with jax.set_mesh(mesh):
      compiled = step.lower(logits, targets).compile()
      mem = compiled.memory_analysis()
      times = bench.time_calls(lambda: compiled(logits, targets), repeats=repeats)
      value = float(compiled(logits, targets)[0])
    reference = value if reference is None else reference
    out.append({"path": name, "N x T x V": f"{rows} x {length} x {vocab}", "devices": len(mesh.devices.flat),
                "fwd+bwd ms (best)": min(times) * 1e3, "fwd+bwd ms (median)": float(np.median(times)) * 1e3,
                "temp MB": (mem.temp_size_in_bytes / 2**20) if mem is not None else float("nan"),
                "logits MB": rows * length * vocab * 4 / 2**20,
                "sum logp rel. diff vs dense": abs(value - reference) / abs(reference)})
  return out


def run(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
  rows = measure(rows=args.batch or 8, length=args.new_tokens or 256, vocab=args.vocab or 32768,
                 repeats=args.repeats)
  return rows, ["Gradient of sum(logp) with respect to float32 logits; temp MB from the compiled program's "
                "memory analysis (inputs and outputs excluded)."]
