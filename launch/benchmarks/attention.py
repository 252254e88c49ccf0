r"""Attention case: the teacher-forced causal self-attention of one layer, per implementation the platform has
(``models.attention_kernels``: the einsum path "xla" everywhere, "cudnn" on GPU, "splash" on TPU).

For q [B, S, H, Dh] and k, v [B, KVH, S, Dh] of a preset's head shape, with the first rows left-padded, each
implementation runs forward + backward (the gradient of a weighted sum of the outputs with respect to q, k and
v), jitted once. Reported: best and median wall time, causal attention TFLOP/s (4·B·H·S²·Dh / 2 forward, 2.5x
that for forward + backward: the work a causal kernel needs, not what the einsum path spends), the compiled
program's temporaries, and the largest difference from the einsum path on real tokens.

  python -m launch.bench --case attention --model llama-3.2-1b --batch 4 --seq 4096 --dtype bfloat16
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from launch import bench
from models import attention_kernels, presets
from models.attention import attention_mask, causal_self_attention


def implementations(platform: str, dtype, head_dim: int = 64) -> list[str]:
  """The einsum path and the platform's kernel (if it has one for ``dtype`` and ``head_dim``)."""
  kernel = attention_kernels.resolve("auto", platform, dtype=dtype, head_dim=head_dim)
  return ["xla"] + ([kernel] if kernel != "xla" else [])


def measure(*, model: str, batch: int, seq: int, dtype: str, repeats: int) -> list[dict]:
  mc = presets.get(model)
  h, kvh, dh = mc.num_heads, mc.num_kv_heads, mc.head_dim
  dt = jnp.dtype(dtype)
  r = np.random.default_rng(0)
  q = jnp.asarray(r.normal(size=(batch, seq, h, dh)), dt)
  k, v = (jnp.asarray(r.normal(size=(batch, kvh, seq, dh)), dt) for _ in range(2))
  seg = np.ones((batch, seq), np.int32)
  seg[: batch // 2, : seq // 8] = 0                                  # half the rows left-padded by S/8
  seg = jnp.asarray(seg)
  real = (seg > 0)[:, :, None, None]
  w = jnp.asarray(r.normal(size=q.shape), dt) * real.astype(dt)
  scale = dh ** -0.5

  def attend(impl):
    if impl == "xla":
      return lambda q, k, v: causal_self_attention(q, k, v, attention_mask(seg), scale=scale)
    return lambda q, k, v: attention_kernels.self_attention(q, k, v, seg, impl=impl, scale=scale)

  flops = 4 * batch * h * seq * seq * dh / 2 * 3.5   # causal forward (1) + backward (2.5)
  rows, ref = [], None
  for impl in implementations(jax.default_backend(), dt, dh):
    fn = attend(impl)
    step = jax.jit(jax.value_and_grad(lambda q, k, v, f=fn: jnp.sum((f(q, k, v) * w).astype(jnp.float32)),
                                      argnums=(0, 1, 2)))
    compiled = step.lower(q, k, v).compile()
    mem = compiled.memory_analysis()
    times = bench.time_calls(lambda: compiled(q, k, v), repeats=repeats)
    out = jax.jit(fn)(q, k, v)
    out = np.where(np.asarray(real), np.asarray(out, np.float32), 0.0)
    ref = out if ref is None else ref
    best = min(times)
    rows.append({"impl": impl, "B x S x H/KVH x Dh": f"{batch} x {seq} x {h}/{kvh} x {dh}", "dtype": dt.name,
                 "fwd+bwd ms (best)": best * 1e3, "fwd+bwd ms (median)": float(np.median(times)) * 1e3,
                 "causal TFLOP/s": flops / best / 1e12,
                 "temp MB": (mem.temp_size_in_bytes / 2**20) if mem is not None else float("nan"),
                 "max |diff| vs xla": float(np.max(np.abs(out - ref)))})
  return rows


def run(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
  rows = measure(model=args.model or "small-32m", batch=args.batch or 2, seq=args.seq or 512,
                 dtype=args.dtype, repeats=args.repeats)
  return rows, [f"Platform {jax.default_backend()}: implementations {[r['impl'] for r in rows]} "
                "(a CPU has only the einsum path; the kernels run on GPU and TPU)."]
