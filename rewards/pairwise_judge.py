"""A judge language model's verdicts as rewards: pairwise win rates (Pref-GRPO) and rubric items (pointwise).

A judge reads a prompt that asks for a verdict and answers with one token. From its next-token logits z at the end
of the prompt, the probability of the first of two verdict tokens (e.g. "A" / "B", or "Yes" / "No") is the softmax
over those two tokens alone:

  p = exp(z_first) / (exp(z_first) + exp(z_second)) = sigmoid(z_first - z_second)         (``verdict_prob``)

Pairwise (a unified pairwise framework for RLHF, arXiv:2504.04950; the judge prompt of a pairwise generative reward
model, Think-RM, arXiv:2505.16265): completions i and j of one prompt are judged in both orders, so a judge's
preference for a position cancels,

  P(i > j) = (p(i shown as A, j as B) + 1 - p(j shown as A, i as B)) / 2                     (``debiased``)

and, following Pref-GRPO (arXiv:2508.20751, Sec. 3: the reward of a completion is its win rate against the other
completions of its group), completion i's reward is the mean of P(i > j) over the opponents j it was judged against
(soft), or of 1[P(i > j) > 1/2] + 1[P(i > j) = 1/2] / 2 (hard)                              (``win_rates``).

The opponents are a budget: every other completion of the group (G (G - 1) / 2 pairs), or k opponents on a
circular schedule (``circular_pairs``): pairs {i, i + d mod G} for d = 1 .. floor(k / 2), plus the pairs
{i, i + G / 2} when k is odd (G even), so every completion meets exactly k opponents and every pair is judged
once (k G / 2 pairs).

A NaN verdict (a judge forward that overflowed, or a prompt longer than the judge's window) makes the win rates of
both completions of that pair NaN: the rows are missing, which GDPO's NaN-aware normalisation skips.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def circular_pairs(group_size: int, opponents: int = 0) -> np.ndarray:
  """[P, 2] int32 pairs (i, j) of completion indices within a group, each unordered pair once.

  Args:
    group_size: G >= 2.
    opponents: k, how many other completions each one is judged against; 0 (or G - 1) for all pairs. An odd k < G - 1
      needs an even G (the pairs {i, i + G/2} pair each completion once).
  Raises:
    ValueError: for a k outside [0, G - 1], or an odd k < G - 1 with an odd G.
  """
  g, k = int(group_size), int(opponents)
  if g < 2:
    raise ValueError(f"a pairwise judge compares completions of one prompt: group size {g} < 2")
  if not 0 <= k <= g - 1:
    raise ValueError(f"opponents={k}: must be 0 (all) or 1 .. G - 1 = {g - 1}")
  if k == 0 or k == g - 1:
    return np.asarray([(i, j) for i in range(g) for j in range(i + 1, g)], np.int32)
  if k % 2 and g % 2:
    raise ValueError(f"opponents={k} is odd: every completion can meet an odd number of opponents, each pair once, "
                     f"only in an even group (G={g}); use an even number of opponents or all ({g - 1})")
  pairs = [(i, (i + d) % g) for d in range(1, k // 2 + 1) for i in range(g)]
  if k % 2:
    pairs += [(i, i + g // 2) for i in range(g // 2)]
  return np.asarray(pairs, np.int32)


def verdict_prob(logits: jax.Array, first_id: int, second_id: int) -> jax.Array:
  """P(first verdict) from next-token logits [M, V]: the softmax over the two verdict tokens, float32 [M]."""
  z = logits.astype(jnp.float32)
  return jax.nn.sigmoid(z[:, first_id] - z[:, second_id])


def debiased(p_ab: jax.Array, p_ba: jax.Array) -> jax.Array:
  """P(i > j) from p_ab = P("A") with i shown as A and p_ba = P("A") with j shown as A."""
  return 0.5 * (p_ab + 1.0 - p_ba)


def win_rates(prefs: jax.Array, pairs: np.ndarray, group_size: int, *, hard: bool = False) -> jax.Array:
  """Each completion's win rate over the opponents it was judged against.

  Args:
    prefs: [B, P] P(i > j) for ``pairs`` [P, 2] = (i, j) of every group.
    group_size: G.
    hard: count a win as 1[P > 1/2] + 1[P = 1/2] / 2 instead of P.
  Returns:
    [B, G] float32; NaN where a judged pair's preference is NaN.
  """
  prefs = prefs.astype(jnp.float32)
  if hard:
    prefs = jnp.where(jnp.isnan(prefs), jnp.nan, (prefs > 0.5) + 0.5 * (prefs == 0.5).astype(jnp.float32))
  first = jax.nn.one_hot(pairs[:, 0], group_size, dtype=jnp.float32)     # [P, G]
  second = jax.nn.one_hot(pairs[:, 1], group_size, dtype=jnp.float32)
  # NaN-propagating sums: a NaN pair must reach both of its completions, and only them (0 * NaN is NaN, so the
  # one-hot matmul would spread it to every completion).
  wins = _masked_sum(prefs, first) + _masked_sum(1.0 - prefs, second)
  return wins / (first.sum(0) + second.sum(0))[None, :]


def _masked_sum(values: jax.Array, onehot: jax.Array) -> jax.Array:
  """sum_p values[b, p] · onehot[p, g], with NaN only where a NaN value meets a 1."""
  nan = jnp.isnan(values)
  total = jnp.einsum("bp,pg->bg", jnp.where(nan, 0.0, values), onehot)
  hit = jnp.einsum("bp,pg->bg", nan.astype(jnp.float32), onehot) > 0
  return jnp.where(hit, jnp.nan, total)


def rubric_score(probs: jax.Array, weights: jax.Array) -> jax.Array:
  """A rubric's score from the judge's P(yes) per item [N, I] and item weights [I], or [N, I] when every row has
  its own items (a row with fewer pads with weight 0 and P 0): sum_i w_i p_i / sum_i w_i."""
  weights = jnp.broadcast_to(jnp.asarray(weights, jnp.float32), probs.shape)
  return jnp.sum(probs.astype(jnp.float32) * weights, axis=-1) / jnp.sum(weights, axis=-1)
