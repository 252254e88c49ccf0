"""Hugging Face ``config.json`` <-> ``ModelConfig`` for the supported decoder families.

| model_type   | architectures       | differs from Llama by                                                        |
|--------------|---------------------|------------------------------------------------------------------------------|
| llama        | LlamaForCausalLM    | (Llama 3.x, incl. 3.1 RoPE scaling and 3.2's tied embeddings)                |
| mistral      | MistralForCausalLM  | every layer sliding-window when ``sliding_window`` is set                    |
| qwen2        | Qwen2ForCausalLM    | q/k/v bias                                                                   |
| qwen3        | Qwen3ForCausalLM    | per-head q/k RMSNorm                                                         |
| gemma        | GemmaForCausalLM    | (1 + w) norms, sqrt(D) embedding scale, GeGLU, tied                         |
| gemma2       | Gemma2ForCausalLM   | Gemma + post-norms, query_pre_attn_scalar, attention/final soft-caps,        |
|              |                     | alternating sliding / global layers                                          |
| gemma3_text  | Gemma3ForCausalLM   | Gemma 2 without soft-caps + q/k norm, 5 sliding : 1 global, local RoPE base  |

A key this translation cannot honour (a bias, a RoPE type, bidirectional attention, a layer type) raises a
``ValueError`` naming the config.json key, never a silently different model.
"""
from __future__ import annotations

from typing import Any, Optional

from models.config import ModelConfig, sliding_pattern

ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
SUPPORTED = tuple(ARCHITECTURES)
GEMMAS = ("gemma", "gemma2", "gemma3_text")
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}
# Fixed switches of each family (``family_of`` matches a ModelConfig against them).
_SWITCHES = {
    "llama": dict(norm_plus_one=False, qkv_bias=False, qk_norm=False, post_norms=False),
    "mistral": dict(norm_plus_one=False, qkv_bias=False, qk_norm=False, post_norms=False),
    "qwen2": dict(norm_plus_one=False, qkv_bias=True, qk_norm=False, post_norms=False),
    "qwen3": dict(norm_plus_one=False, qkv_bias=False, qk_norm=True, post_norms=False),
    "gemma": dict(norm_plus_one=True, qkv_bias=False, qk_norm=False, post_norms=False),
    "gemma2": dict(norm_plus_one=True, qkv_bias=False, qk_norm=False, post_norms=True),
    "gemma3_text": dict(norm_plus_one=True, qkv_bias=False, qk_norm=True, post_norms=True),
}


def _fail(key: str, value: Any, why: str) -> None:
  raise ValueError(f"config.json: {key}={value!r} is not supported ({why})")


def _one_rope(params: dict, key: str, theta: float) -> tuple[float, Optional[tuple[float, float, float, int]]]:
  """(theta, llama3 scaling or None) of one RoPE parameter dict found under config.json key ``key``."""
  theta = float(params.get("rope_theta", theta))
  kind = params.get("rope_type", params.get("type", "default"))
  if kind == "default":
    return theta, None
  if kind == "llama3":
    return theta, (float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"]),
                   int(params["original_max_position_embeddings"]))
  _fail(f"{key}.rope_type", kind, "only 'default' and 'llama3'")


def _rope(d: dict, kind: str) -> tuple[float, Optional[tuple], Optional[float]]:
  """(global theta, global scaling, local theta or None) from config.json's RoPE keys.

  Reads ``rope_parameters`` (transformers >= 5; Gemma 3 nests one dict per layer type) or the older
  ``rope_theta`` / ``rope_scaling`` / ``rope_local_base_freq``.
  """
  default = 1_000_000.0 if kind == "gemma3_text" else 10_000.0
  theta = float(d.get("rope_theta") or default)
  key = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
  params = dict(d.get(key) or {})
  if kind != "gemma3_text":
    if set(params) & set(_LAYER_TYPES):
      _fail(key, sorted(params), f"per-layer-type RoPE parameters in a {kind} model")
    return _one_rope(params, key, theta) + (None,)
  if set(params) & set(_LAYER_TYPES):    # {"full_attention": {...}, "sliding_attention": {...}}
    theta, scaling = _one_rope(dict(params.get("full_attention") or {}), f"{key}.full_attention", theta)
    local, local_scaling = _one_rope(dict(params.get("sliding_attention") or {}), f"{key}.sliding_attention",
                                     10_000.0)
  else:
    theta, scaling = _one_rope(params, key, theta)
    local, local_scaling = float(d.get("rope_local_base_freq") or 10_000.0), None
  if local_scaling is not None:
    _fail(f"{key}.sliding_attention.rope_type", "llama3", "scaled RoPE on sliding layers")
  return theta, scaling, local


def _window(d: dict, kind: str) -> Optional[int]:
  """config.json's ``sliding_window`` with transformers' default where the key is absent (4096)."""
  window = d.get("sliding_window", 4096 if kind in ("mistral", "gemma2", "gemma3_text") else None)
  return None if window is None else int(window)


def _layer_types(d: dict, kind: str, num_layers: int) -> Optional[tuple[str, ...]]:
  """Per-layer "full" / "sliding" as transformers builds them; None when every layer is full.

  Mistral slides on every layer when ``sliding_window`` is set (transformers ignores its ``layer_types``);
  Gemma 2/3 follow ``layer_types``, else their pattern (``sliding_window_pattern``, 2 and 6); the other
  families are full attention (``layer_types`` may only say so).
  """
  if kind in ("qwen2", "qwen3") and d.get("use_sliding_window"):
    _fail("use_sliding_window", True, f"{kind} sliding-window layers")
  names = d.get("layer_types")
  if names is not None:
    unknown = sorted(set(names) - set(_LAYER_TYPES))
    if unknown or len(names) != num_layers:
      _fail("layer_types", names, f"expected {num_layers} entries from {sorted(_LAYER_TYPES)}")
    if kind not in ("mistral", "gemma2", "gemma3_text") and set(names) != {"full_attention"}:
      _fail("layer_types", names, f"sliding layers in a {kind} model")
  if kind == "mistral":
    types = ("sliding",) * num_layers if _window(d, kind) is not None else ("full",)
  elif kind in ("gemma2", "gemma3_text") and names is not None:
    types = tuple(_LAYER_TYPES[n] for n in names)
  elif kind == "gemma2":
    types = sliding_pattern(num_layers, 2)
  elif kind == "gemma3_text":
    every = d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6
    types = sliding_pattern(num_layers, int(every))
  else:
    return None
  return types if "sliding" in types else None


def config_from_hf(d: dict) -> ModelConfig:
  """Translates a Hugging Face config.json dict (``SUPPORTED`` model types) into a ``ModelConfig``.

  The param and compute dtypes are float32; ``load_hf_checkpoint`` sets them from its ``dtype``.

  Raises:
    ValueError: naming the config.json key of an unsupported family or feature.

  Warning:
    Gemma checkpoints that say ``hidden_act: "gelu"`` get the tanh approximation, as the original Gemma
    implementation (and older transformers releases) use.
  """
  kind = d.get("model_type")
  if kind not in SUPPORTED:
    _fail("model_type", kind, f"choose one of {SUPPORTED}")
  for arch in d.get("architectures") or ():
    if arch != ARCHITECTURES[kind]:
      _fail("architectures", d["architectures"], f"a {kind} checkpoint must be {ARCHITECTURES[kind]}")
  for key in ("attention_bias", "mlp_bias", "use_bidirectional_attention"):
    if d.get(key) and not (key == "attention_bias" and kind == "qwen2"):
      _fail(key, d[key], f"in a {kind} model")
  act = d.get("hidden_activation") or d.get("hidden_act", "silu")
  if kind in GEMMAS and act == "gelu":
    act = "gelu_pytorch_tanh"
  if act not in _ACTIVATIONS:
    _fail("hidden_act", act, f"choose one of {sorted(_ACTIVATIONS)}")
  theta, scaling, local_theta = _rope(d, kind)
  heads, layers = int(d["num_attention_heads"]), int(d["num_hidden_layers"])
  head_dim = int(d.get("head_dim") or d["hidden_size"] // heads)
  types = _layer_types(d, kind, layers)
  window = None
  if types is not None:
    window = _window(d, kind)
    if not window or window < 1:
      _fail("sliding_window", d.get("sliding_window"), "sliding layers need a positive window")
  later = kind in ("gemma2", "gemma3_text")
  caps = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0} if kind == "gemma2" else {}

  def cap(key):   # transformers' default where the key is absent
    value = d.get(key, caps.get(key))
    return float(value) if later and value else None
  return ModelConfig(
      vocab_size=int(d["vocab_size"]), num_layers=layers, embed_dim=int(d["hidden_size"]), num_heads=heads,
      num_kv_heads=int(d.get("num_key_value_heads") or heads), head_dim=head_dim,
      mlp_dim=int(d["intermediate_size"]), activation=_ACTIVATIONS[act], norm_eps=float(d.get("rms_norm_eps", 1e-6)),
      rope_theta=theta, rope_scaling=scaling, tie_embeddings=bool(d.get("tie_word_embeddings", kind in GEMMAS)),
      scale_embeddings=kind in GEMMAS, **_SWITCHES[kind],
      query_pre_attn_scalar=float(d.get("query_pre_attn_scalar") or 256) if later else None,
      attn_logit_softcap=cap("attn_logit_softcapping"), final_logit_softcap=cap("final_logit_softcapping"),
      sliding_window=window, layer_types=types,
      rope_local_theta=local_theta if types is not None else None)


def family_of(config: ModelConfig) -> str:
  """The ``model_type`` whose fixed switches and optional features ``config`` has; ValueError if none."""
  c = config
  switches = dict(norm_plus_one=c.norm_plus_one, qkv_bias=c.qkv_bias, qk_norm=c.qk_norm, post_norms=c.post_norms)
  kinds = [k for k, v in _SWITCHES.items() if v == switches]
  if kinds == ["llama", "mistral"]:
    kinds = ["mistral"] if c.has_sliding else ["llama"]
  kind = kinds[0] if kinds else None
  gemma, later = kind in GEMMAS, kind in ("gemma2", "gemma3_text")
  problems = [
      kind is None,
      c.scale_embeddings != gemma,
      c.activation != ("gelu_tanh" if gemma else "silu"),
      not later and (c.query_pre_attn_scalar is not None or c.attn_logit_softcap is not None
                     or c.final_logit_softcap is not None),
      c.has_sliding and kind not in ("mistral", "gemma2", "gemma3_text"),
      kind == "mistral" and not all(c.sliding_layers),
      c.rope_local_theta is not None and c.has_sliding and kind != "gemma3_text",
      kind == "gemma3_text" and c.rope_scaling is not None and c.rope_local_theta is None,
  ]
  if any(problems):
    raise ValueError(f"config {c} matches none of the Hugging Face families {SUPPORTED}")
  return kind


def _int_if_whole(x: float) -> Any:
  """transformers types ``query_pre_attn_scalar`` as int (and rejects a float)."""
  return int(x) if float(x).is_integer() else float(x)


def config_to_hf(config: ModelConfig) -> dict:
  """The config.json dict that ``transformers`` needs to rebuild ``config`` (inverse of config_from_hf)."""
  c = config
  kind = family_of(c)
  gemma = kind in GEMMAS
  rope = {"rope_type": "default", "rope_theta": c.rope_theta}
  max_len = 8192
  if c.rope_scaling is not None:
    factor, low, high, old_len = c.rope_scaling
    rope.update(rope_type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                original_max_position_embeddings=old_len)
    max_len = int(old_len * factor)
  out = dict(
      architectures=[ARCHITECTURES[kind]], model_type=kind, vocab_size=c.vocab_size, hidden_size=c.embed_dim,
      intermediate_size=c.mlp_dim, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
      num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, hidden_act="gelu_pytorch_tanh" if gemma else "silu",
      rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, rope_parameters=rope, max_position_embeddings=max_len,
      tie_word_embeddings=c.tie_embeddings, dtype=c.param_dtype, torch_dtype=c.param_dtype)
  if kind in ("llama", "mistral", "qwen3", "gemma2", "gemma3_text"):
    out.update(attention_bias=False)
  if kind == "llama":
    out.update(mlp_bias=False)
  if kind in ("qwen2", "qwen3"):
    out.update(use_sliding_window=False, sliding_window=None)
  if kind == "mistral":
    out.update(sliding_window=c.sliding_window)
  if kind in ("gemma2", "gemma3_text"):
    types = ["sliding_attention" if s else "full_attention" for s in c.sliding_layers]
    out.update(hidden_activation="gelu_pytorch_tanh", layer_types=types,
               sliding_window=c.sliding_window or max_len, use_bidirectional_attention=False,
               query_pre_attn_scalar=_int_if_whole(c.query_pre_attn_scalar or c.head_dim),
               attn_logit_softcapping=c.attn_logit_softcap, final_logit_softcapping=c.final_logit_softcap)
  if kind == "gemma3_text":
    local = rope if c.rope_local_theta is None else {"rope_type": "default", "rope_theta": c.rope_local_theta}
    out.update(rope_parameters={"full_attention": rope, "sliding_attention": local},
               rope_local_base_freq=local["rope_theta"])
  return out
