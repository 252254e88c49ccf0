"""Compiled rollout sampler: prefill of left-padded prompts, then a ``lax.while_loop`` decode with a KV cache.

One call of ``Sampler.sample`` runs one compiled program per (batch, prompt length) *bucket*: prompts are
left-padded to the smallest configured prompt bucket and the batch to the smallest batch bucket, so prompt
lengths inside a bucket reuse the program. Each prompt is prefilled once and its cache placed G =
``num_samples`` times (row b·G + g is sample g of prompt b). Every decode step t draws with ``fold_in(rng, t)``
from

  q(· | prefix) ∝ exp(logits / temperature) on the top-k / top-p set   (``rlj.sampling_filters``)

and records log q(token), so with ``top_k=0, top_p=1`` the returned ``logp`` equals the teacher-forced
``rlj.logprobs.completion_logprobs`` of the same tokens and the trainer's first ratio is exactly 1. A row
finishes at its first EOS or stop token (which the mask includes); the loop ends when every row has finished
or after ``max_new_tokens`` steps. The KV cache is an argument of the program and is donated to it; with
``cache_phases`` > 1 the first phases decode over shorter caches of their own (``Sampler.phase_ends``).

Usage:
  sampler = Sampler(model, SamplerConfig(max_new_tokens=256, num_samples=8, eos_id=1,
                                         prompt_buckets=(128, 256), batch_buckets=(32,)), mesh=mesh)
  rollout = sampler.sample(params, prompt_tokens, prompt_mask, rng)   # rollout.tokens [B*G, P+T]
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models import kv_cache
from models.config import ModelConfig
from models import decode as decode_lib
from rlj import host_data, logprobs, sampling_filters, sharding
from rlj.buckets import pick_bucket
from rlj.sampler_config import PHASE_STEPS, Rollout, SamplerConfig, TurnCache, finish_rollout


class LoopState(NamedTuple):
  step: jax.Array          # int32 scalar
  cache: Any               # KVCache
  logits: jax.Array        # [N, V] logits of the next token
  positions: jax.Array     # [N] RoPE position of the next token
  done: jax.Array          # [N] bool, row has emitted its stop token
  tokens: jax.Array        # [N, T]
  logp: jax.Array          # [N, T]
  mask: jax.Array          # [N, T] bool


class Sampler:
  """Holds one compiled sampling program per (batch, prompt-length) bucket.

  Args:
    model: a ``models.transformer.Transformer`` (anything with its ``apply`` contract and a ``config``).
    config: a ``SamplerConfig``.
    mesh: optional device mesh; rows are split over the "batch" rule's axes (data/fsdp), the cache's
      KV heads over the "kv_heads" rule (tensor), the parameters as ``param_shardings`` says.
    param_shardings: NamedShardings of the "params" collection; by default derived from the model's
      logical axis names with ``rules``.
    rules: logical-axis rules.
  """

  def __init__(self, model: nn.Module, config: SamplerConfig, mesh: Optional[Mesh] = None,
               param_shardings: Any = None, rules=sharding.DEFAULT_RULES):
    self.model = model
    self.config = config
    self.mesh = mesh
    self.rules = tuple(rules)
    self._param_shardings = param_shardings
    self._programs: dict[tuple[int, int], Any] = {}
    self._caches: dict[tuple[int, int], Any] = {}
    self._cache_inits: dict[tuple[int, int], Any] = {}
    self.num_traces = 0  # how many times a sampling program was traced (one per bucket)

  # --------------------------------------------------------------------------------------------------------
  # Shardings.
  # --------------------------------------------------------------------------------------------------------

  def _replicated(self):
    return NamedSharding(self.mesh, P()) if self.mesh is not None else None

  def _row_sharding(self, ndim: int, rows: int):
    if self.mesh is None:
      return None
    return sharding.fitted_sharding(("batch",) + (None,) * (ndim - 1), (rows,) + (1,) * (ndim - 1), self.mesh,
                                    self.rules)

  def cache_shardings(self, abstract_cache):
    """NamedShardings of a KV cache laid out for ``decode_model`` (None without a mesh)."""
    if self.mesh is None:
      return None
    names = jax.tree.map(lambda n: P(*n), kv_cache.logical_axes(self.decode_model.config),
                         is_leaf=lambda x: isinstance(x, tuple)
                         and all(isinstance(a, str) for a in x))
    return sharding.tree_shardings(names, abstract_cache, self.mesh, self.rules)

  def param_shardings(self):
    """NamedShardings of the "params" collection (given, or from the model's logical axis names)."""
    if self.mesh is None:
      return None
    if self._param_shardings is None:
      dummy = jnp.zeros((1, 1), jnp.int32)
      boxed = jax.eval_shape(lambda: self.model.init(jax.random.key(0), dummy, dummy, dummy + 1))["params"]
      self._param_shardings = sharding.tree_shardings(sharding.logical_specs(boxed), nn.unbox(boxed),
                                                      self.mesh, self.rules)
    return self._param_shardings

  # --------------------------------------------------------------------------------------------------------
  # The compiled program.
  # --------------------------------------------------------------------------------------------------------

  def apply_model(self, model, params, tokens, positions, mask, cache, **kwargs):
    """``model.apply`` of one prefill or decode call under the sampler's activation sharding rules."""
    rules = contextlib.nullcontext() if self.mesh is None else sharding.activation_rules(self.mesh, self.rules)
    with rules:
      return model.apply({"params": params}, tokens, positions, mask, cache=cache, **kwargs)

  def _on_cpu(self) -> bool:
    devices = self.mesh.devices.flat if self.mesh is not None else jax.devices()
    return next(iter(devices)).platform == "cpu"

  @functools.cached_property
  def decode_model(self) -> nn.Module:
    """The module the program prefills and decodes with; its config also lays out the KV cache.

    With ``unrolled_decode`` (by default on CPU) a ``Transformer`` becomes its decode copy
    (``models.decode.decode_config``: unscanned, untied, slots-last keys); ``decode_params`` converts the
    weights once per call, inside the program and outside the decode loop. Same values. TPU and GPU matmuls can
    read stacked and tied operands where they lie; the decode copy is unmeasured there and so not the default.
    """
    mc = getattr(self.model, "config", None)
    unroll = self.config.unrolled_decode
    if unroll is None:
      unroll = self._on_cpu()
    if not unroll or not isinstance(mc, ModelConfig):
      return self.model
    return self.model.clone(config=decode_lib.decode_config(mc))

  def decode_params(self, params):
    """``params`` of ``self.model`` converted for ``decode_model`` (traced inside the program)."""
    if self.decode_model is self.model:
      return params
    params = decode_lib.decode_params(params, self.model.config, self.decode_model.config)
    # Materialised here, once: not folded back into the loop's matmuls as a slice or transpose per step.
    return jax.lax.optimization_barrier(params)

  def phase_ends(self) -> tuple[int, ...]:
    """Decode steps at which each cache phase ends (``cache_phases``): phase k runs the forward passes of steps
    [t_{k-1}, t_k) over a cache of prompt + t_k slots, ending at T - 1 (the last token needs no pass).
    Boundaries are rounded up to multiples of 16 steps; () when T = 1."""
    passes, n = self.config.max_new_tokens - 1, self.num_cache_phases
    up16 = lambda x: -(-x // 16) * 16
    ends = {min(passes, up16(-(-k * passes // n))) for k in range(1, n)} | {passes}
    return tuple(sorted(ends - {0}))

  @property
  def num_cache_phases(self) -> int:
    """``cache_phases``, or by default on CPU one phase per 64 decode steps (at most 8), elsewhere 1."""
    if self.config.cache_phases is not None:
      return self.config.cache_phases
    if not self._on_cpu():
      return 1
    return min(8, max(1, -(-(self.config.max_new_tokens - 1) // PHASE_STEPS)))

  def _constrain_cache(self, cache):
    if self.mesh is None:
      return cache
    return jax.lax.with_sharding_constraint(cache, self.cache_shardings(cache))

  def step_fns(self, model, params, n: int, rng):
    """``(emit, body)`` of the decode loop over n rows: ``emit`` samples token ``s.step`` from ``s.logits`` with
    ``fold_in(rng, s.step)`` and writes it (finished rows get padding); ``body`` is ``emit`` then the forward pass
    of the new token over the cache."""
    c = self.config
    stop = jnp.asarray(c.stop_set or (-1,), jnp.int32)

    def emit(s: LoopState) -> tuple[LoopState, jax.Array]:
      """Samples token ``s.step`` from ``s.logits`` and writes it; finished rows get padding."""
      key = jax.random.fold_in(rng, s.step)
      tok, lp = sampling_filters.sample_token(key, s.logits, temperature=c.temperature, top_k=c.top_k,
                                              top_p=c.top_p, greedy=c.greedy)
      live = ~s.done
      tok = jnp.where(live, tok, c.pad_id)
      lp = jnp.where(live, lp, 0.0)
      write = lambda buf, x: jax.lax.dynamic_update_slice(buf, x[:, None].astype(buf.dtype), (0, s.step))
      done = s.done | (live & jnp.any(tok[:, None] == stop[None, :], axis=-1))
      return s._replace(step=s.step + 1, done=done, tokens=write(s.tokens, tok), logp=write(s.logp, lp),
                        mask=write(s.mask, live)), tok

    def body(s: LoopState):
      out, tok = emit(s)
      next_logits, cache = self.apply_model(model, params, tok[:, None], s.positions[:, None],
                                            jnp.ones((n, 1), jnp.int32), s.cache)
      return out._replace(cache=cache, logits=next_logits[:, 0], positions=s.positions + 1)

    return emit, body

  def _generate(self, params, prompt, prompt_mask, rng, cache):
    """prompt [Bb, Pb] -> completion arrays for N = Bb * G rows (traced once per bucket).

    The Bb prompts are prefilled once, into a cache of Bb rows and Pb slots; each is then placed G times into
    the cache the decode loop runs on (its first phase's, or the donated buffer), with its last logits.
    """
    self.num_traces += 1
    c = self.config
    g, t_max = c.num_samples, c.max_new_tokens
    b, pb = prompt.shape
    n = b * g
    prompt_mask = prompt_mask.astype(jnp.int32)
    model, params = self.decode_model, self.decode_params(params)
    prefix = self._constrain_cache(self.cache_buffer(b, pb))
    logits, prefix = self.apply_model(model, params, prompt, logprobs.positions_from_mask(prompt_mask),
                                      prompt_mask, prefix, logits_at=slice(-1, None))   # prefill
    prompt = jnp.repeat(prompt, g, axis=0)                             # [N, Pb], row b * G + g
    prompt_mask = jnp.repeat(prompt_mask, g, axis=0)
    logits = jnp.repeat(logits[:, -1], g, axis=0)
    if self.mesh is not None:
      prompt, prompt_mask, logits = (jax.lax.with_sharding_constraint(x, self._row_sharding(2, n))
                                     for x in (prompt, prompt_mask, logits))
    emit, body = self.step_fns(model, params, n, rng)
    s = LoopState(step=jnp.zeros((), jnp.int32), cache=None, logits=logits,
                   positions=jnp.sum(prompt_mask, axis=-1), done=jnp.zeros((n,), jnp.bool_),
                   tokens=jnp.full((n, t_max), c.pad_id, jnp.int32), logp=jnp.zeros((n, t_max), jnp.float32),
                   mask=jnp.zeros((n, t_max), jnp.bool_))
    # Phase k decodes steps [t_{k-1}, t_k) over prompt + t_k slots; the last phase over the donated buffer.
    ends = self.phase_ends() or (0,)
    buffers = [self.cache_buffer(n, pb + e) for e in ends[:-1]] + [cache]
    src, repeats = prefix, g
    for end, buf in zip(ends, buffers):
      s = s._replace(cache=self._constrain_cache(kv_cache.place(buf, src, repeats)))
      s = jax.lax.while_loop(lambda s, end=end: (s.step < end) & ~jnp.all(s.done), body, s)
      src, repeats = s.cache, 1
    # The last token needs no forward pass after it: sampled outside the loop, which made T - 1 of them.
    # If every row had already stopped, it writes padding where padding was and is not counted as a step.
    last, _ = emit(s)
    steps = jnp.where(jnp.all(s.done), s.step, last.step)
    return last.tokens, last.logp, last.mask, prompt, prompt_mask, steps, s.cache

  def cache_buffer(self, rows: int, slots: int) -> kv_cache.KVCache:
    """An empty KV cache laid out for ``decode_model`` (traced)."""
    return kv_cache.init_cache(self.decode_model.config, rows, slots, self.config.cache_dtype)

  def empty_cache(self, rows: int, prompt_len: int) -> kv_cache.KVCache:
    """An empty KV cache of a bucket's ``rows`` and padded ``prompt_len``, laid out for ``decode_model``
    (traced: under ``jax.eval_shape`` or ``jax.jit``)."""
    return self.cache_buffer(rows, prompt_len + self.config.max_new_tokens)

  def _new_cache(self, rows: int, prompt_len: int):
    """A fresh cache for the bucket, from a jitted initialiser built once per bucket."""
    key = (rows, prompt_len)
    if key not in self._cache_inits:
      make = functools.partial(self.empty_cache, rows, prompt_len)
      self._cache_inits[key] = jax.jit(make, out_shardings=self.cache_shardings(jax.eval_shape(make)))
    return self._cache_inits[key]()

  def program(self, batch: int, prompt_len: int):
    """The jitted program of bucket (batch, prompt_len) (padded sizes), built once."""
    key = (batch, prompt_len)
    if key not in self._programs:
      rows = batch * self.config.num_samples
      abstract_cache = jax.eval_shape(functools.partial(self.empty_cache, rows, prompt_len))
      kwargs = {}
      if self.mesh is not None:
        cs = self.cache_shardings(abstract_cache)
        rep, r2 = self._replicated(), self._row_sharding(2, rows)
        pr = self._row_sharding(2, batch)
        kwargs = dict(in_shardings=(self.param_shardings(), pr, pr, rep, cs),
                      out_shardings=(r2, r2, r2, r2, r2, rep, cs))
      self._programs[key] = jax.jit(self._generate, donate_argnums=(4,), **kwargs)
    return self._programs[key]

  def sample(self, params: Any, prompt_tokens, prompt_mask, rng: jax.Array, *,
             return_cache: bool = False) -> Rollout | tuple[Rollout, TurnCache]:
    """Samples G completions for each of B left-padded prompts.

    Args:
      params: the model's "params" collection (or ``{"params": ...}``), e.g. from
        ``rlj.sharding.sync_weights``.
      prompt_tokens: [B, P] int32, left-padded.
      prompt_mask: [B, P] 1 on prompt tokens, 0 on padding.
      rng: PRNG key; step t draws with ``fold_in(rng, t)``.

    Returns:
      A ``Rollout`` with N = B * G rows and P + T columns; with ``return_cache`` also the KV cache the call left
      (``rlj.sampler_config.TurnCache``: its row r is the rollout's row r; not kept for the next call), from which
      ``rlj.turn_sampler.TurnSampler`` continues the rows.

    Multi-process jobs: each process passes its own B_local prompts; the rollout holds the global batch of
    B = B_local * process_count prompts (process p's prompts are those on its devices; read them with
    ``rlj.host_data.to_local``), padded to the widest process's prompt width.
    """
    params = logprobs.as_variables(params)["params"]
    prompt_tokens = np.asarray(prompt_tokens, np.int32)
    prompt_mask = np.asarray(prompt_mask, np.int32)
    b_local, p_local = prompt_tokens.shape
    b, p = self._global_shape(b_local, p_local)
    bb = pick_bucket(b, self.config.batch_buckets, "batch")
    pb = pick_bucket(p, self.config.prompt_buckets, "prompt length")
    if b != b_local and bb != b:
      raise ValueError(f"multi-process sampling takes whole batches: the global batch {b} must equal a batch "
                       f"bucket (batch_buckets={self.config.batch_buckets}); use batch_buckets=() or add {b}")
    # Left-pad the prompt width to the bucket; pad the batch with copies of row 0 (dropped afterwards).
    tok = np.full((bb - b + b_local, pb), self.config.pad_id, np.int32)
    msk = np.zeros_like(tok)
    tok[:b_local, pb - p_local:], msk[:b_local, pb - p_local:] = prompt_tokens, prompt_mask
    tok[b_local:], msk[b_local:] = tok[0], msk[0]
    if b != b_local:  # this process's prompt rows -> rows of one global batch
      placed = host_data.to_global({"tok": tok, "msk": msk}, self.mesh, self.rules)
      tok, msk = placed["tok"], placed["msk"]

    key = (bb, pb)
    fn = self.program(bb, pb)
    cache = self._caches.pop(key, None)
    if cache is None:
      cache = self._new_cache(bb * self.config.num_samples, pb)
    if self.mesh is None:
      out = fn(params, tok, msk, rng, cache)
    else:
      with jax.set_mesh(self.mesh):
        out = fn(params, tok, msk, rng, cache)
    completion, logp, mask, prompt_rep, mask_rep, steps, cache = out
    if self.config.keep_cache and not return_cache:
      self._caches[key] = cache
    ro = finish_rollout(completion, logp, mask, prompt_rep, mask_rep, steps, rows=b * self.config.num_samples,
                        pad_cols=pb - p)
    if not return_cache:
      return ro
    return ro, TurnCache(cache, start=pb, index=int(jax.device_get(cache.index)))

  def _global_shape(self, b_local: int, p_local: int) -> tuple[int, int]:
    """(prompts, prompt width) of the global batch: with several processes, each holds ``b_local`` of the
    prompts, and all must pad to one width (the widest process's)."""
    n = jax.process_count()
    if n == 1:
      return b_local, p_local
    if self.mesh is None:
      raise ValueError("a multi-process job samples on a mesh over every process's devices; pass mesh=")
    return b_local * n, host_data.process_max(p_local)

  def release_caches(self) -> None:
    """Drops the KV caches kept between calls (``keep_cache=True``)."""
    self._caches.clear()
