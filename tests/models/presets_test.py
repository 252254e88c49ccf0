"""Preset parameter counts equal the published models' (abstract init via jax.eval_shape, no allocation)."""
import math

import flax.linen as nn
import jax
import pytest

from models import hf, presets

PUBLISHED = {   # the safetensors parameter counts of the Hugging Face checkpoints in models/presets.py
    "gemma-2b": 2_506_172_416,
    "gemma-2-2b": 2_614_341_888,
    "gemma-3-1b": 999_885_952,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-0.6b": 596_049_920,
    "qwen3-8b": 8_190_735_360,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_param_counts(name):
  config = presets.get(name)
  abstract = nn.unbox(hf.abstract_params(config))
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))
  assert count == PUBLISHED[name] == config.num_params()


def test_small_and_tiny():
  assert 45e6 < presets.get("small-50m").num_params() < 55e6
  assert presets.get("small-32m").num_params() == 31_597_056   # 8 x (786,432 attention + 2,113,536 MLP + 1,024
  # norms) + 2 x 4,194,304 untied embedding and head + 512 final norm
  assert presets.get("small-3m").num_params() == 3_164_416     # 4 x (196,608 attention + 528,384 MLP + 512 norms)
  # + 2 x 131,072 untied embedding and head + 256 final norm
  tiny = presets.get("tiny")
  assert (tiny.num_layers, tiny.embed_dim, tiny.num_heads, tiny.num_kv_heads, tiny.head_dim, tiny.mlp_dim,
          tiny.vocab_size) == (2, 32, 4, 2, 8, 64, 128)
  with pytest.raises(ValueError, match="unknown model preset"):
    presets.get("gpt-5")


def test_every_param_has_logical_names():
  allowed = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers"}
  # q/k/v biases and tied embeddings; q/k norms, post-norms and per-layer patterns.
  for name in ("qwen2.5-0.5b", "gemma-3-1b"):
    abstract = hf.abstract_params(presets.get(name))
    boxes = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert boxes and all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)
    for b in boxes:
      assert len(b.names) == len(b.value.shape) and set(b.names) <= allowed, b.names


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_round_trip_through_config_json(name):
  config = presets.get(name)
  assert hf.config_from_hf(hf.config_to_hf(config)) == config
