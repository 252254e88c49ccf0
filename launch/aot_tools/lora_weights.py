"""LoRA runs in ``launch.aot``: the frozen base, the adapters' train state and the merged copies, as abstract arrays.

With ``model.lora.rank > 0`` (``rlj.lora_policy``; Hu et al., "LoRA", arXiv:2106.09685) one RL step holds, per chip:

- the frozen base W0 (in ``model.lora.base_dtype`` when set), which is also the reference: no second copy;
- the train state: the adapters a, b (float32) and their Adam moments;
- while sampling, a merged copy W0 + (alpha / r) a b in the sampler's dtype on the base's shardings, made once per
  rollout by ``LoraPolicy.merged`` (its own small program, compiled here as the "LoRA merge" phase);
- while old log-probs are recomputed, a merged copy in the base's dtype, which the rollout log-prob pass reads
  (the reference pass reads the base itself).

The optimizer step takes the base as a separate, non-donated argument and merges inside (``lora_params``), so its
merged kernels are temporaries of that program.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from launch import lora_setup
from models import lora
from rlj import lora_policy, train_state

BASE = "base params (frozen, also the reference)"
ADAPTERS = "adapters"
SAMPLER = "sampler params (merged)"
MERGED = "merged params (old log-probs)"


@dataclasses.dataclass
class LoraWeights:
  """A LoRA run's abstract weights (ShapeDtypeStructs on their shardings)."""
  config: lora.LoraConfig
  policy: lora_policy.LoraPolicy     # its merge program is the one the trainer runs (``merged``)
  base: Any
  state: Any                         # TrainState over the adapters
  state_shardings: Any

  @property
  def base_dtype(self):
    return _float_dtype(self.base)

  def merged(self, dtype) -> Any:
    """The merged copy ``LoraPolicy.merged(adapters, dtype)`` returns: the base's shapes and shardings in ``dtype``."""
    return _cast(self.base, jnp.dtype(dtype))

  def merge_call(self, dtype) -> tuple[Any, tuple]:
    """(the jitted merge, its arguments) as ``LoraPolicy.merged(adapters, dtype)`` calls it."""
    dt = jnp.dtype(dtype)
    merge = self.policy.merge_program
    return merge, (self.base, self.state.params, None if dt == self.base_dtype else dt)


def _float_dtype(tree: Any):
  return next(jnp.dtype(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating))


def _cast(tree: Any, dtype) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, dtype if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) else x.dtype,
      sharding=x.sharding), tree)


def check(config) -> lora.LoraConfig | None:
  """The config's ``model.lora`` checked as ``launch.train`` checks it (a bad rank, target, dtype or an algorithm
  that cannot train adapters stops in one line naming the key); None when LoRA is off. ``launch.aot`` lays out the
  preset's shapes, so an ``init.policy=hf`` checkpoint's config.json is not read."""
  c = config.copy_and_resolve_references()
  if c.init.policy == "hf":
    c.init.policy = "scratch"
  lora_setup.check(c)   # the launcher's own check
  return lora_setup.lora_config(config)


def abstract(cfg: lora.LoraConfig, base_dtype: str, mc, params: Any, tx, mesh, rules) -> LoraWeights:
  """The run's weights from the model's abstract ``params`` (ShapeDtypeStructs on their shardings): the base cast
  to ``base_dtype`` ("" keeps it, as ``lora_policy.cast_base``), the adapters laid out by
  ``lora_policy.adapter_shardings`` and their optimizer moments by ``train_state.state_shardings``."""
  base = _cast(params, jnp.dtype(base_dtype) if base_dtype else None)
  plain = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base)
  ad_sh = lora_policy.adapter_shardings(cfg, mc, plain, mesh, rules)
  adapters = jax.eval_shape(lambda: lora.init_adapters(jax.random.key(0), plain, cfg))
  state_sh = train_state.state_shardings(ad_sh, tx, adapters, mesh)
  state = jax.eval_shape(lambda a: train_state.TrainState.create(a, tx), adapters)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh)
  policy = lora_policy.LoraPolicy(cfg, base=base, base_shardings=jax.tree.map(lambda x: x.sharding, base),
                                  adapter_shardings=ad_sh, fingerprint={})
  return LoraWeights(config=cfg, policy=policy, base=base, state=state, state_shardings=state_sh)
