"""Reward model: the shared decoder backbone, pooled at the last real token, under a BT or IQN head.

  psi(x) = Transformer.features(tokens)[b, last(b)],  last(b) = the largest s with mask[b, s] = 1,
  r(x) = BTHead(psi(x))  [B]     or     q(x, tau) = IQNHead(psi(x), tau)  [B, N].

The last real token is found from the mask, so left- and right-padded rows give the same score; RoPE positions
are ``max(cumsum(mask) - 1, 0)``, which makes them independent of left padding. The backbone's parameters sit
under "backbone" with exactly the policy's tree, so a policy (or SFT) checkpoint initialises it directly.

Usage:
  rm = RewardModel(config, kind="bt")
  params = rm.init(rng, tokens, mask)["params"]            # boxed with logical names
  r = rm.apply({"params": params}, tokens, mask)           # [B]
  rm = RewardModel(config, kind="iqn")
  q = rm.apply({"params": params}, tokens, mask, taus)     # [B, N] at taus [N] or [B, N]
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.heads import BTHead, IQNHead
from models.transformer import Transformer

KINDS = ("bt", "iqn")


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """RoPE positions max(cumsum(mask) - 1, 0): [B, S] int32, the same for any amount of left padding."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def last_token_index(mask: jax.Array) -> jax.Array:
  """Index of the last slot with mask 1 in each row, whatever the padding side: [B, S] -> [B] int32.

  A row without real tokens gives S - 1 (finite garbage; callers mask such rows).
  """
  s = mask.shape[-1]
  return (s - 1 - jnp.argmax(mask[:, ::-1] > 0, axis=-1)).astype(jnp.int32)


def pool_last(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """The hidden state at the last real token: [B, S, D], [B, S] -> [B, D] float32."""
  idx = last_token_index(mask)                                       # [B]
  return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0, :].astype(jnp.float32)


class RewardModel(nn.Module):
  """Scores (prompt, response) token sequences.

  Attributes:
    config: the backbone's ``ModelConfig``.
    kind: "bt" (scalar Bradley-Terry reward) or "iqn" (quantiles at given taus).
    num_cosines, head_hidden_dim, monotone: ``IQNHead`` options (ignored for "bt").
  """
  config: ModelConfig
  kind: str = "bt"
  num_cosines: int = 64
  head_hidden_dim: Optional[int] = None
  monotone: str = "none"

  def setup(self):
    if self.kind not in KINDS:
      raise ValueError(f"unknown reward head {self.kind!r}; choose one of {list(KINDS)}")
    self.backbone = Transformer(self.config)
    if self.kind == "bt":
      self.head = BTHead()
    else:
      self.head = IQNHead(num_cosines=self.num_cosines, hidden_dim=self.head_hidden_dim, monotone=self.monotone)

  def features(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Pooled features psi(x): [B, S] tokens and mask -> [B, D] float32."""
    mask = mask.astype(jnp.int32)
    hidden = self.backbone.features(tokens, positions_from_mask(mask), mask)   # [B, S, D]
    return pool_last(hidden, mask)

  def __call__(self, tokens: jax.Array, mask: jax.Array, taus: Optional[jax.Array] = None) -> jax.Array:
    """Rewards of whole sequences.

    Args:
      tokens: [B, S] int32 prompt + response ids, padded on either side.
      mask: [B, S] 1 on real tokens (prompt and response up to and including its EOS), 0 on padding.
      taus: IQN only, [N] or [B, N] quantile fractions.

    Returns:
      "bt": [B] float32 rewards; "iqn": [B, N] float32 quantiles.
    """
    feature = self.features(tokens, mask)
    if self.kind == "bt":
      if taus is not None:
        raise ValueError("a Bradley-Terry reward model takes no taus")
      return self.head(feature)
    if taus is None:
      raise ValueError("an IQN reward model needs taus ([N] or [B, N])")
    return self.head(feature, taus)
