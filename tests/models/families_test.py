"""Every supported family against Hugging Face transformers on tiny random float32 checkpoints.

Llama (3.2-style: tied, Llama-3.1 RoPE scaling), Qwen2, Qwen3 (q/k norm), Gemma, Gemma 2 (soft-caps, post-norms,
query_pre_attn_scalar, alternating sliding / global layers), Gemma 3 text (q/k norm, 2 sliding : 1 global
with their own RoPE bases) and Mistral (every layer sliding): transformers writes the checkpoint, ``models.hf``
loads it, and our logits (padded and unpadded rows, at positions past the sliding window), our greedy decoding
through ``rlj.sampler.Sampler`` and our exported checkpoint must all agree with transformers. Sliding windows are
4 slots wide and rows 10 tokens long, so every sliding layer drops keys.
"""
import dataclasses
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from models import hf, hf_config
from models.transformer import Transformer
from rlj import logprobs, sampler, sharding

import hf_parity  # noqa: E402  (tests/models)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("fast_compile")

B, S, V, WINDOW, PAD = 2, 10, 64, 4, 3
T_NEW = 6
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
FAMILIES = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "mistral")
SLIDING = ("gemma2", "gemma3_text", "mistral")


def _hf_config(family):
  t = transformers
  if family == "llama":    # Llama 3.2: tied embeddings, Llama-3.1 RoPE scaling
    return t.LlamaConfig(**COMMON, rms_norm_eps=1e-5, tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=500_000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))
  if family == "qwen2":
    return t.Qwen2Config(**COMMON, tie_word_embeddings=False, rope_parameters=dict(rope_type="default",
                                                                                   rope_theta=1000.0))
  if family == "qwen3":
    return t.Qwen3Config(**COMMON, tie_word_embeddings=True, rope_parameters=dict(rope_type="default",
                                                                                   rope_theta=1000.0))
  if family == "gemma":
    return t.GemmaConfig(**COMMON, hidden_act="gelu_pytorch_tanh")
  if family == "gemma2":   # small caps so that tanh bends; a query scale that is not head_dim
    return t.Gemma2Config(**COMMON, sliding_window=WINDOW, query_pre_attn_scalar=20, attn_logit_softcapping=3.0,
                          final_logit_softcapping=4.0)
  if family == "gemma3_text":   # layers: sliding, sliding, full; RoPE bases 100 (local) and 10k (global)
    return t.Gemma3TextConfig(**COMMON, sliding_window=WINDOW, query_pre_attn_scalar=12,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                              rope_parameters={"full_attention": dict(rope_type="default", rope_theta=10_000.0),
                                               "sliding_attention": dict(rope_type="default", rope_theta=100.0)})
  return t.MistralConfig(**COMMON, sliding_window=WINDOW, rope_parameters=dict(rope_type="default",
                                                                              rope_theta=1000.0))


def _hf_model(family):
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(_hf_config(family), attn_implementation="eager",
                                                        dtype=torch.float32)
  with torch.no_grad():  # weights large enough that every component moves the logits
    for p in model.parameters():
      p.copy_(torch.randn(p.shape) * (p.shape[-1] ** -0.5 if p.ndim == 2 else 0.5))
  model.generation_config.eos_token_id = None   # decode all T_NEW tokens
  model.generation_config.pad_token_id = 0
  return model.eval()


def _inputs():
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, V, size=(B, S)).astype(np.int32)
  mask = np.ones((B, S), np.int32)
  mask[1, :PAD] = 0  # row 1 is left-padded
  tokens[1, :PAD] = 0
  return tokens, mask, logprobs.positions_from_mask(mask)






def _check_rows(ours, ref):
  np.testing.assert_allclose(ours[0], ref[0], atol=1e-4, rtol=1e-4)                # no padding
  np.testing.assert_allclose(ours[1, PAD:], ref[1, PAD:], atol=1e-4, rtol=1e-4)    # left padding, real tokens


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
  """(name, hf model, hf checkpoint dir, our config, our params, our logits on _inputs())."""
  return hf_parity.family_record(request.param, _hf_model(request.param),
                                 str(tmp_path_factory.mktemp(request.param)), _inputs())


def test_config_translation(family):
  name, model, path, config, _, _ = family
  assert config.num_params() == sum(p.numel() for p in model.parameters())
  assert hf_config.family_of(config) == name
  assert config.has_sliding == (name in SLIDING)
  if name in SLIDING:
    assert config.sliding_window == WINDOW
    pattern = {"gemma2": "sfs", "gemma3_text": "ssf", "mistral": "sss"}[name]   # s: sliding, f: full
    assert config.sliding_layers == tuple(p == "s" for p in pattern)
  assert (config.rope_local_theta is not None) == (name == "gemma3_text")
  assert config.qk_norm == (name in ("qwen3", "gemma3_text"))
  assert config.post_norms == (name in ("gemma2", "gemma3_text"))
  with open(os.path.join(path, "config.json")) as fh:
    assert hf.config_from_hf(hf.config_to_hf(config)) == hf.config_from_hf(json.load(fh))


def test_logits_match_transformers(family):
  _, model, _, _, _, ours = family
  tokens, mask, positions = _inputs()
  ref = hf_parity.hf_logits(model, tokens, mask, positions)
  assert np.abs(ref).max() > 1.0  # not a degenerate near-zero model
  _check_rows(ours, ref)
  # Padding must not leak: the padded row's real tokens equal the same tokens run unpadded.
  alone = hf_parity.hf_logits(model, tokens[1:, PAD:], mask[1:, PAD:], positions[1:, PAD:])
  np.testing.assert_allclose(ours[1, PAD:], alone[0], atol=1e-4, rtol=1e-4)


# By default only Gemma 2 (soft-caps, alternating windows) and Gemma 3 (q/k norm, mixed windows and RoPE bases,
# scanned and unscanned) decode here: the other families' decode paths hold nothing those two lack
# (tests/rlj/sampler_test.py decodes the plain layers), so they run with ``-m slow``.
@pytest.mark.parametrize("family", [f if f in ("gemma2", "gemma3_text") else pytest.param(f, marks=pytest.mark.slow)
                                    for f in FAMILIES], indirect=True)
def test_greedy_sampler_equals_transformers_generate(family):
  name, model, _, config, params, _ = family
  tokens, mask, _ = _inputs()
  prompts, prompt_mask = tokens[:, :7], mask[:, :7]   # 7 and 4 real tokens, window 4: decoding slides
  with torch.no_grad():
    ref = model.generate(input_ids=torch.tensor(prompts, dtype=torch.long), attention_mask=torch.tensor(prompt_mask),
                         max_new_tokens=T_NEW, do_sample=False)[:, prompts.shape[1]:].numpy()
  assert ref.shape == (B, T_NEW)
  # The CPU default decodes with the unscanned copy; the scanned stack decodes Gemma 3's mixed pattern too.
  unrolled = (None, False) if name == "gemma3_text" else (None,)
  for unroll in unrolled:
    s = sampler.Sampler(Transformer(config), sampler.SamplerConfig(
        max_new_tokens=T_NEW, greedy=True, prompt_buckets=(9,), unrolled_decode=unroll))
    r = s.sample(params, prompts, prompt_mask, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(r.completion), ref, err_msg=f"unrolled_decode={unroll}")


def test_saved_checkpoint_loads_in_transformers(family, tmp_path):
  name, _, _, config, params, ours = family
  hf.save_hf_checkpoint(params, config, str(tmp_path))
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager",
                                                            dtype=torch.float32)
  assert type(model).__name__ == hf_config.ARCHITECTURES[name]
  _check_rows(ours, hf_parity.hf_logits(model.eval(), *_inputs()))
  config2, params2 = hf.load_hf_checkpoint(str(tmp_path))
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
  """A Gemma 3 checkpoint dir (mixed sliding / global layers with their own RoPE bases)."""
  path = str(tmp_path_factory.mktemp("gemma3_mesh"))
  _hf_model("gemma3_text").save_pretrained(path)
  return path


def _four_rows():
  """_inputs() and its rows reversed: 4 rows, so (data=2, fsdp=2) splits them."""
  return tuple(np.concatenate([x, x[::-1]]) for x in _inputs())


def test_sliding_window_family_on_8_device_mesh_equals_one_device(gemma3):
  """Teacher-forced logits on a (data=2, fsdp=2, tensor=2) mesh, activation constraints on (gradients under the
  mesh: tests/models/sharded_test.py)."""
  config, params1 = hf.load_hf_checkpoint(gemma3)
  mesh = sharding.make_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)))
  _, params8 = hf.load_hf_checkpoint(
      gemma3, shardings=lambda names, shapes: sharding.tree_shardings(names, shapes, mesh))
  assert params8["layers"]["attn"]["q"].sharding.spec == jax.P(None, "fsdp", "tensor", None)
  assert params8["layers"]["attn"]["q_norm"]["scale"].sharding.spec == jax.P(None, None)
  tokens, mask, positions = _four_rows()
  forward = lambda p, t, m, pos: Transformer(config).apply({"params": p}, t, pos, m)[0]  # noqa: E731
  logits1 = jax.jit(forward)(params1, tokens, mask, positions)
  batch = [jax.device_put(x, sharding.batch_sharding(mesh, 2)) for x in (tokens, mask, positions)]
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    logits8 = jax.jit(forward)(params8, *batch)
  assert logits8.sharding.spec == jax.P(("data", "fsdp"), None, "tensor")
  np.testing.assert_allclose(np.asarray(logits8), np.asarray(logits1), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(logits1)[:2], hf_parity.our_logits(config, params1, *_inputs()), atol=1e-5)


def test_greedy_sampler_on_8_device_mesh_equals_transformers(gemma3):
  """The KV-cache decode with rows split over data x fsdp and KV heads over tensor."""
  mesh = sharding.make_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)))
  config, params = hf.load_hf_checkpoint(
      gemma3, shardings=lambda names, shapes: sharding.tree_shardings(names, shapes, mesh))
  tokens, mask, _ = _four_rows()
  prompts, prompt_mask = tokens[:, :7], mask[:, :7]
  model = transformers.AutoModelForCausalLM.from_pretrained(gemma3, attn_implementation="eager",
                                                            dtype=torch.float32).eval()
  with torch.no_grad():
    ref = model.generate(input_ids=torch.tensor(prompts, dtype=torch.long), attention_mask=torch.tensor(prompt_mask),
                         max_new_tokens=T_NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
  cfg = sampler.SamplerConfig(max_new_tokens=T_NEW, greedy=True, prompt_buckets=(9,))
  r = sampler.Sampler(Transformer(config), cfg, mesh=mesh).sample(params, prompts, prompt_mask, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(r.completion), ref[:, prompts.shape[1]:].numpy())


# ---------------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------------

def _gemma3_json():
  return json.loads(_hf_config("gemma3_text").to_json_string())


@pytest.mark.parametrize("edit, key", [
    (lambda d: d.update(model_type="gpt2"), "model_type"),
    (lambda d: d.update(model_type="gemma3"), "model_type"),                  # the multimodal wrapper
    (lambda d: d.update(architectures=["Gemma3ForConditionalGeneration"]), "architectures"),
    (lambda d: d["rope_parameters"]["full_attention"].update(rope_type="linear", factor=8.0),
     r"rope_parameters\.full_attention\.rope_type"),
    (lambda d: d.update(layer_types=["sliding_attention", "chunked_attention", "full_attention"]), "layer_types"),
    (lambda d: d.update(layer_types=["full_attention"]), "layer_types"),
    (lambda d: d.update(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (lambda d: d.update(attention_bias=True), "attention_bias"),
    (lambda d: d.update(sliding_window=0), "sliding_window"),
    (lambda d: d.update(hidden_activation="relu"), "hidden_act"),
])
def test_unsupported_config_json_names_the_key(edit, key):
  d = _gemma3_json()
  edit(d)
  with pytest.raises(ValueError, match=f"config.json: {key}"):
    hf.config_from_hf(d)


def test_unsupported_features_of_other_families():
  qwen3 = json.loads(_hf_config("qwen3").to_json_string())
  with pytest.raises(ValueError, match=r"config.json: rope_parameters\.rope_type='yarn'"):
    hf.config_from_hf(dict(qwen3, rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0)))
  with pytest.raises(ValueError, match=r"config.json: rope_scaling\.rope_type='dynamic'"):
    hf.config_from_hf(dict(qwen3, rope_parameters=None, rope_scaling=dict(type="dynamic", factor=2.0)))
  with pytest.raises(ValueError, match="config.json: use_sliding_window"):
    hf.config_from_hf(dict(qwen3, use_sliding_window=True))
  llama = json.loads(_hf_config("llama").to_json_string())
  with pytest.raises(ValueError, match="config.json: layer_types"):
    hf.config_from_hf(dict(llama, layer_types=["sliding_attention"] * 3, sliding_window=4))
  with pytest.raises(ValueError, match="config.json: mlp_bias"):
    hf.config_from_hf(dict(llama, mlp_bias=True))
  # And on the way out: a config no family matches.
  config = hf.config_from_hf(llama)
  with pytest.raises(ValueError, match="matches none"):
    hf.config_to_hf(dataclasses.replace(config, final_logit_softcap=30.0))




def test_missing_and_extra_tensors_are_named(gemma3, tmp_path):
  name = "model.layers.1.self_attn.k_norm.weight"
  bad = hf_parity.rewrite_checkpoint(gemma3, str(tmp_path / "missing"), lambda t: t.pop(name))
  with pytest.raises(ValueError, match=name.replace(".", r"\.")):
    hf.load_hf_checkpoint(bad)
  name = "model.layers.2.post_feedforward_layernorm.weight"
  bad = hf_parity.rewrite_checkpoint(gemma3, str(tmp_path / "extra"), lambda t: t.update({name.replace("2", "7"): t[name]}))
  with pytest.raises(ValueError, match=r"model\.layers\.7\.post_feedforward_layernorm\.weight"):
    hf.load_hf_checkpoint(bad)
