"""Model configuration: one frozen dataclass that describes a Llama / Qwen2 / Qwen3 / Gemma 1-3 / Mistral decoder.

Family differences are switches, not subclasses (norm_plus_one: x · (1 + w); scale_embeddings: x · sqrt(D)):

| field                 | Llama     | Mistral | Qwen2      | Qwen3      | Gemma     | Gemma 2     | Gemma 3           |
|-----------------------|-----------|---------|------------|------------|-----------|-------------|-------------------|
| activation            | silu      | silu    | silu       | silu       | gelu_tanh | gelu_tanh   | gelu_tanh         |
| norm_plus_one         | False     | False   | False      | False      | True      | True        | True              |
| qkv_bias              | False     | False   | True       | False      | False     | False       | False             |
| qk_norm               | False     | False   | False      | True       | False     | False       | True              |
| post_norms            | False     | False   | False      | False      | False     | True        | True              |
| tie_embeddings        | 3.2: True | False   | 0.5B: True | 0.6B: True | True      | True        | True              |
| scale_embeddings      | False     | False   | False      | False      | True      | True        | True              |
| query_pre_attn_scalar | None      | None    | None       | None       | None      | 256         | 256               |
| attn/final softcap    | None      | None    | None       | None       | None      | 50 / 30     | None              |
| layer_types           | full      | sliding | full       | full       | full      | alternating | 5 sliding, 1 full |
| rope_local_theta      | None      | None    | None       | None       | None      | None        | 10k (global 1M)   |

Use ``dataclasses.replace(config, dtype="bfloat16")`` to derive variants. Defaults keep the Llama numerics: a
field left at its default adds no operation to the forward pass.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp

ACTIVATIONS = ("silu", "gelu_tanh")
LAYER_TYPES = ("full", "sliding")
ATTENTION_IMPLS = ("auto", "xla", "splash", "cudnn")   # models.attention_kernels.IMPLS


def sliding_pattern(num_layers: int, every: int) -> tuple[str, ...]:
  """``layer_types`` with every ``every``-th layer global and the rest sliding-window:

  layer i is "full" when (i + 1) % every == 0, else "sliding" (Gemma 2: every=2, starting with a sliding
  layer; Gemma 3: every=6, i.e. 5 local : 1 global), as Hugging Face's ``sliding_window_pattern`` does.
  """
  return tuple("full" if (i + 1) % every == 0 else "sliding" for i in range(num_layers))


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
    qk_norm: an RMSNorm over Dh of every query and key head before RoPE (Qwen3, Gemma 3), with the model's
      ``norm_plus_one`` and ``norm_eps``; its weights [Dh] are shared by the heads.
    post_norms: RMSNorms on the attention and MLP outputs before each residual add (Gemma 2/3 "sandwich"):
      x' = x + norm(Attn(norm(x))), x'' = x' + norm(MLP(norm(x'))).
    query_pre_attn_scalar: attention scores are q·k / sqrt(query_pre_attn_scalar) (Gemma 2/3); None: sqrt(Dh).
    attn_logit_softcap: c in scores <- c·tanh(scores / c) before the mask and softmax (Gemma 2); None: off.
    final_logit_softcap: c in logits <- c·tanh(logits / c) (Gemma 2); None: off.
    sliding_window: W, the keys a "sliding" layer's query sees: slots s - W < t <= s (itself and W - 1 before).
    layer_types: one of ``LAYER_TYPES`` per layer ("full": causal over all keys, "sliding": the last W keys);
      None: every layer "full". See ``sliding_pattern``.
    rope_local_theta: RoPE base of the "sliding" layers (Gemma 3: 10k, its global layers ``rope_theta`` 1M),
      which then take no ``rope_scaling``; None: every layer uses ``rope_theta`` and ``rope_scaling``.
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
    scan_unroll: layers per iteration of the scanned stack (``nn.scan``'s ``unroll``; the parameters stay
      stacked either way); 0: the platform's, every layer on CPU (XLA:CPU ran small-3m's GRPO train step at
      32 x 96 tokens in 538 ms unrolled against 601 ms as a loop, small-32m's in 3.68 s against 3.89 s, timed in
      one process in turn: the loop slices each layer's parameters and updates its gradients and residuals
      through dynamic slices), 1 elsewhere (one compiled block whatever the depth, as TPU programs want for
      compile time).
    cache_keys_slots_last: the KV cache holds keys [.., KVH, Dh, S_max] instead of [.., KVH, S_max, Dh]
      (``models.kv_cache``), so a decode step's scores are a plain [G, Dh] x [Dh, S] matmul per (row, KV
      head). Set by the sampler's CPU decode model: on XLA:CPU the scores over [S, Dh] keys ran as a
      multiply-and-sum over 64-wide rows (small-50m decode at batch 32: 21.6-22.2 -> 19.1 ms per step). On
      TPU a one-slot write then touches a column of (8, 128) tiles per KV head instead of a row; with it the
      compiler's estimate of the Gemma-2B v5p-32 sampler program rose 4.28 -> 4.36 ms and its temporaries
      1.40 -> 1.43 GiB (``launch.aot``), so it is off elsewhere.
    attention: the teacher-forced passes' attention (``models.attention_kernels``): "xla" (einsum, the
      reference), "splash" (TPU Pallas kernel), "cudnn" (GPU), or "auto" (the platform's: splash on TPU, cuDNN
      on GPU for bf16/fp16 without a logit soft-cap, else xla). The sampler's KV-cache path is always einsum.
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
  qk_norm: bool = False
  post_norms: bool = False
  query_pre_attn_scalar: Optional[float] = None
  attn_logit_softcap: Optional[float] = None
  final_logit_softcap: Optional[float] = None
  sliding_window: Optional[int] = None
  layer_types: Optional[tuple[str, ...]] = None
  rope_local_theta: Optional[float] = None
  tie_embeddings: bool = False
  scale_embeddings: bool = False
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: bool = False
  scan_layers: bool = True
  scan_unroll: int = 0
  cache_keys_slots_last: bool = False
  attention: str = "auto"

  def __post_init__(self):
    for name in ("rope_scaling", "layer_types"):   # JSON round trips turn tuples into lists (unhashable)
      if isinstance(getattr(self, name), list):
        object.__setattr__(self, name, tuple(getattr(self, name)))
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation {self.activation!r}: choose one of {ACTIVATIONS}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
    for name in ("param_dtype", "dtype"):
      jnp.dtype(getattr(self, name))  # raises on an unknown dtype name
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(f"attention {self.attention!r}: choose one of {ATTENTION_IMPLS}")
    if self.rope_scaling is not None and len(self.rope_scaling) != 4:
      raise ValueError("rope_scaling must be (factor, low_freq_factor, high_freq_factor, original_max_len)")
    if self.layer_types is not None:
      if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= set(LAYER_TYPES):
        raise ValueError(f"layer_types must hold num_layers={self.num_layers} entries from {LAYER_TYPES}, "
                         f"got {self.layer_types}")
      if "sliding" in self.layer_types and self.sliding_window is None:
        raise ValueError("layer_types has 'sliding' layers but sliding_window is None")
    if self.sliding_window is not None and (self.sliding_window < 1 or self.layer_types is None):
      raise ValueError(f"sliding_window={self.sliding_window} needs a positive window and layer_types saying "
                       "which layers slide (models.config.sliding_pattern)")
    for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap", "rope_local_theta"):
      if getattr(self, name) is not None and getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive or None, got {getattr(self, name)}")

  @property
  def sliding_layers(self) -> tuple[bool, ...]:
    """[L] whether each layer attends over a sliding window (static)."""
    return tuple(t == "sliding" for t in (self.layer_types or ("full",) * self.num_layers))

  @property
  def has_sliding(self) -> bool:
    return any(self.sliding_layers)

  @property
  def local_rope(self) -> bool:
    """Sliding layers use RoPE angles of their own (``rope_local_theta``)."""
    return self.rope_local_theta is not None and self.has_sliding

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
    norms = (4 if self.post_norms else 2) * d + (2 * hd if self.qk_norm else 0)
    block = attn + 3 * d * self.mlp_dim + norms
    head = 0 if self.tie_embeddings else d * self.vocab_size
    return self.vocab_size * d + self.num_layers * block + d + head
