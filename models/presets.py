"""Named model configurations.

The published sizes follow the Hugging Face config.json of each model; their parameter counts (checked in
tests/models/presets_test.py with ``jax.eval_shape``) are:

| name           | params        | Hugging Face id (config.json)      |
|----------------|---------------|------------------------------------|
| gemma-2b       | 2,506,172,416 | google/gemma-2b                    |
| gemma-2-2b     | 2,614,341,888 | google/gemma-2-2b                  |
| gemma-3-1b     |   999,885,952 | google/gemma-3-1b-pt (text only)   |
| llama-3.1-8b   | 8,030,261,248 | meta-llama/Llama-3.1-8B            |
| llama-3.2-1b   | 1,235,814,400 | meta-llama/Llama-3.2-1B            |
| llama-3.2-3b   | 3,212,749,824 | meta-llama/Llama-3.2-3B            |
| qwen2.5-0.5b   |   494,032,768 | Qwen/Qwen2.5-0.5B                  |
| qwen2.5-7b     | 7,615,616,512 | Qwen/Qwen2.5-7B                    |
| qwen3-0.6b     |   596,049,920 | Qwen/Qwen3-0.6B                    |
| qwen3-8b       | 8,190,735,360 | Qwen/Qwen3-8B                      |
| small-3m       |     3,164,416 | (RL-step benchmark, small shape)   |
| small-32m      |    31,597,056 | (RL-step benchmark)                |
| small-50m      |    50,998,784 |                                    |
| tiny           |        26,784 | (CPU tests)                        |
"""
from __future__ import annotations

from models.config import ModelConfig, sliding_pattern

_PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        vocab_size=128, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64),
    "small-3m": ModelConfig(    # the small RL-step benchmark shape (issue: whole-step FLOP utilisation)
        vocab_size=512, num_layers=4, embed_dim=256, num_heads=4, num_kv_heads=2, head_dim=64, mlp_dim=688,
        rope_theta=10_000.0),
    "small-32m": ModelConfig(   # the RL-step benchmark shape (launch.bench --case rl_step --model small-32m)
        vocab_size=8192, num_layers=8, embed_dim=512, num_heads=8, num_kv_heads=4, head_dim=64, mlp_dim=1376,
        rope_theta=10_000.0),
    "small-50m": ModelConfig(
        vocab_size=32_000, num_layers=11, embed_dim=512, num_heads=8, num_kv_heads=4, head_dim=64, mlp_dim=1536,
        rope_theta=10_000.0, tie_embeddings=True),
    "gemma-2b": ModelConfig(
        vocab_size=256_000, num_layers=18, embed_dim=2048, num_heads=8, num_kv_heads=1, head_dim=256,
        mlp_dim=16_384, activation="gelu_tanh", norm_eps=1e-6, norm_plus_one=True, rope_theta=10_000.0,
        tie_embeddings=True, scale_embeddings=True),
    "llama-3.1-8b": ModelConfig(
        vocab_size=128_256, num_layers=32, embed_dim=4096, num_heads=32, num_kv_heads=8, head_dim=128,
        mlp_dim=14_336, norm_eps=1e-5, rope_theta=500_000.0, rope_scaling=(8.0, 1.0, 4.0, 8192)),
    "llama-3.2-1b": ModelConfig(   # the ~1B model of the GPU benchmark targets
        vocab_size=128_256, num_layers=16, embed_dim=2048, num_heads=32, num_kv_heads=8, head_dim=64,
        mlp_dim=8192, norm_eps=1e-5, rope_theta=500_000.0, rope_scaling=(32.0, 1.0, 4.0, 8192),
        tie_embeddings=True),
    "qwen2.5-0.5b": ModelConfig(
        vocab_size=151_936, num_layers=24, embed_dim=896, num_heads=14, num_kv_heads=2, head_dim=64,
        mlp_dim=4864, norm_eps=1e-6, rope_theta=1_000_000.0, qkv_bias=True, tie_embeddings=True),
    "qwen2.5-7b": ModelConfig(
        vocab_size=152_064, num_layers=28, embed_dim=3584, num_heads=28, num_kv_heads=4, head_dim=128,
        mlp_dim=18_944, norm_eps=1e-6, rope_theta=1_000_000.0, qkv_bias=True),
    "llama-3.2-3b": ModelConfig(
        vocab_size=128_256, num_layers=28, embed_dim=3072, num_heads=24, num_kv_heads=8, head_dim=128,
        mlp_dim=8192, norm_eps=1e-5, rope_theta=500_000.0, rope_scaling=(32.0, 1.0, 4.0, 8192),
        tie_embeddings=True),
    "qwen3-0.6b": ModelConfig(
        vocab_size=151_936, num_layers=28, embed_dim=1024, num_heads=16, num_kv_heads=8, head_dim=128,
        mlp_dim=3072, norm_eps=1e-6, rope_theta=1_000_000.0, qk_norm=True, tie_embeddings=True),
    "qwen3-8b": ModelConfig(
        vocab_size=151_936, num_layers=36, embed_dim=4096, num_heads=32, num_kv_heads=8, head_dim=128,
        mlp_dim=12_288, norm_eps=1e-6, rope_theta=1_000_000.0, qk_norm=True),
    "gemma-2-2b": ModelConfig(   # layers alternate sliding (4096) and global, starting with a sliding one
        vocab_size=256_000, num_layers=26, embed_dim=2304, num_heads=8, num_kv_heads=4, head_dim=256,
        mlp_dim=9216, activation="gelu_tanh", norm_eps=1e-6, norm_plus_one=True, rope_theta=10_000.0,
        post_norms=True, query_pre_attn_scalar=256.0, attn_logit_softcap=50.0, final_logit_softcap=30.0,
        sliding_window=4096, layer_types=sliding_pattern(26, 2), tie_embeddings=True, scale_embeddings=True),
    "gemma-3-1b": ModelConfig(   # 5 sliding (512, RoPE base 10k) : 1 global (RoPE base 1M)
        vocab_size=262_144, num_layers=26, embed_dim=1152, num_heads=4, num_kv_heads=1, head_dim=256,
        mlp_dim=6912, activation="gelu_tanh", norm_eps=1e-6, norm_plus_one=True, rope_theta=1_000_000.0,
        rope_local_theta=10_000.0, qk_norm=True, post_norms=True, query_pre_attn_scalar=256.0,
        sliding_window=512, layer_types=sliding_pattern(26, 6), tie_embeddings=True, scale_embeddings=True),
}


def names() -> list[str]:
  return sorted(_PRESETS)


def get(name: str) -> ModelConfig:
  """The preset called ``name`` (derive variants with ``dataclasses.replace``)."""
  if name not in _PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {names()}")
  return _PRESETS[name]
