"""Fused attention kernels for the teacher-forced passes (log-probs, the train step, reward models).

  out[b, s, h] = softmax_t(cap(scale · q[b, s, h] · k[b, t, h // G]) + mask[b, s, t]) v[b, t, h // G],
  mask[b, s, t] = (t <= s) and (s - W < t if the layer slides) and (seg[b, s] == seg[b, t]),

the same attention as ``models.attention.dot_product_attention`` over ``attention_mask`` (and
``sliding_window_mask``), with the padding mask written as segment ids (0 on left padding, 1 on real tokens;
packed rows number their segments 1, 2, ...). Padding queries attend to padding keys here, where the einsum
path gives them a uniform average; no real token reads either.

Implementations (``ModelConfig.attention``):

  "xla"     the einsum path (``models.attention.causal_self_attention``), the reference; every platform.
  "splash"  TPU: Pallas splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``), forward and
            backward kernels that skip the fully masked [block_q, block_kv] tiles (causal, sliding window); run
            per shard under ``jax.shard_map`` (batch over the "batch" axes, heads over the "heads" axis).
  "cudnn"   GPU: ``jax.nn.dot_product_attention(implementation="cudnn")`` (cuDNN flash attention; bf16/fp16).
  "auto"    "splash" on TPU, "cudnn" on GPU for a bf16/fp16 model without a logit soft-cap and with heads of at
            most 128, else "xla".

The KV-cache path (prefill and decode in the sampler) always runs the einsum path. A Pallas call is not
partitioned by the compiler, so splash runs per shard of the context mesh (``jax.set_mesh``, as the trainer's
programs are called); traced without one on a host with several devices, the model keeps the einsum path
(``available``).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from models.config import ATTENTION_IMPLS as IMPLS

_interpret = [False]


@contextlib.contextmanager
def pallas_interpret():
  """Traces the Pallas kernels in interpret mode (any platform; slow): how CPU tests check the TPU kernel."""
  _interpret.append(True)
  try:
    yield
  finally:
    _interpret.pop()


def resolve(impl: str, platform: str, *, dtype=jnp.float32, logit_cap: Optional[float] = None,
            head_dim: int = 128) -> str:
  """The implementation "auto" stands for on ``platform`` ("cpu", "gpu"/"cuda"/"rocm", "tpu"); others pass.

  cuDNN's flash attention is taken for bf16/fp16 models without a logit soft-cap whose head size is a multiple
  of 8 up to 128 (the sizes every cuDNN 9 flash kernel supports); other GPU models keep the einsum path."""
  if impl not in IMPLS:
    raise ValueError(f"attention {impl!r}: choose one of {IMPLS}")
  if impl != "auto":
    return impl
  if platform == "tpu":
    return "splash"
  if (platform in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and logit_cap is None
      and head_dim <= 128 and head_dim % 8 == 0):
    return "cudnn"
  return "xla"


def available(impl: str) -> bool:
  """Whether the kernel ``impl`` can run where it is being traced: splash needs a context mesh on a host with
  several devices (it runs per shard); cuDNN's call carries its own partitioning rules."""
  if impl != "splash":
    return True
  return not jax.sharding.get_abstract_mesh().empty or jax.device_count() == 1


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, impl: str,
                   scale: float, logit_cap: Optional[float] = None, window: Optional[int] = None,
                   sliding=False) -> jax.Array:
  """Causal self-attention of S tokens with ``impl`` ("splash" or "cudnn").

  Args:
    q: [B, S, H, Dh]; k, v: [B, KVH, S, Dh] (head-major, as ``models.attention.Attention`` holds them).
    segment_ids: [B, S] int32; a token sees the earlier tokens of its own segment (0: padding).
    scale: the score scale; logit_cap: the scores' soft-cap (splash only), or None.
    window: W of sliding layers, or None; sliding: whether this layer slides (a Python or a traced bool).
  Returns:
    [B, S, H, Dh] in q's dtype.
  """
  if window is None or sliding is False:
    return _dispatch(q, k, v, segment_ids, impl, scale, logit_cap, None)
  if sliding is True:
    return _dispatch(q, k, v, segment_ids, impl, scale, logit_cap, window)
  return jax.lax.cond(sliding, lambda *a: _dispatch(*a, impl, scale, logit_cap, window),
                      lambda *a: _dispatch(*a, impl, scale, logit_cap, None), q, k, v, segment_ids)


def _dispatch(q, k, v, segment_ids, impl, scale, logit_cap, window):
  if impl == "cudnn":
    if logit_cap is not None:
      raise ValueError("attention 'cudnn' has no logit soft-cap; use attention='xla' for this model")
    same = segment_ids[:, :, None] == segment_ids[:, None, :]                    # [B, S, S]
    out = jax.nn.dot_product_attention(
        q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask=same[:, None], scale=scale, is_causal=True,
        local_window_size=None if window is None else (window - 1, 0), implementation="cudnn")
    return out.astype(q.dtype)
  if impl == "splash":
    return _sharded_splash(q, k, v, segment_ids, scale=scale, logit_cap=logit_cap, window=window)
  raise ValueError(f"no kernel for attention {impl!r}")


# ----------------------------------------------------------------------------------------------------------
# Splash attention (TPU)
# ----------------------------------------------------------------------------------------------------------

# Largest query / key tile of the splash kernels (tiles are 128, 256 or 512 tokens: the largest dividing the
# sequence padded to a multiple of 128).
MAX_BLOCK = 512


def _block(s: int) -> int:
  return next(b for b in (512, 256, 128) if b <= MAX_BLOCK and s % b == 0)


def _splash_kernel(heads: int, s: int, window: Optional[int], logit_cap: Optional[float], interpret: bool,
                   b: int):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  one = sm.CausalMask((s, s)) if window is None else sm.LocalMask((s, s), (window - 1, 0), offset=0)
  blocks = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                         block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  # Built in the trace that calls it (its block tables become that program's constants); the mask's tables are
  # computed on the host once per shape (``splash_attention_mask_info.process_mask`` caches them).
  return sk.make_splash_mha(sm.MultiHeadMask([one] * heads), block_sizes=blocks, head_shards=1, q_seq_shards=1,
                            attn_logits_soft_cap=logit_cap, interpret=interpret)


def _splash_local(q, k, v, segment_ids, *, scale, logit_cap, window):
  """Splash attention of one shard: q [b, S, h, Dh], k/v [b, kvh, S, Dh], segment ids [b, S]."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  b, s, h, dh = q.shape
  s_pad = -(-s // 128) * 128
  qh = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)                  # [b, h, S, Dh]
  seg = segment_ids.astype(jnp.int32)
  if s_pad != s:   # the tail gets its own segment: real tokens never see it
    pad = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, s_pad - s), (0, 0)])
    qh, k, v = pad(qh), pad(k), pad(v)
    seg = jnp.pad(seg, [(0, 0), (0, s_pad - s)], constant_values=-1)
  kernel = _splash_kernel(h, s_pad, window, logit_cap, _interpret[-1], _block(s_pad))
  out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, sk.SegmentIds(s1, s1)))(qh, k, v, seg)
  return out[:, :, :s].transpose(0, 2, 1, 3).astype(q.dtype)


def _axes(name: str, size: int, mesh) -> Optional[tuple]:
  """The mesh axes the logical ``name`` maps to under the current rules, when they divide ``size``."""
  spec = nn.logical_to_mesh_axes((name,))
  axes = spec[0] if len(spec) else None
  if axes is None or not isinstance(axes, (str, tuple)):
    return None
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  axes = tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)
  if not axes or size % int(np.prod([mesh.shape[a] for a in axes])):
    return None
  return axes


def _sharded_splash(q, k, v, segment_ids, **kw):
  """``_splash_local`` per shard of the context mesh (``jax.set_mesh``): a Pallas call is not partitioned by
  the compiler, so each device runs the kernel on its rows and heads; without a mesh, directly."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty and jax.device_count() > 1:
    raise ValueError("attention 'splash' on several devices runs per shard: call it under jax.set_mesh(mesh)")
  if mesh.empty or mesh.size == 1:
    return _splash_local(q, k, v, segment_ids, **kw)
  batch = _axes("batch", q.shape[0], mesh)
  heads = _axes("heads", q.shape[2], mesh)
  if heads is not None and k.shape[1] % int(np.prod([mesh.shape[a] for a in heads])):
    heads = None   # KV heads that the head shards do not divide: keep the heads whole
  fn = functools.partial(_splash_local, **kw)
  return jax.shard_map(fn, mesh=mesh, in_specs=(P(batch, None, heads, None), P(batch, heads, None, None),
                                                P(batch, heads, None, None), P(batch, None)),
                       out_specs=P(batch, None, heads, None), check_vma=False)(q, k, v, segment_ids)
