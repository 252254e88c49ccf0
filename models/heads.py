"""Reward heads on a pooled backbone feature: a Bradley-Terry scalar head and an IQN quantile head.

Both read psi(x) [B, D], the final-normed hidden state at the last real token (``models.reward_model``), and
compute in float32 whatever the backbone's dtype. Every parameter is boxed with logical axis names
("embed", "mlp", or None) so the heads shard with the backbone.
"""
from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

MONOTONE = ("none", "sort", "cumsoftplus")


def _param(module: nn.Module, name: str, names: tuple, shape: tuple, init=None):
  if init is None:
    init = nn.initializers.normal(stddev=1.0 / math.sqrt(shape[0]))
  return module.param(name, nn.with_logical_partitioning(init, names), shape, jnp.float32)


def cosine_features(taus: jax.Array, num_cosines: int) -> jax.Array:
  """c_i(tau) = cos(pi * i * tau) for i = 1..n: [...] -> [..., n] float32.

  Warning:
    The IQN paper (arXiv:1806.06923, Eq. 4) indexes i = 0..n-1; its i = 0 column is the constant 1 and
    duplicates the bias. This project starts at i = 1, like google/dopamine and tianshou (ALGORITHMS.md section 8).
  """
  taus = jnp.asarray(taus, jnp.float32)
  i = jnp.arange(1, num_cosines + 1, dtype=jnp.float32).reshape((1,) * taus.ndim + (num_cosines,))
  return jnp.cos(jnp.pi * taus[..., None] * i)


class BTHead(nn.Module):
  """Bradley-Terry scalar reward r(x) = w . psi(x) + b: [B, D] -> [B] float32."""

  @nn.compact
  def __call__(self, feature: jax.Array) -> jax.Array:
    feature = jnp.asarray(feature, jnp.float32)
    d = feature.shape[-1]
    w = _param(self, "kernel", ("embed",), (d,), nn.initializers.normal(stddev=1.0 / math.sqrt(d)))
    b = _param(self, "bias", (None,), (1,), nn.initializers.zeros)
    return jnp.einsum("bd,d->b", feature, w) + b[0]


class IQNHead(nn.Module):
  """Implicit quantile head Z(x, tau) = f(psi(x) ⊙ phi(tau)), phi(tau) = ReLU(W c(tau) + b).

  c(tau) are the cosine features i = 1..n (``cosine_features``), ⊙ is the Hadamard product, so phi's width is
  dim psi(x) = D, and f is a ReLU MLP D -> hidden_dim -> 1.

  See "Implicit Quantile Networks for Distributional Reinforcement Learning" (arXiv:1806.06923), Eq. 4.

  Attributes:
    num_cosines: n, cosine features per tau (64 in the paper).
    hidden_dim: width of f's hidden layer (default D).
    monotone: "none" (raw IQN; quantiles may cross), "sort" (sort the values along tau) or "cumsoftplus"
      (q_1 = v_1, q_i = q_{i-1} + softplus(v_i): non-decreasing by construction). With "sort" and
      "cumsoftplus" the taus are sorted first and the output is aligned with the sorted taus, so pass an
      ascending grid (e.g. ``rewards.quantile.midpoint_taus``).
  """
  num_cosines: int = 64
  hidden_dim: Optional[int] = None
  monotone: str = "none"

  @nn.compact
  def __call__(self, feature: jax.Array, taus: jax.Array) -> jax.Array:
    """Quantiles at ``taus``.

    Args:
      feature: [B, D] pooled features psi(x).
      taus: [N] (shared) or [B, N] quantile fractions in (0, 1).

    Returns:
      [B, N] float32 quantile values.
    """
    if self.monotone not in MONOTONE:
      raise ValueError(f"unknown monotone option {self.monotone!r}; choose one of {list(MONOTONE)}")
    feature = jnp.asarray(feature, jnp.float32)
    b_size, d = feature.shape
    taus = jnp.asarray(taus, jnp.float32)
    if taus.ndim not in (1, 2) or (taus.ndim == 2 and taus.shape[0] != b_size):
      raise ValueError(f"taus must be [N] or [B={b_size}, N], got {taus.shape}")
    taus = jnp.broadcast_to(taus, (b_size, taus.shape[-1]))        # [B, N]
    if self.monotone != "none":
      taus = jnp.sort(taus, axis=-1)
    hidden = self.hidden_dim or d
    cos = cosine_features(taus, self.num_cosines)                    # [B, N, n]
    w_tau = _param(self, "tau_kernel", (None, "embed"), (self.num_cosines, d))
    b_tau = _param(self, "tau_bias", ("embed",), (d,), nn.initializers.zeros)
    phi = jax.nn.relu(jnp.einsum("bnc,cd->bnd", cos, w_tau) + b_tau[None, None, :])  # [B, N, D]
    h = feature[:, None, :] * phi                                    # [B, N, D]
    w1 = _param(self, "mlp_kernel", ("embed", "mlp"), (d, hidden))
    b1 = _param(self, "mlp_bias", ("mlp",), (hidden,), nn.initializers.zeros)
    h = jax.nn.relu(jnp.einsum("bnd,dh->bnh", h, w1) + b1[None, None, :])           # [B, N, H]
    w2 = _param(self, "out_kernel", ("mlp",), (hidden,))
    b2 = _param(self, "out_bias", (None,), (1,), nn.initializers.zeros)
    values = jnp.einsum("bnh,h->bn", h, w2) + b2[0]                  # [B, N]
    if self.monotone == "sort":
      values = jnp.sort(values, axis=-1)
    elif self.monotone == "cumsoftplus":
      steps = jnp.concatenate([values[:, :1], jax.nn.softplus(values[:, 1:])], axis=-1)
      values = jnp.cumsum(steps, axis=-1)
    return values
