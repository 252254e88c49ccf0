"""The decode copy of a model: the layout a KV-cache decoder runs fastest in on CPU, with the same values.

``decode_config`` turns a (scanned, possibly tied) ``ModelConfig`` into an unscanned one (``scan_layers=False``:
a parameter tree and a KV-cache buffer per layer) with slots-last keys in its cache
(``cache_keys_slots_last``), untied when it was tied (the table transposed once into an ``lm_head``).
``decode_params`` converts trained weights to it. XLA:CPU copies a layer's weights and cache out of stacked
[L, ...] buffers before its matmuls, every decode step and layer, and ran the [N, D] x [V, D]^T output
projection of a tied table at 6.4 ms for small-50m at N = 32 against 4.7 ms with the table laid out [D, V].
Which platforms use it is the caller's decision (``rlj.sampler.SamplerConfig.unrolled_decode``).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from models.config import ModelConfig
from models.transformer import unstack_layers


def decode_config(config: ModelConfig) -> ModelConfig:
  """The unscanned, untied, slots-last-keys variant of ``config``."""
  return dataclasses.replace(config, tie_embeddings=False, scan_layers=False, cache_keys_slots_last=True)


def decode_params(params: dict, config: ModelConfig, decode: ModelConfig) -> dict:
  """``params`` of a ``config`` model laid out for its ``decode`` variant (same values)."""
  if config.tie_embeddings and not decode.tie_embeddings:
    params = {**params, "lm_head": jnp.transpose(params["embedder"]["embedding"])}
  if config.scan_layers and not decode.scan_layers:
    params = unstack_layers(params, config.num_layers)
  return params
