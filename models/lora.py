"""LoRA adapters on the decoder's projection kernels: config, init, merge, and export in PEFT's format.

"LoRA: Low-Rank Adaptation of Large Language Models" (Hu et al., arXiv:2106.09685), Eq. 3: a frozen weight W0
gets a trainable low-rank update, h = W0 x + (alpha / r) B A x, with A: in -> r random and B: r -> out zero at
initialisation, so training starts from the base model exactly. Our kernels are [in..., out...] (``x @ W``), so
an adapter is ``a`` [L, in..., r] and ``b`` [L, r, out...] and the merged kernel is

  W' = W + (alpha / r) · a @ b        (per layer; ``merge``)

The forward pass runs on merged kernels (``lora_params``: the same ``Transformer.apply``, no model change);
the base sits under ``stop_gradient``, so gradients reach only the adapters. The adapters keep the kernels'
leading "layers" axis and their input / output logical axis names (``adapter_axes``), so each shards like
its base kernel and the merge is a per-shard einsum over the rank, without gathering a stacked kernel.

Targets name the projections of every block (``TARGETS``): attention q, k, v, o and MLP gate, up, down.
``peft_state_dict`` / ``write_peft_adapter`` write them as a PEFT LoRA adapter (adapter_config.json +
adapter_model.safetensors) that ``peft.PeftModel.from_pretrained`` loads onto the Hugging Face base model.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import string
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file

from models.config import ModelConfig

RANK_AXIS = "lora_rank"   # logical name of the rank axis: no sharding rule names it, so it stays unsharded


class Target(NamedTuple):
  """One adaptable projection: where its stacked kernel lives and how its axes split into input / output."""
  path: tuple[str, ...]     # key path in the (scanned) param tree; the kernel is [L, in..., out...]
  num_in: int               # how many of the kernel's dims after "layers" are input dims
  hf_module: str            # the Hugging Face module under model.layers.{i}


TARGETS: dict[str, Target] = {
    "q": Target(("layers", "attn", "q"), 1, "self_attn.q_proj"),        # [L, D, H, Dh]
    "k": Target(("layers", "attn", "k"), 1, "self_attn.k_proj"),        # [L, D, KVH, Dh]
    "v": Target(("layers", "attn", "v"), 1, "self_attn.v_proj"),        # [L, D, KVH, Dh]
    "o": Target(("layers", "attn", "o"), 2, "self_attn.o_proj"),        # [L, H, Dh, D]
    "gate": Target(("layers", "mlp", "gate"), 1, "mlp.gate_proj"),      # [L, D, F]
    "up": Target(("layers", "mlp", "up"), 1, "mlp.up_proj"),            # [L, D, F]
    "down": Target(("layers", "mlp", "down"), 1, "mlp.down_proj"),      # [L, F, D]
}


def hf_features(name: str, c: ModelConfig) -> tuple[int, int]:
  """(in_features, out_features) of target ``name``'s Hugging Face ``nn.Linear`` in model ``c``."""
  d, f, q, kv = c.embed_dim, c.mlp_dim, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f), "down": (f, d)}[name]


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which kernels get adapters, and their rank r and scale alpha / r (Hu et al., Eq. 3).

  Attributes:
    rank: r >= 1, at most the smallest side of every targeted kernel's [in, out] matrix view.
    alpha: the update is scaled by alpha / r (PEFT's ``lora_alpha``; not rank-stabilised).
    targets: names from ``TARGETS``.
    dropout: PEFT's ``lora_dropout`` (dropout of x before A). It needs an unmerged forward pass, which the
      merged-kernel forward here does not have, so only 0.0 is accepted.
  """
  rank: int
  alpha: float
  targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
  dropout: float = 0.0

  def __post_init__(self):
    targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
    object.__setattr__(self, "targets", targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets or len(set(targets)) != len(targets):
      raise ValueError(f"LoRA targets {list(targets)}: give distinct names from {', '.join(TARGETS)} "
                       f"({'unknown: ' + ', '.join(map(str, unknown)) if unknown else 'empty or repeated'})")
    if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank <= 0:
      raise ValueError(f"LoRA rank {self.rank!r}: must be a positive integer")
    if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
      raise ValueError(f"LoRA alpha {self.alpha!r}: must be a positive number (the update is scaled by alpha / rank)")
    if self.dropout != 0.0:
      raise ValueError(f"LoRA dropout {self.dropout!r}: only 0.0 is supported (dropout before A needs an unmerged "
                       f"forward pass; adapters are applied as merged kernels)")

  @property
  def scale(self) -> float:
    """alpha / r, the factor on B A in Eq. 3."""
    return self.alpha / self.rank


# ---------------------------------------------------------------------------------------------------------
# Pure math
# ---------------------------------------------------------------------------------------------------------

def matrix_view(kernel_shape: Sequence[int], num_in: int) -> tuple[int, int]:
  """(prod(in dims), prod(out dims)) of one layer of a stacked kernel [L, in..., out...]."""
  dims = tuple(kernel_shape)[1:]
  return math.prod(dims[:num_in]), math.prod(dims[num_in:])


def delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """scale · a @ b per layer, float32: a [L, in..., r], b [L, r, out...] -> [L, in..., out...].

  One einsum over the named dims (no reshape to 2-D), so a sharded a / b give an output sharded like the
  kernel, computed shard by shard; float32 at full precision (TPUs otherwise round f32 matmuls to bf16).
  """
  n_in, n_out = a.ndim - 2, b.ndim - 2
  letters = iter(string.ascii_lowercase.replace("l", "").replace("r", ""))
  ins = "".join(next(letters) for _ in range(n_in))
  outs = "".join(next(letters) for _ in range(n_out))
  ab = jnp.einsum(f"l{ins}r,lr{outs}->l{ins}{outs}", a.astype(jnp.float32), b.astype(jnp.float32),
                  precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  return scale * ab


def merge_kernel(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """W + scale · a @ b (Hu et al., Eq. 3 folded into the weight), summed in float32, returned in W's dtype."""
  return (w.astype(jnp.float32) + delta(a, b, scale)).astype(w.dtype)


def init_a(rng: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
  """A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), float32: PEFT's default, torch's ``kaiming_uniform_(a=sqrt(5))``
  on lora_A ([r, in]), whose bound is sqrt(6 / ((1 + 5) · fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(rng, shape, jnp.float32, -bound, bound)


# ---------------------------------------------------------------------------------------------------------
# The param tree
# ---------------------------------------------------------------------------------------------------------

def _get(tree: Any, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> dict:
  """A copy of ``tree`` with ``path`` replaced (the dicts along the path are copied, the rest shared)."""
  out = dict(tree)
  out[path[0]] = value if len(path) == 1 else _set(tree[path[0]], path[1:], value)
  return out


def kernel(params: Any, name: str) -> Any:
  """The stacked kernel [L, in..., out...] of target ``name`` in ``params`` (or any tree of the same shape)."""
  target = TARGETS[name]
  if "layers" not in params:
    raise ValueError("LoRA needs the scanned layer stack (params['layers'], ModelConfig.scan_layers=True); "
                     "merge before models.transformer.unstack_layers")
  return _get(params, target.path)


def check_rank(params: Any, cfg: LoraConfig) -> None:
  """Raises a one-line ValueError when the rank exceeds the smallest side of a targeted kernel's matrix view."""
  sides = {n: matrix_view(kernel(params, n).shape, TARGETS[n].num_in) for n in cfg.targets}
  limit_name = min(sides, key=lambda n: min(sides[n]))
  limit = min(sides[limit_name])
  if cfg.rank > limit:
    raise ValueError(f"LoRA rank {cfg.rank} exceeds {limit}, the smallest side of the targeted kernels' [in, out] "
                     f"matrices (target {limit_name!r}: {list(sides[limit_name])}); use rank <= {limit}")


def init_adapters(rng: jax.Array, params: Any, cfg: LoraConfig) -> dict:
  """Fresh adapters ``{target: {"a": [L, in..., r], "b": [L, r, out...]}}``, float32; b = 0 (Hu et al.,
  Sec. 4.1), so ``merge`` returns the base kernels at first. ``params`` may be arrays or ShapeDtypeStructs."""
  check_rank(params, cfg)
  out = {}
  for name, key in zip(cfg.targets, jax.random.split(rng, len(cfg.targets))):
    shape, num_in = kernel(params, name).shape, TARGETS[name].num_in
    layers, ins, outs = shape[0], tuple(shape[1:1 + num_in]), tuple(shape[1 + num_in:])
    out[name] = {"a": init_a(key, (layers, *ins, cfg.rank), math.prod(ins)),
                 "b": jnp.zeros((layers, cfg.rank, *outs), jnp.float32)}
  return out


def adapter_axes(param_axes: Any, cfg: LoraConfig) -> dict:
  """Logical PartitionSpecs of the adapters: ``a`` takes its kernel's ("layers", input axes...) plus the
  unsharded rank axis, ``b`` ("layers", rank, output axes...), so both shard with the kernel under
  ``rlj.sharding``'s rules (e.g. q: a ("layers", "embed", "lora_rank"), b ("layers", "lora_rank", "heads",
  "head_dim")).

  Args:
    param_axes: the param tree's logical PartitionSpecs, ``nn.get_partition_spec`` of the boxed params (or of
      ``models.hf.abstract_params(config)``).
  """
  out = {}
  for name in cfg.targets:
    names = tuple(kernel(param_axes, name))
    num_in = TARGETS[name].num_in
    out[name] = {"a": P(names[0], *names[1:1 + num_in], RANK_AXIS),
                 "b": P(names[0], RANK_AXIS, *names[1 + num_in:])}
  return out


def _check_adapters(params: Any, adapters: dict, cfg: LoraConfig) -> None:
  if set(adapters) != set(cfg.targets):
    raise ValueError(f"LoRA adapters hold targets {sorted(adapters)} but the config targets {sorted(cfg.targets)}")
  for name in cfg.targets:
    shape, num_in = kernel(params, name).shape, TARGETS[name].num_in
    a, b = adapters[name]["a"].shape, adapters[name]["b"].shape
    want_a, want_b = (*shape[:1 + num_in], cfg.rank), (shape[0], cfg.rank, *shape[1 + num_in:])
    if tuple(a) != want_a or tuple(b) != want_b:
      raise ValueError(f"LoRA adapter {name!r}: a {tuple(a)} and b {tuple(b)} do not fit kernel {tuple(shape)} at "
                       f"rank {cfg.rank} (want {want_a} and {want_b})")


def merge(params: Any, adapters: dict, cfg: LoraConfig) -> Any:
  """``params`` with every targeted kernel W replaced by W + (alpha / r) · a @ b; other leaves are the same
  objects. Exact at b = 0 (W + 0), jittable, and sharding-preserving (``delta``)."""
  _check_adapters(params, adapters, cfg)
  out = params
  for name in cfg.targets:
    w = kernel(params, name)
    out = _set(out, TARGETS[name].path, merge_kernel(w, adapters[name]["a"], adapters[name]["b"], cfg.scale))
  return out


def unmerged_variables(params: Any, adapters: dict, cfg: LoraConfig) -> dict:
  """``{"params": params, "lora": ...}`` for ``Transformer.apply``: the base kernels as they are and the adapters in
  the "lora" collection (b pre-scaled by alpha / r), so every targeted projection computes x W + x a b (the
  unmerged form; ``models.layers.with_lora``). Equal to applying ``merge(params, adapters, cfg)`` up to rounding."""
  _check_adapters(params, adapters, cfg)
  tree: dict = {}
  for name in cfg.targets:
    *where, leaf = TARGETS[name].path
    node = tree
    for key in where:
      node = node.setdefault(key, {})
    node[leaf + "_a"] = adapters[name]["a"]
    node[leaf + "_b"] = cfg.scale * adapters[name]["b"]
  return {"params": params, "lora": tree}


def lora_params(params: Any, adapters: dict, cfg: LoraConfig) -> Any:
  """``merge`` with the base under ``stop_gradient``: the params to ``Transformer.apply`` when training only
  the adapters (``jax.grad`` w.r.t. the adapters through it is the LoRA gradient; the base gets zeros)."""
  return merge(jax.lax.stop_gradient(params), adapters, cfg)


# ---------------------------------------------------------------------------------------------------------
# PEFT export
# ---------------------------------------------------------------------------------------------------------

def _to_host(x: Any) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x), dtype=np.float32)


def peft_state_dict(adapters: dict, cfg: LoraConfig, model_config: ModelConfig) -> dict[str, np.ndarray]:
  """The adapters under PEFT's tensor names for a Llama / Mistral / Qwen / Gemma ``*ForCausalLM``, float32:
  ``base_model.model.model.layers.{i}.{module}.lora_A.weight`` [r, in_features] and ``...lora_B.weight``
  [out_features, r]; in / out features flatten our split dims in Hugging Face's order (head-major, as
  ``models.hf`` lays q / k / v / o out)."""
  out = {}
  for name in cfg.targets:
    a, b = _to_host(adapters[name]["a"]), _to_host(adapters[name]["b"])
    fin, fout = hf_features(name, model_config)
    want_a = (model_config.num_layers, fin, cfg.rank)
    want_b = (model_config.num_layers, cfg.rank, fout)
    a2, b2 = a.reshape(a.shape[0], -1, a.shape[-1]), b.reshape(b.shape[0], b.shape[1], -1)
    if a2.shape != want_a or b2.shape != want_b:
      raise ValueError(f"LoRA adapter {name!r}: a {a.shape} / b {b.shape} do not match the model config's "
                       f"[layers, in, r] {list(want_a)} / [layers, r, out] {list(want_b)}")
    prefix = f"base_model.model.model.layers.{{i}}.{TARGETS[name].hf_module}"
    for i in range(model_config.num_layers):
      out[prefix.format(i=i) + ".lora_A.weight"] = np.ascontiguousarray(a2[i].T)
      out[prefix.format(i=i) + ".lora_B.weight"] = np.ascontiguousarray(b2[i].T)
  return out


def peft_adapter_config(cfg: LoraConfig, base_path: str) -> dict:
  """adapter_config.json of the adapter: PEFT LoRA, scale lora_alpha / r, on ``base_path``'s model."""
  return {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_path,
      "r": cfg.rank,
      "lora_alpha": cfg.alpha,
      "lora_dropout": cfg.dropout,
      "target_modules": sorted(TARGETS[n].hf_module.split(".")[-1] for n in cfg.targets),
      "bias": "none",
      "fan_in_fan_out": False,
      "use_rslora": False,
      "use_dora": False,
      "init_lora_weights": True,
      "inference_mode": True,
      "modules_to_save": None,
  }


def write_peft_adapter(out_dir: str, adapters: dict, cfg: LoraConfig, model_config: ModelConfig,
                       base_path: str) -> None:
  """Writes ``out_dir``/adapter_config.json and adapter_model.safetensors (PEFT's layout). Every process
  gathers the adapters; only process 0 writes."""
  tensors = peft_state_dict(adapters, cfg, model_config)
  if jax.process_index() != 0:
    return
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out_dir, "adapter_config.json"), "w") as fh:
    json.dump(peft_adapter_config(cfg, base_path), fh, indent=2)
