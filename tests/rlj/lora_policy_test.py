"""LoRA in the engine (rlj/lora_policy.py): the optimizer step trains the adapters only, over a frozen base that is
not donated; 8 devices agree with 1; merged weights (also cast for the sampler) equal models.lora.merge; the
base's fingerprint is mesh-independent and names both bases when they differ."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import lora, presets
from models.transformer import Transformer
from rlj import lora_policy, programs, rl_algos, sharding, train_state

pytestmark = pytest.mark.usefixtures("fast_compile")

CONFIG = dataclasses.replace(presets.get("tiny"), num_layers=2)
RULES = sharding.DEFAULT_RULES
N, P, T = 8, 4, 4


def _base():
  tok = jnp.zeros((1, 4), jnp.int32)
  return nn.unbox(Transformer(CONFIG).init(jax.random.key(0), tok, tok, tok + 1)["params"])


def _batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, CONFIG.vocab_size, size=(N, P + T)).astype(np.int32)
  return {"tokens": tokens, "attn_mask": np.ones((N, P + T), np.int32), "mask": np.ones((N, T), np.float32),
          "adv": rng.normal(size=(N,)).astype(np.float32), "old_logp": np.full((N, T), -4.0, np.float32),
          "num_tokens": np.float32(N * T), "num_seqs": np.float32(N)}


def _policy(mesh):
  base = _base()
  shardings = sharding.tree_shardings(lora_policy.param_axes(CONFIG), base, mesh, RULES)
  base = jax.device_put(base, shardings)
  cfg = lora.LoraConfig(rank=2, alpha=4.0, targets=("q", "v", "o", "down"))
  return lora_policy.build(cfg, CONFIG, base, mesh=mesh, rules=RULES, rng=jax.random.key(3), source="test")


def _one_update(mesh):
  """The adapters after one GRPO step from b != 0 adapters, the base after it, and the metrics."""
  policy, adapters = _policy(mesh)
  adapters = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x) + 0.01, s), adapters, policy.adapter_shardings)
  tx = train_state.make_optimizer(train_state.OptimConfig(learning_rate=1e-2))
  state = jax.jit(lambda a: train_state.TrainState.create(a, tx))(adapters)
  state_sh = train_state.state_shardings(policy.adapter_shardings, tx, adapters, mesh)
  state = jax.device_put(state, state_sh)
  step = programs.train_step(Transformer(CONFIG), tx, mesh=mesh, rules=RULES, state_shardings=state_sh,
                             completion_len=T, objective=functools.partial(rl_algos.get("grpo").objective,
                                                                           clip_eps=0.2, kl_coef=0.0),
                             combine=policy.step_params)
  base_before = jax.device_get(policy.base)
  batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim, RULES) if v.ndim else
                             jax.sharding.NamedSharding(mesh, jax.P())) for k, v in _batch().items()}
  with jax.set_mesh(mesh):
    new, metrics = step(state, batch, jax.random.key(0), policy.base)
  return policy, base_before, jax.device_get(new), jax.device_get(metrics)


def test_update_trains_adapters_only_and_8_devices_match_1():
  mesh8 = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  mesh1 = sharding.make_mesh([("data", 1), ("fsdp", 1), ("tensor", 1)], devices=jax.devices()[:1])
  policy, base_before, new8, m8 = _one_update(mesh8)
  _, _, new1, m1 = _one_update(mesh1)
  # the state is the adapters and their moments; the base was read, not donated, and is unchanged
  assert set(new8.params) == {"q", "v", "o", "down"}
  assert jax.tree.structure(new8.opt_state[1][0].mu) == jax.tree.structure(new8.params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(policy.base), base_before)
  assert m8["skipped"] == 0 and np.isfinite(m8["loss"])
  assert np.abs(new8.params["q"]["b"] - 0.01).max() > 1e-4      # b started at 0 + 0.01 and trained
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5, atol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6), new8.params, new1.params)


def test_merged_weights_and_the_sampler_cast():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  policy, adapters = _policy(mesh)
  merged = policy.merged(adapters)     # b = 0: exactly the base
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(merged), jax.device_get(policy.base))
  adapters = jax.tree.map(lambda x: x + 0.02, adapters)
  want = jax.device_get(lora.merge(jax.device_get(policy.base), jax.device_get(adapters), policy.config))
  got = policy.merged(adapters, jnp.bfloat16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(got))
  assert jax.tree.map(lambda x: x.sharding, got) == policy.base_shardings
  jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=1e-2, atol=1e-2),
               jax.device_get(got), want)


def test_fingerprint_is_mesh_independent_and_sees_values():
  base = _base()
  mesh = sharding.make_mesh([("data", 1), ("fsdp", 4), ("tensor", 2)])
  placed = jax.device_put(base, sharding.tree_shardings(lora_policy.param_axes(CONFIG), base, mesh, RULES))
  one, eight = lora_policy.fingerprint(base, "a"), lora_policy.fingerprint(placed, "b")
  assert one["hash"] == eight["hash"] and one["tensors"] == eight["tensors"]
  assert one["num_params"] == CONFIG.num_params()
  lora_policy.check_same_base(one, eight, "ckpt")          # another path, the same tensors: accepted
  edited = jax.tree.map(lambda x: x, base)
  edited["final_norm"]["scale"] = edited["final_norm"]["scale"].at[0].add(0.5)
  other = lora_policy.fingerprint(edited, "/models/other")
  assert other["tensors"] == one["tensors"] and other["hash"] != one["hash"]
  with pytest.raises(lora_policy.BaseMismatch, match=r"^ckpt holds adapters trained on the base 'a' \(hash "
                     r"[0-9a-f]{16}\) but this job loads '/models/other' .*same tensor shapes, other values"):
    lora_policy.check_same_base(one, other, "ckpt")
  with pytest.raises(lora_policy.BaseMismatch, match="no LoRA base record"):
    lora_policy.check_same_base(None, one, "ckpt")


@pytest.mark.parametrize("section, match", [
    (dict(rank=4, alpha=8.0, targets=("q", "x")), r"unknown: x"),
    (dict(rank=-1, alpha=8.0, targets=("q",)), r"positive integer"),
    (dict(rank=4, alpha=8.0, targets=("q",), dropout=0.1), r"only 0.0"),
])
def test_bad_sections(section, match):
  with pytest.raises(ValueError, match=match):
    lora_policy.parse_config(section)
  assert lora_policy.parse_config(dict(rank=0, alpha=8.0, targets=("q",))) is None


def test_reference_is_the_base_itself():
  """With LoRA the trainer's reference pass reads the frozen base (the same arrays: no copy anywhere), the sampler
  and the trainer's pass read the merged weights."""
  import types
  from rlj import rl_loop
  mesh = sharding.make_mesh([("data", 1), ("fsdp", 1), ("tensor", 1)], devices=jax.devices()[:1])
  policy, adapters = _policy(mesh)
  trainer = types.SimpleNamespace(c=types.SimpleNamespace(lora=policy, sampler_shardings=None, sampler_dtype=None))
  assert rl_loop.Trainer.reference_params(trainer, None) is policy.base
  adapters = jax.tree.map(lambda x: x + 0.02, adapters)
  got = rl_loop.Trainer.sampler_params(trainer, adapters)
  want = lora.merge(policy.base, adapters, policy.config)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(want))
  trainer.c.lora = None     # full fine-tuning: the kept reference copy
  assert rl_loop.Trainer.reference_params(trainer, "copy") == "copy"
