"""Preset parameter counts equal the published models' (abstract init via jax.eval_shape, no allocation)."""
import math

import flax.linen as nn
import jax
import pytest

from models import hf, presets

PUBLISHED = {
    "gemma-2b": 2_506_172_416,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.2-1b": 1_235_814_400,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_param_counts(name):
  config = presets.get(name)
  abstract = nn.unbox(hf.abstract_params(config))
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))
  assert count == PUBLISHED[name] == config.num_params()


def test_small_and_tiny():
  assert 45e6 < presets.get("small-50m").num_params() < 55e6
  tiny = presets.get("tiny")
  assert (tiny.num_layers, tiny.embed_dim, tiny.num_heads, tiny.num_kv_heads, tiny.head_dim, tiny.mlp_dim,
          tiny.vocab_size) == (2, 32, 4, 2, 8, 64, 128)
  with pytest.raises(ValueError, match="unknown model preset"):
    presets.get("gpt-5")


def test_every_param_has_logical_names():
  allowed = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers"}
  abstract = hf.abstract_params(presets.get("qwen2.5-0.5b"))  # has q/k/v biases and tied embeddings
  boxes = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert boxes and all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)
  for b in boxes:
    assert len(b.names) == len(b.value.shape) and set(b.names) <= allowed, b.names
