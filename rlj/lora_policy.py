"""LoRA in the RL engine: the adapters train, the base stays frozen and is also the reference.

With ``model.lora.rank > 0`` an RL job's ``TrainState`` holds the adapters (``models.lora``) and their optimizer
moments only; the base weights are a separate, never-donated tree (``LoraPolicy.base``) that every program reads:

- the optimizer step differentiates ``loss(lora_params(base, adapters))`` w.r.t. the adapters alone (the base is
  an argument of the jitted step, not part of the state: no gradient, no moment, no copy per step);
- the reference log-probs are the base's (adapters off, Hu et al.'s W0): the same arrays, no second model;
- the sampler, the trainer's rollout log-prob pass and evaluation read the merged weights
  W0 + (alpha / r) B A, merged once per rollout on device (``merged``), exact up to the storage dtype;
- checkpoints hold the adapters, their moments and ``fingerprint(base)``, which a resume compares
  (``check_same_base``).

``base_dtype`` may store the frozen base in bfloat16 while the adapters and their moments stay float32.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models import hf, lora
from models.config import ModelConfig
from rlj import sharding


@dataclasses.dataclass
class LoraPolicy:
  """The frozen base on its shardings, the adapters' config and shardings, and the base's fingerprint."""
  config: lora.LoraConfig
  base: Any                      # the frozen base params (also the reference)
  base_shardings: Any
  adapter_shardings: Any
  fingerprint: dict

  def __post_init__(self):
    cfg, shardings = self.config, self.base_shardings

    def merge(base, adapters, dtype):
      out = lora.merge(base, adapters, cfg)
      if dtype is None:
        return out
      return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, out)

    self._merge = jax.jit(merge, static_argnums=2, out_shardings=shardings)

  @property
  def merge_program(self):
    """The jitted ``(base, adapters, dtype or None) -> merged`` that ``merged`` calls (``launch.aot`` compiles it)."""
    return self._merge

  def step_params(self, base, adapters):
    """The params the optimizer step runs the model on: merged, the base under stop_gradient."""
    return lora.lora_params(base, adapters, self.config)

  def merged(self, adapters, dtype=None) -> Any:
    """W0 + (alpha / r) B A for every target (other leaves are the base's), on the base's shardings, optionally
    cast to ``dtype`` (the sampler's) in the same program."""
    return self._merge(self.base, adapters, None if dtype is None else jnp.dtype(dtype))


def parse_config(section: Any) -> lora.LoraConfig | None:
  """The config's ``model.lora`` section as a ``LoraConfig``, or None when ``rank`` is 0 (LoRA off).

  Raises:
    ValueError: a one-line message for a bad rank, alpha, target name or dropout.
  """
  d = dict(section)
  if int(d.get("rank", 0)) == 0 and not isinstance(d.get("rank"), bool):
    return None
  return lora.LoraConfig(rank=d["rank"], alpha=float(d["alpha"]), targets=tuple(d["targets"]),
                         dropout=float(d.get("dropout", 0.0)))


def smallest_side(cfg: lora.LoraConfig, mc: ModelConfig) -> tuple[int, str]:
  """(the smallest in / out feature count over the targeted projections, the target that has it)."""
  sides = {n: min(lora.hf_features(n, mc)) for n in cfg.targets}
  name = min(sides, key=sides.get)
  return sides[name], name


def param_axes(mc: ModelConfig) -> Any:
  """The logical PartitionSpec tree of ``Transformer(mc)``'s params."""
  return sharding.logical_specs(hf.abstract_params(mc))


def adapter_shardings(cfg: lora.LoraConfig, mc: ModelConfig, base_abstract: Any, mesh, rules) -> Any:
  """NamedShardings of the adapters: each follows its base kernel's input / output axes (``lora.adapter_axes``)."""
  axes = lora.adapter_axes(param_axes(mc), cfg)
  shapes = jax.eval_shape(lambda: lora.init_adapters(jax.random.key(0), base_abstract, cfg))
  return sharding.tree_shardings(axes, shapes, mesh, rules)


def cast_base(params: Any, dtype: str) -> Any:
  """The base's floating leaves in ``dtype`` ("" keeps them), on their shardings; the input buffers are donated
  so that two copies never coexist."""
  if not dtype:
    return params
  dt = jnp.dtype(dtype)
  if all(x.dtype == dt for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)):
    return params
  shardings = jax.tree.map(lambda x: x.sharding, params)
  cast = lambda p: jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, p)  # noqa
  return jax.jit(cast, out_shardings=shardings, donate_argnums=0)(params)


def build(cfg: lora.LoraConfig, mc: ModelConfig, base: Any, *, mesh, rules, rng, source: str,
          base_dtype: str = "") -> tuple[LoraPolicy, Any]:
  """``(LoraPolicy, fresh adapters)`` for the placed ``base`` params (loaded from ``source``).

  The fingerprint is taken before ``base_dtype`` casts the base, so it names the checkpoint's tensors."""
  lora.check_rank(base, cfg)
  fp = fingerprint(base, source)
  base = cast_base(base, base_dtype)
  base_sh = jax.tree.map(lambda x: x.sharding, base)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base)
  ad_sh = adapter_shardings(cfg, mc, abstract, mesh, rules)
  adapters = jax.jit(lambda r: lora.init_adapters(r, abstract, cfg), out_shardings=ad_sh)(rng)
  return LoraPolicy(cfg, base, base_sh, ad_sh, fp), adapters


# ---------------------------------------------------------------------------------------------------------
# The base's fingerprint
# ---------------------------------------------------------------------------------------------------------

def _probe(x: jax.Array) -> jax.Array:
  """At most 4 evenly spaced entries per dim of ``x`` as float32 (a strided slice: no gather of the tensor)."""
  return x[tuple(slice(None, None, max(1, d // 3)) for d in x.shape)].astype(jnp.float32).reshape(-1)


def fingerprint(params: Any, source: str) -> dict:
  """What identifies a base: its ``source`` (path) and a SHA-256 over its tensors' metadata (names, shapes,
  dtypes) and a strided probe of each tensor's values, so another checkpoint of the same architecture (a fine-tune
  of it, a different revision) has another hash. The probe is a strided slice: exact values, the same on any mesh.
  """
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  names = [jax.tree_util.keystr(path) for path, _ in flat]
  metadata = [(n, list(x.shape), str(x.dtype)) for n, (_, x) in zip(names, flat)]
  leaves = [x for _, x in flat]
  first = getattr(leaves[0], "sharding", None) if leaves else None
  replicated = (jax.sharding.NamedSharding(first.mesh, jax.P()) if isinstance(first, jax.sharding.NamedSharding)
                else None)    # every process reads the probes (multi-host)
  probes = jax.device_get(jax.jit(lambda xs: [_probe(x) for x in xs], out_shardings=replicated)(leaves))
  h = hashlib.sha256(json.dumps(metadata).encode())
  meta_hash = h.hexdigest()[:16]
  for p in probes:
    h.update(np.asarray(p, np.float32).tobytes())
  return {"source": str(source), "tensors": meta_hash, "hash": h.hexdigest()[:16],
          "num_params": int(sum(int(np.prod(x.shape)) for _, x in flat))}


class BaseMismatch(ValueError):
  """A LoRA checkpoint resumed against another base model."""


def check_same_base(saved: dict | None, current: dict, where: str) -> None:
  """Raises ``BaseMismatch`` (one line naming both bases) when the checkpoint ``where`` was trained on another base
  than ``current``; a checkpoint without a record (no LoRA) is refused too."""
  if not saved:
    raise BaseMismatch(f"{where} holds no LoRA base record (it is not a LoRA run's checkpoint); resume it without "
                       f"model.lora, or pass a new --workdir")
  if saved.get("hash") == current["hash"]:
    return
  same_shape = saved.get("tensors") == current["tensors"]
  raise BaseMismatch(
      f"{where} holds adapters trained on the base {saved.get('source')!r} (hash {saved.get('hash')}) but this job "
      f"loads {current['source']!r} (hash {current['hash']}; {'same tensor shapes, other values' if same_shape else 'other tensors'}); "
      f"resume with the base the adapters were trained on, or pass a new --workdir")

