"""Teacher-forced per-token log-probabilities: dense, chunked over time, and vocab-parallel.

Every path computes, in float32,

  logp[n, t] = z[n, t, y[n, t]] - logsumexp_v z[n, t, v],    z = logits / temperature,

where ``logits[n, t]`` is the distribution that predicts ``targets[n, t]`` (already aligned: the shift is
done by ``completion_logprobs``). ``temperature`` is required and divides the *logits* (ALGORITHMS.md §1.2):
scaling log-probs by 1/temperature is a different, wrong quantity.

The chunked path scans over time blocks and never materialises a [N, T, V] log-softmax; with a callable
it also never materialises [N, T, V] logits. The vocab-parallel path runs under ``jax.shard_map`` with the
logits split over the vocabulary on one mesh axis: the local max is combined with ``pmax``, the sum of
exponentials with ``psum``, and the target logit with a masked ``psum``; the full logits are never
all-gathered (STYLE.md §4).
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from rlj import packing, sharding

LogitsFn = Callable[[jax.Array], jax.Array]


def check_temperature(temperature: Any) -> None:
  """Raises ``ValueError`` for a concrete temperature that is not strictly positive."""
  if temperature is None:
    raise ValueError("temperature is required (use 1.0 for the raw distribution)")
  if isinstance(temperature, (numbers.Number, np.ndarray, np.generic)):
    if not np.all(np.asarray(temperature) > 0):
      raise ValueError(f"temperature must be > 0, got {temperature}; greedy decoding is a sampler option")


def _scaled(logits: jax.Array, temperature) -> jax.Array:
  return logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)


def _logp_and_entropy(logits: jax.Array, targets: jax.Array, temperature) -> tuple[jax.Array, jax.Array]:
  """Dense log-prob of ``targets`` and entropy for one block: logits [N, C, V], targets [N, C]."""
  z = _scaled(logits, temperature)                                     # [N, C, V]
  lse = jax.nn.logsumexp(z, axis=-1)                                   # [N, C]
  target_z = jnp.take_along_axis(z, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  probs = jnp.exp(z - lse[..., None])
  entropy = lse - jnp.sum(probs * z, axis=-1)
  return target_z - lse, entropy


def _chunked(fn, xs: jax.Array, targets: jax.Array, chunk_size: int) -> tuple[jax.Array, jax.Array]:
  """Applies ``fn(x_chunk, target_chunk) -> (logp, entropy)`` over time blocks of ``chunk_size``.

  The time axis is padded up to a multiple of ``chunk_size`` (padding is dropped from the result) and
  the block body is rematerialised, so the backward pass keeps only one block's [N, C, V] at a time.
  """
  n, t = targets.shape
  num_chunks = -(-t // chunk_size)
  pad = num_chunks * chunk_size - t
  if pad:
    xs = jnp.pad(xs, [(0, 0), (0, pad)] + [(0, 0)] * (xs.ndim - 2))
    targets = jnp.pad(targets, [(0, 0), (0, pad)])
  # [num_chunks, N, C, ...] so that lax.map scans over blocks.
  xs_c = jnp.moveaxis(xs.reshape((n, num_chunks, chunk_size) + xs.shape[2:]), 1, 0)
  tg_c = jnp.moveaxis(targets.reshape(n, num_chunks, chunk_size), 1, 0)
  body = jax.checkpoint(lambda a: fn(*a))
  logp, ent = jax.lax.map(body, (xs_c, tg_c))                          # [num_chunks, N, C]
  logp = jnp.moveaxis(logp, 0, 1).reshape(n, -1)[:, :t]
  ent = jnp.moveaxis(ent, 0, 1).reshape(n, -1)[:, :t]
  return logp, ent


def token_logprobs_and_entropy(logits: jax.Array | LogitsFn, targets: jax.Array, *, temperature,
                               chunk_size: int | None = None,
                               inputs: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Per-token log-probs of ``targets`` and entropies of softmax(logits / temperature), in float32.

  Args:
    logits: [N, T, V] logits aligned with ``targets`` (``logits[:, t]`` predicts ``targets[:, t]``), or a
      callable mapping a block of ``inputs`` [N, C, ...] to logits [N, C, V] (e.g. final hidden states
      times the unembedding), so that full logits are never materialised.
    targets: [N, T] int token ids.
    temperature: sampling temperature (> 0), applied to the logits before the log-softmax.
    chunk_size: time block size C; ``None`` computes all T at once (required when ``logits`` is a
      callable, where ``None`` means one block). C need not divide T.
    inputs: [N, T, ...] the callable's inputs; only with a callable ``logits``.

  Returns:
    (logp [N, T], entropy [N, T]), both float32.
  """
  check_temperature(temperature)
  if targets.ndim != 2:
    raise ValueError(f"targets must be [N, T], got shape {targets.shape}")
  fn = lambda x, y: _logp_and_entropy(x, y, temperature)
  if callable(logits):
    if inputs is None:
      raise ValueError("a callable `logits` needs `inputs` [N, T, ...]")
    logits_fn = logits
    fn = lambda x, y: _logp_and_entropy(logits_fn(x), y, temperature)
    xs = inputs
    chunk_size = chunk_size or targets.shape[1]
  else:
    if logits.shape[:2] != targets.shape:
      raise ValueError(f"logits {logits.shape} and targets {targets.shape} disagree on [N, T]")
    xs = logits
    if chunk_size is None or chunk_size >= targets.shape[1]:
      return fn(xs, targets)
  return _chunked(fn, xs, targets, int(chunk_size))


def token_logprobs(logits: jax.Array | LogitsFn, targets: jax.Array, *, temperature,
                   chunk_size: int | None = None, inputs: jax.Array | None = None) -> jax.Array:
  """Teacher-forced log-probs logp[n, t] = log_softmax(logits[n, t] / temperature)[targets[n, t]].

  See ``token_logprobs_and_entropy`` for the arguments; XLA drops the unused entropy.

  Returns:
    logp: [N, T] float32.
  """
  return token_logprobs_and_entropy(logits, targets, temperature=temperature, chunk_size=chunk_size,
                                    inputs=inputs)[0]


def token_entropy(logits: jax.Array, *, temperature, chunk_size: int | None = None) -> jax.Array:
  """Entropy H[n, t] = -sum_v p log p of p = softmax(logits[n, t] / temperature), float32 [N, T]."""
  targets = jnp.zeros(logits.shape[:2], jnp.int32)
  return token_logprobs_and_entropy(logits, targets, temperature=temperature, chunk_size=chunk_size)[1]


# ----------------------------------------------------------------------------------------------------------
# Vocab-parallel path.
# ----------------------------------------------------------------------------------------------------------


def vocab_parallel_logprobs_local(local_logits: jax.Array, targets: jax.Array, *, temperature,
                                  axis_name: str) -> jax.Array:
  """Log-probs from one vocabulary shard; call inside ``shard_map`` over ``axis_name``.

  Shard i holds columns [i * V_local, (i + 1) * V_local) of the vocabulary.

    m = pmax(max_v z_local),  S = psum(sum_v exp(z_local - m)),  z_y = psum(z_local[y - offset] if owned),
    logp = z_y - m - log S.

  Args:
    local_logits: [N, T, V_local] this shard's logits.
    targets: [N, T] global token ids (replicated over ``axis_name``).
    temperature: > 0, divides the logits.
    axis_name: the mesh axis that splits the vocabulary.

  Returns:
    logp: [N, T] float32, identical on every shard of ``axis_name``.
  """
  z = _scaled(local_logits, temperature)                               # [N, T, V_local]
  v_local = z.shape[-1]
  # The max only stabilises the exponentials; it carries no gradient (it cancels exactly).
  m = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(z, axis=-1)), axis_name)   # [N, T]
  sum_exp = jax.lax.psum(jnp.sum(jnp.exp(z - m[..., None]), axis=-1), axis_name)
  offset = jax.lax.axis_index(axis_name) * v_local
  local_ids = targets.astype(jnp.int32) - offset
  owned = (local_ids >= 0) & (local_ids < v_local)
  picked = jnp.take_along_axis(z, jnp.clip(local_ids, 0, v_local - 1)[..., None], axis=-1)[..., 0]
  target_z = jax.lax.psum(jnp.where(owned, picked, 0.0), axis_name)
  return target_z - m - jnp.log(sum_exp)


def _batch_axes(mesh: Mesh, n: int, vocab_axis: str, rules) -> Any:
  """The mesh axes that split the batch (from the "batch" rule), or None when they do not divide N."""
  spec = sharding.logical_to_spec(("batch",), mesh, rules)
  axes = spec[0] if len(spec) else None
  if axes is None:
    return None
  axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
  axes_t = tuple(a for a in axes_t if a != vocab_axis)
  if not axes_t or n % int(np.prod([mesh.shape[a] for a in axes_t])):
    return None
  return axes_t if len(axes_t) > 1 else axes_t[0]


def vocab_parallel_token_logprobs(logits: jax.Array, targets: jax.Array, *, temperature, mesh: Mesh,
                                  vocab_axis: str = "tensor",
                                  rules=sharding.DEFAULT_RULES) -> jax.Array:
  """``token_logprobs`` with the vocabulary split over ``vocab_axis`` of ``mesh`` (no logits all-gather).

  The batch stays split as the "batch" rule says (over data/fsdp) when those axes divide N.

  Args:
    logits: [N, T, V] global logits; V must be divisible by the size of ``vocab_axis``.
    targets: [N, T] int token ids.
    temperature: > 0, divides the logits.
    mesh: the device mesh.
    vocab_axis: mesh axis holding the vocabulary shards.
    rules: logical-axis rules used to find the batch axes.

  Returns:
    logp: [N, T] float32, sharded like the batch.
  """
  check_temperature(temperature)
  if logits.shape[:2] != targets.shape:
    raise ValueError(f"logits {logits.shape} and targets {targets.shape} disagree on [N, T]")
  tp = mesh.shape[vocab_axis]
  if logits.shape[-1] % tp:
    raise ValueError(f"vocab {logits.shape[-1]} is not divisible by mesh axis {vocab_axis!r} of size {tp}")
  batch = _batch_axes(mesh, targets.shape[0], vocab_axis, rules)
  fn = jax.shard_map(
      lambda lg, tg: vocab_parallel_logprobs_local(lg, tg, temperature=temperature, axis_name=vocab_axis),
      mesh=mesh, in_specs=(P(batch, None, vocab_axis), P(batch, None)), out_specs=P(batch, None))
  return fn(logits, targets)


# ----------------------------------------------------------------------------------------------------------
# Model convenience.
# ----------------------------------------------------------------------------------------------------------


def positions_from_mask(attn_mask: jax.Array) -> jax.Array:
  """RoPE positions of a left-padded batch: max(cumsum(mask) - 1, 0), int32 [N, S]."""
  return jnp.maximum(jnp.cumsum(attn_mask.astype(jnp.int32), axis=-1) - 1, 0)


def as_variables(params: Any) -> dict:
  """Wraps a "params" collection as linen variables (a tree already holding {"params": ...} passes)."""
  if isinstance(params, dict) and set(params) == {"params"}:
    return params
  return {"params": params}


def completion_logprobs(apply_fn: Callable, params: Any, tokens: jax.Array, attn_mask: jax.Array,
                        prompt_len: int, *, temperature, chunk_size: int | None = None,
                        logits_window: bool = False, logits_chunk: int = 0) -> jax.Array:
  """Runs the model on prompt + completion and returns the completion tokens' log-probs.

  logp[:, t] = log_softmax(logits[:, P - 1 + t] / temperature)[tokens[:, P + t]]   (ALGORITHMS.md §1.1),

  with positions max(cumsum(attn_mask) - 1, 0), so left-padding does not change the result.

  Args:
    apply_fn: ``model.apply`` of a ``models.transformer.Transformer``:
      ``apply_fn(variables, tokens, positions, attn_mask) -> (logits [N, S, V], None)``.
    params: the model's "params" collection (or ``{"params": ...}``).
    tokens: [N, P + T] int32, left-padded prompt followed by the completion.
    attn_mask: [N, P + T] 1 on real tokens (prompt and completion), 0 on padding.
    prompt_len: P, the (padded) prompt width; a Python int.
    temperature: > 0, divides the logits.
    chunk_size: optional time block for the log-softmax.
    logits_window: ``apply_fn`` takes ``logits_at`` (a slice of positions) and projects only those to logits,
      as ``models.transformer.Transformer`` does: then only the T predicting positions [P - 1, P + T - 1) are
      projected, and the prompt's [N, P - 1, V] logits (and their share of the output matmul, forward and
      backward) are never computed. Same values as without it.
    logits_chunk: C > 0 (with ``logits_window``): the model's final hidden states [N, T, D] are projected to
      logits C positions at a time inside a rematerialised scan (``token_logprobs`` with a callable), so the
      forward and the backward pass hold [N, C, V] logits, never [N, T, V]; ``apply_fn`` is then a
      ``Transformer``'s apply (its ``features`` and ``logits`` methods). Same values.

  Returns:
    logp: [N, T] float32 (values on completion padding are meaningless; weight them with ``mask``).
  """
  check_temperature(temperature)
  p, s = int(prompt_len), tokens.shape[1]
  if not 1 <= p < s:
    raise ValueError(f"prompt_len {p} must be in [1, {s})")
  window = slice(p - 1, s - 1)
  if logits_chunk and logits_window:
    variables = as_variables(params)
    hidden = apply_fn(variables, tokens, positions_from_mask(attn_mask), attn_mask, method="features")[:, window]
    return token_logprobs(lambda h: apply_fn(variables, h, method="logits"), tokens[:, p:], temperature=temperature,
                          chunk_size=min(int(logits_chunk), s - p), inputs=hidden)
  extra = {"logits_at": window} if logits_window else {}
  out = apply_fn(as_variables(params), tokens, positions_from_mask(attn_mask), attn_mask, **extra)
  logits = out[0] if isinstance(out, tuple) else out                  # [N, P + T, V], or [N, T, V] if windowed
  if not logits_window:
    logits = logits[:, window]
  return token_logprobs(logits, tokens[:, p:], temperature=temperature, chunk_size=chunk_size)


def packed_completion_logprobs(apply_fn: Callable, params: Any, tokens: jax.Array, packed: dict, *,
                               temperature, logits_chunk: int = 0, mesh=None, rules=None) -> jax.Array:
  """``completion_logprobs`` of rows given packed (``rlj.packing.pack``): the same [N, T] log-probs.

  The model runs on the packed rows [K, S] with their segment ids and per-segment positions. Only the final
  hidden states that predict a trained completion token are gathered (``rlj.packing.unpack``, [G * m, D]) and
  projected to logits, so the output projection, forward and backward, never runs on a short completion's
  padding; their log-probs go back to [N, T] (``rlj.packing.to_rows``).

  Args:
    apply_fn: a ``models.transformer.Transformer``'s apply.
    params: its "params" collection (or ``{"params": ...}``).
    tokens: [N, P + T] the unpacked rows (only their shape is read: the targets are ``pack_targets``).
    packed: ``pack_tokens``, ``pack_segments``, ``pack_positions`` [K, S], ``pack_index``, ``pack_targets``
      [G * m] and ``pack_slot`` [N, T] (which gives the result its [N, T] layout).
    temperature: > 0, divides the logits.
    logits_chunk: C > 0: logits of at most N * C trained tokens at a time (as ``completion_logprobs`` holds
      [N, C, V]).
    mesh, rules: the mesh the gathers run on per batch shard.

  Returns:
    logp: [N, T] float32 (meaningless where the completion mask is 0).
  """
  check_temperature(temperature)
  variables = as_variables(params)
  seg = packed["pack_segments"]
  rows = tokens.shape[0]
  hidden = apply_fn(variables, packed["pack_tokens"], packed["pack_positions"], seg > 0, seg, method="features")
  hidden = packing.unpack(hidden, packed["pack_index"], rows=rows, mesh=mesh, rules=rules)     # [G * m, D]
  groups = packing.group_shards(mesh, rules, rows)
  hidden = hidden.reshape((groups, -1, hidden.shape[-1]))                                     # [G, m, D]
  targets = packed["pack_targets"].reshape((groups, -1))
  listed = targets.shape[1]
  per_chunk = max(1, int(logits_chunk) * rows // groups) if logits_chunk else listed
  logits_fn = lambda h: apply_fn(variables, h, method="logits")
  logp = token_logprobs(logits_fn, targets, temperature=temperature, chunk_size=min(per_chunk, listed),
                        inputs=hidden)
  return packing.to_rows(logp.reshape(-1), packed["pack_slot"], mesh=mesh, rules=rules)


def make_logp_fn(apply_fn, *, completion_len: int, temperature: float, mesh=None, rules=None,
                 num_chunks: int = 1, logits_chunk: int = 0):
  """``(params, tokens [N, P+T], attn_mask[, packed]) -> logp [N, T]`` with P taken from the tokens' width.

  ``apply_fn`` is a ``Transformer``'s apply: only the T positions that predict the completion are projected
  to logits (``logits_at``).

  ``packed`` (``rlj.packing.of(batch)``, built for ``num_chunks`` chunks by ``rlj.packing.packed_batch``): the
  model runs on the packed rows instead (``packed_completion_logprobs``); same values.

  With ``mesh`` (and ``rules``) the model's activation constraints apply (``sharding.activation_rules``), so
  the batch stays split over the batch axes through the logits instead of being gathered onto every device.

  ``num_chunks`` > 1 runs the rows in that many chunks one after another (``lax.map``; gcd(N, num_chunks) when
  it does not divide N), so the activations and [rows, T, V] logits alive at once are a chunk's: the trainer's
  rollout pass uses chunks of one optimizer micro-batch, whose forward and backward fit by construction.
  ``logits_chunk`` > 0 bounds the logits of those rows to [rows, logits_chunk, V] (``completion_logprobs``).
  """
  def fn(params, tokens, attn_mask, packed=None):
    with contextlib.ExitStack() as stack:
      if mesh is not None:
        stack.enter_context(sharding.activation_rules(mesh, sharding.DEFAULT_RULES if rules is None else rules))
      if packed is not None:
        return packed_completion_logprobs(apply_fn, params, tokens, packed,
                                          temperature=temperature, logits_chunk=logits_chunk, mesh=mesh, rules=rules)
      return completion_logprobs(apply_fn, params, tokens, attn_mask, tokens.shape[1] - completion_len,
                                 temperature=temperature, logits_window=True, logits_chunk=logits_chunk)

  if num_chunks < 1:
    raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
  if num_chunks == 1:
    return fn

  def chunked(params, tokens, attn_mask, packed=None):
    n = tokens.shape[0]
    k = chunk_count(n, num_chunks)
    if k == 1:
      return fn(params, tokens, attn_mask, packed)
    split = lambda x: _rows_sharded(x.reshape((k, x.shape[0] // k) + x.shape[1:]), 1)   # chunks over every device
    xs = (split(tokens), split(attn_mask), None if packed is None else {key: split(v) for key, v in packed.items()})
    out = jax.lax.map(lambda a: fn(params, *a), xs)
    return _rows_sharded(out.reshape((n,) + out.shape[2:]), 0)

  def _rows_sharded(x, axis):
    if mesh is None:
      return x
    names = (None,) * axis + ("batch",) + (None,) * (x.ndim - axis - 1)
    return jax.lax.with_sharding_constraint(   # replicated where the batch shards do not divide
        x, sharding.fitted_sharding(names, x.shape, mesh, sharding.DEFAULT_RULES if rules is None else rules))
  return chunked


def chunk_count(rows: int, num_chunks: int) -> int:
  """Row chunks the log-prob pass runs ``rows`` rows in: gcd(rows, num_chunks)."""
  return math.gcd(rows, max(int(num_chunks), 1))
