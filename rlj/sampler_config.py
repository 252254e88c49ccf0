"""The sampler's configuration, its results (``Rollout``, ``TurnCache``) and shape buckets (see ``rlj.sampler``)."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from rlj import logprobs


# Decode steps per KV-cache phase on CPU (``SamplerConfig.cache_phases``). small-50m, 32 rows, 128 + 512
# tokens (``python -m launch.bench --case sampler --model small-50m --seq 128 --new_tokens 512
# --cache_phases N``), seconds per call: one phase 17.9-20.9 over five runs, 4 phases (128 steps each) 15.1
# in one, 8 phases (64 each) 14.4-18.7 over five. At 32 + 64 tokens 4 phases of 16 steps cost 0.1 s more
# than one (1.57-1.59 vs 1.42-1.50 s): a phase costs about 30 ms.
PHASE_STEPS = 64


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Decoding hyperparameters and shape buckets.

  Attributes:
    max_new_tokens: T, the completion width (the loop stops earlier once every row has finished).
    temperature: > 0, divides the logits (also for ``greedy``, where it only affects the log-probs).
    top_k: keep the k most likely tokens (0: all).
    top_p: nucleus mass (1.0: all).
    greedy: argmax decoding.
    num_samples: G completions per prompt.
    eos_id: end-of-sequence id, or None.
    stop_ids: further ids that end a completion (included in its mask, like EOS).
    pad_id: written into completion slots after a row has finished.
    prompt_buckets: allowed padded prompt widths (ascending); () uses each call's own width.
    batch_buckets: allowed padded prompt counts B (ascending); () uses each call's own B.
    cache_dtype: KV cache dtype name, or None for the model's compute dtype.
    keep_cache: keep each bucket's (donated, returned) cache buffer between calls instead of
      allocating a fresh one per call; saves the allocation, costs its memory while not sampling.
    unrolled_decode: prefill and decode with an unscanned, untied copy of a ``Transformer``: each layer's
      weights and KV cache in arrays of their own and a tied table transposed to an ``lm_head``, made once per
      call inside the program (one more copy of the weights in memory while it runs). None: on CPU only,
      where it was measured to pay (``Sampler.decode_model``).
    cache_phases: decode in this many phases, each attending over a KV cache only as long as its last step
      needs (prompt + t_k slots, ``Sampler.phase_ends``); the last phase uses the full, donated buffer.
      Early steps then read fewer empty slots, for one copy of the cache per phase. None: one phase per
      64 steps (at most 8) on CPU, where it was measured to pay (``PHASE_STEPS``), else 1.
  """
  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  num_samples: int = 1
  eos_id: Optional[int] = None
  stop_ids: tuple[int, ...] = ()
  pad_id: int = 0
  prompt_buckets: tuple[int, ...] = ()
  batch_buckets: tuple[int, ...] = ()
  cache_dtype: Optional[str] = None
  keep_cache: bool = False
  unrolled_decode: Optional[bool] = None
  cache_phases: Optional[int] = None

  def __post_init__(self):
    logprobs.check_temperature(self.temperature)
    if self.max_new_tokens < 1 or self.num_samples < 1:
      raise ValueError("max_new_tokens and num_samples must be >= 1")
    if self.cache_phases is not None and self.cache_phases < 1:
      raise ValueError(f"cache_phases must be >= 1 or None, got {self.cache_phases}")
    for name in ("prompt_buckets", "batch_buckets"):
      b = tuple(getattr(self, name))
      if list(b) != sorted(b) or any(x < 1 for x in b):
        raise ValueError(f"{name} must be ascending positive ints, got {b}")

  @property
  def stop_set(self) -> tuple[int, ...]:
    return tuple(sorted(set(self.stop_ids) | ({self.eos_id} if self.eos_id is not None else set())))


class Rollout(NamedTuple):
  """Sampled completions; N = B * G rows, row b * G + g is sample g of prompt b.

  Attributes:
    tokens: [N, P + T] int32 prompt (as given, left-padded) followed by the completion.
    completion: [N, T] int32 sampled ids (``pad_id`` after a row finished).
    logp: [N, T] float32 log q(token) under the sampling distribution; 0 where ``mask`` is 0.
    mask: [N, T] float32, 1 on completion tokens up to and including the first EOS / stop token.
    lengths: [N] int32 completion lengths (sum of ``mask``).
    prompt_mask: [N, P] the prompt mask, repeated G times.
    attn_mask: [N, P + T] prompt_mask followed by mask (for teacher-forced scoring).
    num_steps: int32 scalar, tokens drawn per row by the longest row (< T when every row stopped early).
  """
  tokens: jax.Array
  completion: jax.Array
  logp: jax.Array
  mask: jax.Array
  lengths: jax.Array
  prompt_mask: jax.Array
  attn_mask: jax.Array
  num_steps: jax.Array


class TurnCache(NamedTuple):
  """The KV cache a sampling call left (``Sampler.sample(return_cache=True)``), where its decode began
  (``start``) and ended (``index``: the slot after the last token that went through a forward pass); row r of the
  cache is row r of that call. ``rlj.turn_sampler.TurnSampler`` continues rows from it."""
  cache: Any
  start: int
  index: int


@functools.partial(jax.jit, static_argnames=("rows", "pad_cols"))
def finish_rollout(completion, logp, mask, prompt, prompt_mask, steps, *, rows: int, pad_cols: int) -> Rollout:
  """Drops the bucket's padding rows and prompt columns and assembles the ``Rollout``."""
  completion, logp, mask = completion[:rows], logp[:rows], mask[:rows].astype(jnp.float32)
  prompt, prompt_mask = prompt[:rows, pad_cols:], prompt_mask[:rows, pad_cols:]
  return Rollout(tokens=jnp.concatenate([prompt, completion], axis=1), completion=completion, logp=logp,
                 mask=mask, lengths=jnp.sum(mask, axis=1).astype(jnp.int32), prompt_mask=prompt_mask,
                 attn_mask=jnp.concatenate([prompt_mask, mask.astype(jnp.int32)], axis=1), num_steps=steps)
