"""LoRA adapters (models/lora.py): exact at init, merge vs a float64 numpy W + s·A@B, gradients vs the chain
rule, sharded merge vs one device, config errors, and a PEFT export that peft loads onto transformers' model."""
import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import hf, lora, presets
from models.transformer import Transformer

pytestmark = pytest.mark.usefixtures("fast_compile")

CONFIG = presets.get("tiny")   # D 32, H 4, KVH 2, Dh 8, F 64, L 2
B, S = 2, 8


def _inputs(vocab):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, size=(B, S)).astype(np.int32)
  mask = np.ones((B, S), np.int32)
  positions = np.broadcast_to(np.arange(S, dtype=np.int32), (B, S))
  return tokens, mask, positions


@pytest.fixture(scope="module")
def base():
  """(boxed params, unboxed params) of the tiny model."""
  tokens, mask, positions = _inputs(CONFIG.vocab_size)
  boxed = Transformer(CONFIG).init(jax.random.key(0), tokens, positions, mask)["params"]
  return boxed, nn.unbox(boxed)


def _logits_fn(config):
  return jax.jit(lambda p, t, m, pos: Transformer(config).apply({"params": p}, t, pos, m)[0])


def _random_adapters(params, cfg, seed):
  """Adapters with random non-zero a and b (b as large as a), as numpy float32."""
  rng = np.random.default_rng(seed)
  out = lora.init_adapters(jax.random.key(seed), params, cfg)
  return {n: {k: rng.normal(0.0, 0.3, v.shape).astype(np.float32) for k, v in ab.items()} for n, ab in out.items()}


def _reference_merge(params, adapters, cfg):
  """W + (alpha / r) · A @ B per layer in float64, on [in, out] matrix views of the stacked kernels."""
  out = {}
  for name in cfg.targets:
    t = lora.TARGETS[name]
    w = np.asarray(lora.kernel(params, name), np.float64)
    a, b = np.asarray(adapters[name]["a"], np.float64), np.asarray(adapters[name]["b"], np.float64)
    fin, fout = lora.matrix_view(w.shape, t.num_in)
    s = cfg.alpha / cfg.rank
    merged = [w[l].reshape(fin, fout) + s * a[l].reshape(fin, cfg.rank) @ b[l].reshape(cfg.rank, fout)
              for l in range(w.shape[0])]
    out[name] = np.stack(merged).reshape(w.shape)
  return out


def test_init_is_exact(base):
  _, params = base
  cfg = lora.LoraConfig(rank=4, alpha=8.0)
  adapters = lora.init_adapters(jax.random.key(1), params, cfg)
  for name in cfg.targets:
    a, b = adapters[name]["a"], adapters[name]["b"]
    fin = lora.matrix_view(lora.kernel(params, name).shape, lora.TARGETS[name].num_in)[0]
    assert a.dtype == b.dtype == jnp.float32 and not np.any(np.asarray(b))
    assert 0 < np.abs(a).max() <= fin ** -0.5   # PEFT's kaiming-uniform bound 1/sqrt(fan_in)
  merged = jax.jit(lambda p, ad: lora.merge(p, ad, cfg))(params, adapters)
  jax.tree.map(np.testing.assert_array_equal, merged, params)
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)   # bfloat16 kernels stay bfloat16, unchanged
  jax.tree.map(lambda m, p: np.testing.assert_array_equal(m, p) if m.dtype == jnp.bfloat16 else pytest.fail(),
               lora.merge(bf16, adapters, cfg), bf16)
  fn = _logits_fn(CONFIG)
  np.testing.assert_array_equal(fn(merged, *_inputs(CONFIG.vocab_size)), fn(params, *_inputs(CONFIG.vocab_size)))


def test_merge_matches_numpy_reference(base):
  _, params = base
  cfg = lora.LoraConfig(rank=3, alpha=5.0, targets=("q", "o", "v", "down"))
  adapters = _random_adapters(params, cfg, seed=2)
  assert adapters["o"]["a"].shape == (2, 4, 8, 3) and adapters["q"]["b"].shape == (2, 3, 4, 8)
  merged = jax.jit(lambda p, ad: lora.merge(p, ad, cfg))(params, adapters)
  ref = _reference_merge(params, adapters, cfg)
  for name in cfg.targets:
    got = lora.kernel(merged, name)
    assert np.abs(ref[name] - np.asarray(lora.kernel(params, name))).max() > 0.1
    np.testing.assert_allclose(np.asarray(got, np.float64), ref[name], rtol=0, atol=1e-6)
  np.testing.assert_array_equal(merged["layers"]["attn"]["k"], params["layers"]["attn"]["k"])   # untargeted
  np.testing.assert_array_equal(merged["layers"]["mlp"]["up"], params["layers"]["mlp"]["up"])
  np.testing.assert_array_equal(merged["embedder"]["embedding"], params["embedder"]["embedding"])


def test_gradients_reach_adapters_only(base):
  _, params = base
  cfg = lora.LoraConfig(rank=2, alpha=4.0, targets=("k", "o", "gate"))
  adapters = jax.tree.map(jnp.asarray, _random_adapters(params, cfg, seed=3))
  tokens, mask, positions = _inputs(CONFIG.vocab_size)

  def loss(p):   # next-token cross entropy
    logits = Transformer(CONFIG).apply({"params": p}, tokens, positions, mask)[0]
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

  grads = jax.jit(jax.grad(lambda ad: loss(lora.lora_params(params, ad, cfg))))(adapters)
  base_grads = jax.jit(jax.grad(lambda p: loss(lora.lora_params(p, adapters, cfg))))(params)
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(base_grads))
  # Chain rule on W' = W + s·A@B: dL/dA = s · dL/dW' Bᵀ, dL/dB = s · Aᵀ dL/dW' (per layer, float64).
  merged = lora.merge(params, adapters, cfg)
  gw = jax.jit(jax.grad(loss))(merged)
  for name in cfg.targets:
    t = lora.TARGETS[name]
    g = np.asarray(lora.kernel(gw, name), np.float64)
    fin, fout = lora.matrix_view(g.shape, t.num_in)
    a = np.asarray(adapters[name]["a"], np.float64).reshape(-1, fin, cfg.rank)
    b = np.asarray(adapters[name]["b"], np.float64).reshape(-1, cfg.rank, fout)
    g = g.reshape(-1, fin, fout)
    want_a = cfg.alpha / cfg.rank * g @ b.transpose(0, 2, 1)
    want_b = cfg.alpha / cfg.rank * a.transpose(0, 2, 1) @ g
    got_a = np.asarray(grads[name]["a"]).reshape(want_a.shape)
    got_b = np.asarray(grads[name]["b"]).reshape(want_b.shape)
    assert np.abs(got_a).max() > 1e-4 and np.abs(got_b).max() > 1e-4
    np.testing.assert_allclose(got_a, want_a, rtol=1e-4, atol=1e-4 * np.abs(want_a).max())
    np.testing.assert_allclose(got_b, want_b, rtol=1e-4, atol=1e-4 * np.abs(want_b).max())


def test_sharded_merge_matches_one_device(base):
  from rlj.sharding import make_mesh, tree_shardings
  boxed, params = base
  cfg = lora.LoraConfig(rank=4, alpha=16.0)
  adapters = _random_adapters(params, cfg, seed=4)
  fn = jax.jit(lambda p, ad: lora.merge(p, ad, cfg))
  want = fn(params, adapters)
  mesh = make_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)))
  param_axes = nn.get_partition_spec(boxed)
  p_shard = tree_shardings(param_axes, params, mesh)
  axes = lora.adapter_axes(param_axes, cfg)
  assert axes["o"]["a"] == jax.P("layers", "heads", "head_dim", "lora_rank")
  assert axes["q"]["b"] == jax.P("layers", "lora_rank", "heads", "head_dim")
  a_shard = tree_shardings(axes, adapters, mesh)
  assert a_shard["q"]["a"].spec == jax.P(None, "fsdp", None) and a_shard["down"]["b"].spec == jax.P(None, None, "fsdp")
  sp, sa = jax.device_put(params, p_shard), jax.device_put(adapters, a_shard)
  hlo = fn.lower(sp, sa).compile().as_text()
  assert "all-gather" not in hlo and "all-reduce" not in hlo    # each device merges its own shard
  got = fn(sp, sa)
  for name in cfg.targets:
    assert lora.kernel(got, name).sharding.is_equivalent_to(lora.kernel(p_shard, name), 4)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6),
               got, want)


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=4, alpha=8.0, targets=("q", "qkv")), r"from q, k, v, o, gate, up, down \(unknown: qkv\)"),
    (dict(rank=4, alpha=8.0, targets=()), r"empty or repeated"),
    (dict(rank=0, alpha=8.0), r"rank 0: must be a positive integer"),
    (dict(rank=4, alpha=-1.0), r"alpha -1.0"),
    (dict(rank=4, alpha=8.0, dropout=0.1), r"dropout 0.1: only 0.0"),
    (dict(rank=17, alpha=8.0, targets=("q", "v")), r"rank 17 exceeds 16.*target 'v'.*rank <= 16"),
])
def test_bad_configs_one_line(base, kwargs, match):
  _, params = base
  with pytest.raises(ValueError, match=match) as err:
    lora.init_adapters(jax.random.key(0), params, lora.LoraConfig(**kwargs))
  assert "\n" not in str(err.value)


def test_peft_round_trip(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  hf_cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                                    tie_word_embeddings=False)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(hf_cfg)
  with torch.no_grad():   # weights large enough that every projection moves the logits
    for p in model.parameters():
      p.copy_(torch.randn(p.shape) * (p.shape[-1] ** -0.5 if p.ndim == 2 else 0.5))
  base_dir, adapter_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
  model.save_pretrained(base_dir)
  config, params = hf.load_hf_checkpoint(base_dir)
  cfg = lora.LoraConfig(rank=4, alpha=8.0)
  adapters = _random_adapters(params, cfg, seed=5)
  tokens, mask, positions = _inputs(config.vocab_size)
  fn = _logits_fn(config)
  ours = np.asarray(fn(lora.merge(params, adapters, cfg), tokens, mask, positions))
  assert np.abs(ours - np.asarray(fn(params, tokens, mask, positions))).max() > 0.5   # the adapters matter

  lora.write_peft_adapter(adapter_dir, adapters, cfg, config, base_path=base_dir)
  with open(f"{adapter_dir}/adapter_config.json") as fh:
    written = json.load(fh)
  assert written["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"])
  base_model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32,
                                                                 attn_implementation="eager")
  peft_model = peft.PeftModel.from_pretrained(base_model, adapter_dir).eval()
  with torch.no_grad():
    ref = peft_model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions, dtype=torch.long)).logits.float().numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_peft_names_follow_hf_layout(base):
  """lora_A is [r, in_features] and lora_B [out_features, r] with in/out flattened head-major, as models.hf
  flattens q_proj / o_proj."""
  _, params = base
  cfg = lora.LoraConfig(rank=2, alpha=2.0, targets=("q", "o"))
  adapters = _random_adapters(params, cfg, seed=6)
  sd = lora.peft_state_dict(adapters, cfg, CONFIG)
  assert len(sd) == 2 * 2 * CONFIG.num_layers
  a_o = sd["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"]
  b_q = sd["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
  assert a_o.shape == (2, 32) and b_q.shape == (32, 2)
  np.testing.assert_array_equal(a_o[:, 3 * 8 + 5], adapters["o"]["a"][1, 3, 5])     # input h·Dh + d
  np.testing.assert_array_equal(b_q[2 * 8 + 7], adapters["q"]["b"][0, :, 2, 7])    # output h·Dh + d
  with pytest.raises(ValueError, match=r"adapter 'q'.*model config"):
    lora.peft_state_dict(adapters, cfg, dataclasses.replace(CONFIG, num_heads=2, num_kv_heads=1))


def test_unmerged_forward_equals_merged(base):
  """x W0 + x A B (the "lora" collection, models.layers.with_lora) equals x (W0 + A B) to 1e-5 in float32, on every
  target including the two-axis o projection, with and without q/k/v biases; without adapters it is the base."""
  for config in (CONFIG, dataclasses.replace(CONFIG, qkv_bias=True)):
    tokens, mask, positions = _inputs(config.vocab_size)
    params = nn.unbox(Transformer(config).init(jax.random.key(0), tokens, positions, mask)["params"])
    cfg = lora.LoraConfig(rank=3, alpha=6.0)
    adapters = lora.init_adapters(jax.random.key(1), params, cfg)
    adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), adapters)
    apply = jax.jit(lambda v: Transformer(config).apply(v, tokens, positions, mask)[0])
    merged = apply({"params": lora.merge(params, adapters, cfg)})
    unmerged = apply(lora.unmerged_variables(params, adapters, cfg))
    plain = apply({"params": params})
    assert np.abs(np.asarray(merged) - np.asarray(plain)).max() > 0.1     # the adapters change the logits
    np.testing.assert_allclose(np.asarray(unmerged), np.asarray(merged), atol=1e-5, rtol=1e-5)
