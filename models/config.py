"""Model configuration: one frozen dataclass that describes a Llama / Qwen2 / Gemma decoder.

Family differences are switches, not subclasses:

| field              | Llama      | Qwen2      | Gemma                 |
|--------------------|------------|------------|-----------------------|
| activation         | "silu"     | "silu"     | "gelu_tanh"           |
| norm_plus_one      | False      | False      | True  (x * (1 + w))   |
| qkv_bias           | False      | True       | False                 |
| tie_embeddings     | 8B: False  | 0.5B: True | True                  |
| scale_embeddings   | False      | False      | True  (x * sqrt(D))   |

Use ``dataclasses.replace(config, dtype="bfloat16")`` to derive variants.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp

ACTIVATIONS = ("silu", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a decoder-only transformer.

  Attributes:
    vocab_size: V, rows of the embedding table.
    num_layers: L, transformer blocks (stacked on one leading "layers" axis unless ``scan_layers`` is False).
    embed_dim: D, width of the residual stream.
    num_heads: H, query heads.
    num_kv_heads: KVH, key/value heads (grouped-query attention; H must divide by KVH).
    head_dim: Dh, width of one head.
    mlp_dim: F, hidden width of the gated MLP.
    activation: "silu" (SwiGLU, Llama/Qwen2) or "gelu_tanh" (GeGLU, Gemma).
    norm_eps: epsilon inside the RMSNorm square root.
    norm_plus_one: Gemma's RMSNorm, which multiplies by (1 + w) and initialises w at 0.
    rope_theta: RoPE base frequency.
    rope_scaling: Llama-3.1 frequency scaling as (factor, low_freq_factor, high_freq_factor,
      original_max_position_embeddings), or None for plain RoPE.
    qkv_bias: biases on the q/k/v projections (Qwen2).
    tie_embeddings: the output projection is the transposed embedding table.
    scale_embeddings: multiply embeddings by sqrt(D) cast to the compute dtype (Gemma).
    param_dtype: storage dtype of the parameters ("float32" or "bfloat16").
    dtype: compute dtype of activations and matmuls; logits are always float32.
    remat: rematerialise each block in the backward pass (saves activation memory).
    scan_layers: the L blocks are one ``nn.scan`` over parameters stacked [L, ...] (compile time independent
      of depth; what training and checkpoints use). False unrolls them into modules ``layers_0`` ..
      ``layers_{L-1}`` with a parameter tree and a KV cache array per layer (``models.transformer.unstack_layers``
      converts the parameters): the sampler's CPU decode program, where reading a layer out of a stacked
      buffer is a copy every step.
    cache_keys_slots_last: the KV cache holds keys [.., KVH, Dh, S_max] instead of [.., KVH, S_max, Dh]
      (``models.kv_cache``), so a decode step's scores are a plain [G, Dh] x [Dh, S] matmul per (row, KV
      head). Set by the sampler's CPU decode model: on XLA:CPU the scores over [S, Dh] keys ran as a
      multiply-and-sum over 64-wide rows (small-50m decode at batch 32: 21.6-22.2 -> 19.1 ms per step). On
      TPU a one-slot write then touches a column of (8, 128) tiles per KV head instead of a row; with it the
      compiler's estimate of the Gemma-2B v5p-32 sampler program rose 4.28 -> 4.36 ms and its temporaries
      1.40 -> 1.43 GiB (``launch.aot``), so it is off elsewhere.
  """
  vocab_size: int
  num_layers: int
  embed_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  activation: str = "silu"
  norm_eps: float = 1e-6
  norm_plus_one: bool = False
  rope_theta: float = 10_000.0
  rope_scaling: Optional[tuple[float, float, float, int]] = None
  qkv_bias: bool = False
  tie_embeddings: bool = False
  scale_embeddings: bool = False
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: bool = False
  scan_layers: bool = True
  cache_keys_slots_last: bool = False

  def __post_init__(self):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation {self.activation!r}: choose one of {ACTIVATIONS}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
    for name in ("param_dtype", "dtype"):
      jnp.dtype(getattr(self, name))  # raises on an unknown dtype name
    if self.rope_scaling is not None and len(self.rope_scaling) != 4:
      raise ValueError("rope_scaling must be (factor, low_freq_factor, high_freq_factor, original_max_len)")

  @property
  def jnp_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  def num_params(self) -> int:
    """Parameter count computed from the shapes (matches ``jax.eval_shape`` of ``Transformer.init``)."""
    d, hd = self.embed_dim, self.head_dim
    attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
    if self.qkv_bias:
      attn += hd * (self.num_heads + 2 * self.num_kv_heads)
    block = attn + 3 * d * self.mlp_dim + 2 * d
    head = 0 if self.tie_embeddings else d * self.vocab_size
    return self.vocab_size * d + self.num_layers * block + d + head
