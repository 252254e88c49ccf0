"""Parity with Hugging Face transformers: our loader + forward pass vs LlamaForCausalLM, Qwen2ForCausalLM
and GemmaForCausalLM on tiny random models, and our saved checkpoints loaded back by transformers."""
import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import hf, presets

import hf_parity  # noqa: E402  (tests/models)

pytestmark = pytest.mark.usefixtures("fast_compile")   # tiny models: compile time dominates

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

B, S, V = 2, 8, 64
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=512)


def _hf_model(family):
  if family == "llama":  # untied, Llama-3.1 RoPE scaling with all three frequency bands populated
    cfg = transformers.LlamaConfig(
        **COMMON, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=500_000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=256))
  elif family == "qwen2":  # tied, q/k/v bias
    cfg = transformers.Qwen2Config(**COMMON, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                   rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0))
  else:  # gemma: tied, (1 + w) norm, sqrt(D) embedding scale, GeGLU, MQA, head_dim != D / H
    cfg = transformers.GemmaConfig(**COMMON, num_key_value_heads=1, head_dim=16, hidden_act="gelu_pytorch_tanh")
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
  with torch.no_grad():  # weights large enough that every component moves the logits
    for p in model.parameters():
      p.copy_(torch.randn(p.shape) * (p.shape[-1] ** -0.5 if p.ndim == 2 else 0.5))
  return model.eval()


def _inputs():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, V, size=(B, S)).astype(np.int32)
  mask = np.ones((B, S), np.int32)
  mask[1, :3] = 0  # row 1 is left-padded
  tokens[1, :3] = 0
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return tokens, mask, positions






@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma"])
def family(request, tmp_path_factory):
  """(name, hf model, hf checkpoint dir, our config, our params, our logits on _inputs())."""
  return hf_parity.family_record(request.param, _hf_model(request.param),
                                 str(tmp_path_factory.mktemp(request.param)), _inputs())


def test_config_translation(family):
  name, model, _, config, _, _ = family
  assert config.num_params() == sum(p.numel() for p in model.parameters())
  assert config.tie_embeddings == (name != "llama")
  assert config.qkv_bias == (name == "qwen2")
  assert config.norm_plus_one == config.scale_embeddings == (name == "gemma")
  assert (config.rope_scaling is not None) == (name == "llama")


def test_logits_match_transformers(family):
  _, model, _, _, _, ours = family
  tokens, mask, positions = _inputs()
  ref = hf_parity.hf_logits(model, tokens, mask, positions)
  assert np.abs(ref).max() > 1.0  # not a degenerate near-zero model
  np.testing.assert_allclose(ours[0], ref[0], atol=1e-4, rtol=1e-4)              # no padding
  np.testing.assert_allclose(ours[1, 3:], ref[1, 3:], atol=1e-4, rtol=1e-4)      # left padding, real tokens
  # Padding must not leak: the padded row's real tokens equal the same tokens run unpadded.
  alone = hf_parity.hf_logits(model, tokens[1:, 3:], mask[1:, 3:], positions[1:, 3:])
  np.testing.assert_allclose(ours[1, 3:], alone[0], atol=1e-4, rtol=1e-4)


def test_saved_checkpoint_loads_in_transformers(family, tmp_path):
  name, _, _, config, params, ours = family
  files = hf.save_hf_checkpoint(params, config, str(tmp_path), max_shard_bytes=24_000)
  assert len(files) > 1 and os.path.exists(tmp_path / "model.safetensors.index.json")
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager",
                                                            dtype=torch.float32)
  assert type(model).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                  "gemma": "GemmaForCausalLM"}[name]
  tokens, mask, positions = _inputs()
  ref = hf_parity.hf_logits(model.eval(), tokens, mask, positions)
  np.testing.assert_allclose(ours[0], ref[0], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(ours[1, 3:], ref[1, 3:], atol=1e-4, rtol=1e-4)
  # And our loader reads the sharded checkpoint back bit for bit.
  config2, params2 = hf.load_hf_checkpoint(str(tmp_path))
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_load_onto_mesh_and_bfloat16(family):
  from rlj.sharding import make_mesh, tree_shardings
  _, _, path, _, params, _ = family
  mesh = make_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)))
  config, sharded = hf.load_hf_checkpoint(path, dtype="bfloat16",
                                          shardings=lambda names, shapes: tree_shardings(names, shapes, mesh))
  assert config.param_dtype == config.dtype == "bfloat16"
  gate = sharded["layers"]["mlp"]["gate"]  # [L, D, F] logical (layers, embed, mlp) -> (None, fsdp, tensor)
  assert gate.dtype == jnp.bfloat16 and gate.sharding.spec == jax.P(None, "fsdp", "tensor")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(jnp.bfloat16)),
               sharded, params)




def test_clear_errors(tmp_path):
  config = dataclasses.replace(presets.get("tiny"), rope_theta=500_000.0)
  zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), nn.unbox(hf.abstract_params(config)))
  path = str(tmp_path / "good")
  assert hf.save_hf_checkpoint(zeros, config, path) == ["model.safetensors"]
  assert hf.load_hf_checkpoint(path)[0] == config
  bad = hf_parity.rewrite_checkpoint(path, str(tmp_path / "missing"), lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
    hf.load_hf_checkpoint(bad)
  bad = hf_parity.rewrite_checkpoint(path, str(tmp_path / "extra"), lambda t: t.update({"model.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(ValueError, match=r"model\.extra\.weight.*model\.safetensors"):
    hf.load_hf_checkpoint(bad)
  key = "model.layers.0.self_attn.k_proj.weight"
  bad = hf_parity.rewrite_checkpoint(path, str(tmp_path / "shape"), lambda t: t.update({key: t[key][:8]}))
  with pytest.raises(ValueError, match=r"model\.safetensors: tensor model\.layers\.0\.self_attn\.k_proj"):
    hf.load_hf_checkpoint(bad)
  with pytest.raises(ValueError, match="model_type"):
    hf.config_from_hf({"model_type": "gpt2"})
