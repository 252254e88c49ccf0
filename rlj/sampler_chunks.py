"""A rollout sampled in sequential chunks of prompts, so that sampling holds one chunk's KV cache.

The KV cache of a whole rollout grows with rows x (prompt + completion) tokens: Qwen2.5-7B, 4,096 rows of 16k
tokens on a v5p-64 needs 113.75 GiB of it per chip (``launch.aot``). ``ChunkedSampler`` samples the B prompts of a
step in ``chunks`` calls of B / chunks prompts each (G samples per prompt, as one call would), one after another:
every call is the same compiled program (one batch bucket), and the cache and sampler temporaries alive at once
are one chunk's. The rollout is the chunks' rollouts in prompt order (row b * G + g is still sample g of prompt b),
so groups, rewards and the updates do not change; chunk i draws with ``fold_in(rng, i)``.

Multi-process jobs: each process chunks its own prompts; the chunks' rows are joined per process on the host
(``rlj.host_data``: process p's rows stay on p's devices) instead of on device.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlj import host_data
from rlj.sampler_config import Rollout


class ChunkedSampler:
  """``inner.sample`` over ``chunks`` equal slices of the prompts (module docstring)."""

  def __init__(self, inner, chunks: int):
    if chunks < 1:
      raise ValueError(f"chunks must be >= 1, got {chunks}")
    self.inner, self.chunks = inner, int(chunks)

  def __getattr__(self, name):   # the wrapped sampler's attributes (config, mesh, programs, cache shapes)
    if name == "inner":
      raise AttributeError(name)
    return getattr(self.inner, name)

  def sample(self, params: Any, prompt_tokens, prompt_mask, rng: jax.Array) -> Rollout:
    """The ``Rollout`` of ``inner.sample`` on all B prompts, sampled B / chunks prompts at a time."""
    b = prompt_tokens.shape[0]
    if b % self.chunks:
      raise ValueError(f"sampler.chunks={self.chunks} does not divide the {b} prompts of a rollout")
    if self.chunks == 1:
      return self.inner.sample(params, prompt_tokens, prompt_mask, rng)
    size = b // self.chunks
    parts = [self.inner.sample(params, prompt_tokens[i * size:(i + 1) * size], prompt_mask[i * size:(i + 1) * size],
                               jax.random.fold_in(rng, i)) for i in range(self.chunks)]
    fields = [f for f in Rollout._fields if f != "num_steps"]
    num_steps = max(int(p.num_steps) for p in parts)
    if host_data.multiprocess():
      local = {f: np.concatenate([host_data.to_local(getattr(p, f)) for p in parts], axis=0) for f in fields}
      joined = host_data.to_global(local, self.inner.mesh, self.inner.rules)
      return Rollout(**joined, num_steps=jnp.int32(num_steps))
    rows = {f: jnp.concatenate([getattr(p, f) for p in parts], axis=0) for f in fields}
    return Rollout(**rows, num_steps=jnp.int32(num_steps))
