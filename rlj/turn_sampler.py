"""Continuing trajectories from their KV cache: the next turn prefills only the tokens its cache lacks.

A multi-turn rollout (``rlj.agents.rollout``) can sample turn k + 1 of each trajectory in two ways: re-prefill the
whole conversation as a new prompt (``Sampler.sample``), or keep the KV cache the previous call left and prefill
only what is new since then (the observation, and the previous turn's last token when the decode loop ended before
its forward pass). ``TurnSampler.next_turn`` does the latter in one compiled program per (rows, slots, chunk width):

1. gather the continuing rows of the previous call's cache and place them into a cache of ``max_slots`` slots;
2. mask each row's slots after its last real token (the decode loop kept writing padding for rows that had
   stopped);
3. prefill each row's new tokens (left-padded to the chunk width, padding masked) at the next slots, with RoPE
   positions that continue the row's own;
4. decode up to ``max_new_tokens`` exactly as ``Sampler`` does (``Sampler.step_fns``).

A row's tokens then lie in its cache at their positions, with masked gaps between turns; attention (causal over
slots, keys masked) sees exactly the row's conversation, so log-probs equal the teacher-forced ones of the
concatenated trajectory. Sliding-window layers count slots, not positions, so a model with them cannot continue
this way (``supported``). A turn that would not fit in ``max_slots`` is for the caller to re-prefill.
"""
from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

from models import kv_cache
from rlj import logprobs, sampler as sampler_lib
from rlj.buckets import pick_bucket
from rlj.sampler_config import TurnCache


def row_keep(cache: TurnCache, lengths: np.ndarray) -> np.ndarray:
  """[N] the slot after each row's last cached token: ``start`` + the row's length, at most ``index``."""
  return np.minimum(cache.start + np.asarray(lengths, np.int64), cache.index)


class TurnSampler:
  """Continues trajectories from a ``TurnCache`` (module docstring).

  Args:
    sampler: a ``Sampler`` with one sample per row; its model, config (``max_new_tokens``, stop ids, temperature,
      ``batch_buckets``) and mesh are used.
    max_slots: the continued cache's slots (a turn that needs more is not continued).
    chunk_buckets: widths the new tokens of a turn are left-padded to.
  """

  def __init__(self, sampler: sampler_lib.Sampler, *, max_slots: int, chunk_buckets: tuple[int, ...]):
    if sampler.config.num_samples != 1:
      raise ValueError("continuing turns take one sample per row")
    self.sampler, self.max_slots, self.chunk_buckets = sampler, int(max_slots), tuple(chunk_buckets)
    self._programs: dict = {}

  @property
  def config(self):
    return self.sampler.config

  @staticmethod
  def supported(model) -> bool:
    """Whether ``model`` can continue from a cache with gaps: no sliding-window layers."""
    types = getattr(getattr(model, "config", None), "layer_types", None)
    return not types or all(t == "full" for t in types)

  def fits(self, cache: TurnCache, chunk_len: int) -> bool:
    """Whether a turn with ``chunk_len`` new tokens fits a chunk bucket and, after ``cache.index``, ``max_slots``."""
    if chunk_len > max(self.chunk_buckets):
      return False
    width = pick_bucket(max(chunk_len, 1), self.chunk_buckets, "chunk")
    return cache.index + width + self.config.max_new_tokens <= self.max_slots

  def _continue(self, params, cache, rows, keep, chunk, chunk_mask, positions, rng):
    s_ = self.sampler
    c = s_.config
    n = rows.shape[0]
    model, params = s_.decode_model, s_.decode_params(params)
    batch_axis = 0 if isinstance(cache.k, tuple) else 1
    take = lambda x: jnp.take(x, rows, axis=batch_axis)   # noqa: E731
    slot = jnp.arange(cache.key_mask.shape[1], dtype=jnp.int32)[None, :]
    stale = (slot >= keep[:, None]) & (slot < cache.index)
    src = kv_cache.KVCache(k=jax.tree.map(take, cache.k), v=jax.tree.map(take, cache.v),
                           key_mask=jnp.take(cache.key_mask, rows, axis=0) & ~stale, index=cache.index)
    cache = s_._constrain_cache(kv_cache.place(s_.cache_buffer(n, self.max_slots), src))
    chunk_mask = chunk_mask.astype(jnp.int32)
    pos = positions[:, None] + jnp.maximum(jnp.cumsum(chunk_mask, axis=1) - 1, 0)
    logits, cache = s_.apply_model(model, params, chunk, pos, chunk_mask, cache, logits_at=slice(-1, None))
    emit, body = s_.step_fns(model, params, n, rng)
    t_max = c.max_new_tokens
    st = sampler_lib.LoopState(
        step=jnp.zeros((), jnp.int32), cache=cache, logits=logits[:, -1],
        positions=positions + jnp.sum(chunk_mask, axis=1), done=jnp.zeros((n,), jnp.bool_),
        tokens=jnp.full((n, t_max), c.pad_id, jnp.int32), logp=jnp.zeros((n, t_max), jnp.float32),
        mask=jnp.zeros((n, t_max), jnp.bool_))
    st = jax.lax.while_loop(lambda s: (s.step < t_max - 1) & ~jnp.all(s.done), body, st)
    last, _ = emit(st)
    return last.tokens, last.logp, last.mask, st.cache

  def _program(self, rows_in: int, slots_in: int, rows: int, width: int):
    key = (rows_in, slots_in, rows, width)
    if key not in self._programs:
      s_ = self.sampler
      kwargs = {}
      if s_.mesh is not None:
        c_in = s_.cache_shardings(jax.eval_shape(functools.partial(s_.cache_buffer, rows_in, slots_in)))
        c_out = s_.cache_shardings(jax.eval_shape(functools.partial(s_.cache_buffer, rows, self.max_slots)))
        r1, r2, rep = s_._row_sharding(1, rows), s_._row_sharding(2, rows), s_._replicated()
        kwargs = dict(in_shardings=(s_.param_shardings(), c_in, rep, rep, r2, r2, r1, rep),
                      out_shardings=(r2, r2, r2, c_out))
      self._programs[key] = jax.jit(self._continue, **kwargs)
    return self._programs[key]

  def next_turn(self, params, cache: TurnCache, rows: np.ndarray, keep: np.ndarray, chunks: list,
                positions: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray, TurnCache]:
    """Samples the next turn of the trajectories in ``rows`` of ``cache``.

    Args:
      params: the model's "params".
      cache: the previous call's ``TurnCache``.
      rows: [n] rows of ``cache`` that continue (in this call's row order).
      keep: [n] each row's slot after its last cached token (``row_keep``).
      chunks: n lists of new token ids (what each row's cache lacks, observation included; each non-empty).
      positions: [n] the RoPE position of each chunk's first token (the row's tokens so far).
      rng: PRNG key; step t draws with ``fold_in(rng, t)``.

    Returns:
      ``(completion [n, T], logp [n, T], mask [n, T], TurnCache of this call)`` as numpy arrays (the cache on
      device), rows padded to the sampler's batch bucket in the cache only.
    """
    params = logprobs.as_variables(params)["params"]
    n = len(rows)
    nb = pick_bucket(n, self.config.batch_buckets, "batch")
    width = pick_bucket(max(len(ch) for ch in chunks), self.chunk_buckets, "chunk")
    pad = lambda x, fill: np.concatenate([x, np.full((nb - n,) + x.shape[1:], fill, x.dtype)])   # noqa: E731
    chunk = np.full((n, width), self.config.pad_id, np.int32)
    chunk_mask = np.zeros((n, width), np.int32)
    for i, ch in enumerate(chunks):
      chunk[i, width - len(ch):], chunk_mask[i, width - len(ch):] = ch, 1
    args = (pad(np.asarray(rows, np.int32), 0), pad(np.asarray(keep, np.int32), 0), pad(chunk, self.config.pad_id),
            pad(chunk_mask, 0), pad(np.asarray(positions, np.int32), 0))
    rows_in, slots_in = cache.cache.key_mask.shape
    fn = self._program(rows_in, slots_in, nb, width)
    with jax.set_mesh(self.sampler.mesh) if self.sampler.mesh is not None else contextlib.nullcontext():
      tokens, logp, mask, new = fn(params, cache.cache, *args, rng)
    start = cache.index + width
    out = jax.device_get((tokens, logp, mask, new.index))
    return (out[0][:n], out[1][:n], out[2][:n].astype(np.float32), TurnCache(new, start=start, index=int(out[3])))

