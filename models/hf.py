"""Hugging Face checkpoints (config.json + safetensors) <-> this project's config and param tree.

Supported ``model_type``s: llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text (``models.hf_config``
translates config.json). Only safetensors are read or written (never pickle). Loading places every tensor
straight onto the sharding the caller picks; host memory peaks at one stacked parameter (e.g. all layers' MLP
gate kernels). Saving writes ``model.safetensors``, or numbered shards plus
``model.safetensors.index.json`` when the weights exceed ``max_shard_bytes``; ``transformers``'
``from_pretrained`` loads the result.

Layout: Hugging Face stores a linear layer as weight [out, in]; we store kernels [in, ...out] split per head,
e.g. ``q_proj.weight`` [H·Dh, D] <-> ``layers/attn/q`` [L, D, H, Dh]. RoPE uses the same "rotate_half"
layout on both sides, so no permutation of q/k rows is needed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any, Callable, NamedTuple, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from models.config import ModelConfig
from models.hf_config import SUPPORTED, config_from_hf, config_to_hf  # noqa: F401  (re-exported)
from models.transformer import Transformer

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Placement of loaded tensors: (logical PartitionSpecs, ShapeDtypeStructs) -> shardings, or a tree of them.
Shardings = Union[Callable[[Any, Any], Any], Any]


# ---------------------------------------------------------------------------------------------------------
# Parameter name and layout mapping
# ---------------------------------------------------------------------------------------------------------

class _Spec(NamedTuple):
  path: tuple[str, ...]                 # key path in our param tree
  hf_name: str                          # "{i}" stands for the layer number
  hf_shape: tuple[int, ...]             # one layer's tensor in Hugging Face layout
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]

  @property
  def layered(self) -> bool:
    return "{i}" in self.hf_name


def _specs(c: ModelConfig) -> list[_Spec]:
  d, f, dh = c.embed_dim, c.mlp_dim, c.head_dim
  t = lambda a: a.T  # noqa: E731  (2-D transpose is its own inverse)
  ident = lambda a: a  # noqa: E731
  specs = [
      _Spec(("embedder", "embedding"), "model.embed_tokens.weight", (c.vocab_size, d), ident, ident),
      _Spec(("final_norm", "scale"), "model.norm.weight", (d,), ident, ident),
      _Spec(("layers", "attn_norm", "scale"), "model.layers.{i}.input_layernorm.weight", (d,), ident, ident),
      _Spec(("layers", "mlp", "gate"), "model.layers.{i}.mlp.gate_proj.weight", (f, d), t, t),
      _Spec(("layers", "mlp", "up"), "model.layers.{i}.mlp.up_proj.weight", (f, d), t, t),
      _Spec(("layers", "mlp", "down"), "model.layers.{i}.mlp.down_proj.weight", (d, f), t, t),
      _Spec(("layers", "attn", "o"), "model.layers.{i}.self_attn.o_proj.weight", (d, c.num_heads * dh),
            lambda a: a.reshape(d, c.num_heads, dh).transpose(1, 2, 0),
            lambda a: a.transpose(2, 0, 1).reshape(d, c.num_heads * dh)),
  ]
  # Gemma 2/3 name the four norms around attention and MLP; elsewhere post_attention_layernorm is the MLP's.
  norms = ({"attn_post_norm": "post_attention_layernorm", "mlp_norm": "pre_feedforward_layernorm",
            "mlp_post_norm": "post_feedforward_layernorm"} if c.post_norms else
           {"mlp_norm": "post_attention_layernorm"})
  for ours, theirs in norms.items():
    specs.append(_Spec(("layers", ours, "scale"), f"model.layers.{{i}}.{theirs}.weight", (d,), ident, ident))
  if c.qk_norm:
    for name in ("q", "k"):
      specs.append(_Spec(("layers", "attn", f"{name}_norm", "scale"),
                         f"model.layers.{{i}}.self_attn.{name}_norm.weight", (dh,), ident, ident))
  for name, n in (("q", c.num_heads), ("k", c.num_kv_heads), ("v", c.num_kv_heads)):
    specs.append(_Spec(("layers", "attn", name), f"model.layers.{{i}}.self_attn.{name}_proj.weight", (n * dh, d),
                       lambda a, n=n: a.reshape(n, dh, d).transpose(2, 0, 1),
                       lambda a, n=n: a.transpose(1, 2, 0).reshape(n * dh, d)))
    if c.qkv_bias:
      specs.append(_Spec(("layers", "attn", f"{name}_bias"), f"model.layers.{{i}}.self_attn.{name}_proj.bias",
                         (n * dh,), lambda a, n=n: a.reshape(n, dh), lambda a, n=n: a.reshape(n * dh)))
  if not c.tie_embeddings:
    specs.append(_Spec(("lm_head",), "lm_head.weight", (c.vocab_size, d), t, t))
  return specs


def _hf_names(spec: _Spec, c: ModelConfig) -> list[str]:
  return [spec.hf_name.format(i=i) for i in range(c.num_layers)] if spec.layered else [spec.hf_name]


def _get(tree: Any, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def abstract_params(config: ModelConfig) -> Any:
  """``jax.eval_shape`` of the model's init: boxed ``ShapeDtypeStruct``s with logical names (no allocation)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  init = lambda: Transformer(config).init(jax.random.key(0), tokens, tokens, tokens)["params"]  # noqa: E731
  return jax.eval_shape(init)


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------

def _tensor_files(path: str) -> dict[str, str]:
  """Tensor name -> safetensors file name, from the index when the checkpoint is sharded."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as fh:
      return dict(json.load(fh)["weight_map"])
  files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(f"{path}: no *.safetensors files (pickled checkpoints are not read)")
  out = {}
  for name in files:
    with safe_open(os.path.join(path, name), framework="numpy") as fh:
      out.update({key: name for key in fh.keys()})
  return out


def _checkpoint_dtype(d: dict) -> str:
  name = str(d.get("dtype") or d.get("torch_dtype") or "float32")
  return "bfloat16" if name == "bfloat16" else "float32"


def load_hf_checkpoint(path: str, *, shardings: Optional[Shardings] = None,
                       dtype: Optional[str] = None) -> tuple[ModelConfig, Any]:
  """Reads a Hugging Face checkpoint directory into ``(ModelConfig, params)``.

  Args:
    path: directory with config.json and model.safetensors, or shards with model.safetensors.index.json.
    shardings: where each parameter goes: a callable ``(logical, shapes) -> tree of jax Shardings`` called with
      the param tree's logical-name ``PartitionSpec``s (``nn.get_partition_spec``) and its unboxed
      ``ShapeDtypeStruct``s (``rlj.sharding.tree_shardings`` with a mesh and rules bound fits), or such a
      tree itself; None puts everything on the first device.
    dtype: param and compute dtype ("float32" / "bfloat16"); None takes the checkpoint's (float16 -> float32).
  Returns:
    (config, params) with ``params`` an unboxed tree matching ``Transformer(config).init(...)["params"]``.
  Raises:
    ValueError: naming the tensor and file for missing, unexpected or mis-shaped tensors.
  """
  with open(os.path.join(path, "config.json")) as fh:
    hf_config = json.load(fh)
  dtype = dtype or _checkpoint_dtype(hf_config)
  config = dataclasses.replace(config_from_hf(hf_config), param_dtype=dtype, dtype=dtype)
  abstract = abstract_params(config)
  shapes = nn.unbox(abstract)
  if shardings is None:
    shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), shapes)
  elif callable(shardings):
    shardings = shardings(nn.get_partition_spec(abstract), shapes)

  files = _tensor_files(path)
  specs = _specs(config)
  expected = {n for s in specs for n in _hf_names(s, config)}
  missing = sorted(expected - set(files))
  if missing:
    raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensor(s) the {hf_config['model_type']} config "
                     f"needs, e.g. {missing[:5]}")
  tolerated = {"lm_head.weight"} if config.tie_embeddings else set()
  unexpected = sorted(n for n in set(files) - expected - tolerated if not n.endswith(_IGNORED_SUFFIXES))
  if unexpected:
    raise ValueError(f"{path}: unexpected tensor(s) {[(n, files[n]) for n in unexpected[:5]]} "
                     f"({len(unexpected)} in all) for this {hf_config['model_type']} config")

  params: dict = {}
  with contextlib.ExitStack() as stack:
    handles = {f: stack.enter_context(safe_open(os.path.join(path, f), framework="numpy"))
               for f in sorted(set(files[n] for n in expected))}

    def read(spec: _Spec, name: str) -> np.ndarray:
      a = handles[files[name]].get_tensor(name)
      if tuple(a.shape) != spec.hf_shape:
        raise ValueError(f"{path}/{files[name]}: tensor {name} has shape {tuple(a.shape)}, the config implies "
                         f"{spec.hf_shape}")
      return spec.to_ours(a).astype(config.jnp_param_dtype)

    for spec in specs:
      names = _hf_names(spec, config)
      full = np.stack([read(spec, n) for n in names]) if spec.layered else read(spec, names[0])
      target = _get(shapes, spec.path)
      assert full.shape == target.shape, (spec.path, full.shape, target.shape)
      arr = jax.make_array_from_callback(full.shape, _get(shardings, spec.path), lambda idx, a=full: a[idx])
      _set(params, spec.path, arr)
      del full
  return config, params


# ---------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------

def _to_host(x: jax.Array) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def save_hf_checkpoint(params: Any, config: ModelConfig, path: str, *, max_shard_bytes: int = 5 * 2**30,
                       dtype: Optional[str] = None) -> list[str]:
  """Writes ``params`` as a Hugging Face checkpoint (config.json + safetensors) that transformers can load.

  Args:
    params: the param tree of ``Transformer(config)`` (boxed or not, sharded or not).
    config: its config.
    path: output directory (created if needed).
    max_shard_bytes: start a new ``model-0000k-of-0000n.safetensors`` file past this size; a checkpoint that
      fits in one writes ``model.safetensors`` and no index.
    dtype: storage dtype ("float32" / "bfloat16"); None keeps ``config.param_dtype``.
  Returns:
    The safetensors file names written. Every process gathers; only process 0 writes.
  """
  params = nn.unbox(params)
  dtype = jnp.dtype(dtype or config.param_dtype)
  hf_config = config_to_hf(dataclasses.replace(config, param_dtype=dtype.name))
  specs = _specs(config)
  entries = [(s, i, n) for s in specs for i, n in enumerate(_hf_names(s, config))]
  nbytes = lambda s: int(np.prod(s.hf_shape)) * dtype.itemsize  # noqa: E731
  shards, size = [[]], 0
  for entry in entries:
    if shards[-1] and size + nbytes(entry[0]) > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(entry)
    size += nbytes(entry[0])
  n = len(shards)
  file_names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
  write = jax.process_index() == 0
  if write:
    os.makedirs(path, exist_ok=True)
  cache: dict = {}
  weight_map = {}
  for file_name, shard in zip(file_names, shards):
    tensors = {}
    for spec, layer, name in shard:
      if cache.get("path") != spec.path:  # entries are grouped by parameter: fetch each one once
        cache = {"path": spec.path, "value": _to_host(_get(params, spec.path))}
      value = cache["value"][layer] if spec.layered else cache["value"]
      tensors[name] = np.ascontiguousarray(spec.to_hf(value).astype(dtype))
      weight_map[name] = file_name
    if write:
      save_file(tensors, os.path.join(path, file_name), metadata={"format": "pt"})
  if write:
    with open(os.path.join(path, "config.json"), "w") as fh:
      json.dump(hf_config, fh, indent=2)
    if n > 1:
      total = sum(nbytes(s) for s, _, _ in entries)
      with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
  return file_names
