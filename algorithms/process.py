"""GRPO with process supervision: per-step rewards normalised over the group, per-token advantages.

DeepSeekMath ("Pushing the Limits of Mathematical Reasoning in Open Language Models", arXiv:2402.03300),
Sec. 4.1.3 "Process Supervision RL with GRPO". A process reward model scores every step of the G outputs of a
question, R = {{r_1^index(1), ..., r_1^index(K_1)}, ..., {r_G^index(1), ..., r_G^index(K_G)}}, where index(j)
is the end token index of step j and K_i the number of steps of output i. Then

  r~_i^index(j) = (r_i^index(j) - mean(R)) / std(R)              mean and std over ALL steps of the G outputs
  A_i,t         = sum_{j : index(j) >= t} r~_i^index(j)          a token's advantage: the steps ending at or
                                                                  after it

so a token is credited with the normalised rewards of its own step and of every later step of its output.
Outcome supervision (Sec. 4.1.2) is the special case of one step per output ending at its last token.

Shape letters: B prompts, G generations per prompt, N = B*G rows (group-major: row b*G + g), S step slots per
row (padded; the step mask says which are steps), T completion tokens.

Conventions (where the paper says nothing): std uses ``ddof`` (1 by default, as ``algorithms.grpo.advantages``)
and ``eps`` is added to it, not under the square root; NaN or masked steps are left out of the statistics and
add nothing; a group with fewer than 2 valid steps, or whose valid steps all have the same reward, gets 0
everywhere (as a constant group does in outcome GRPO). Tokens after a row's last step end get 0 (no step ends
at or after them); the host side (``rewards.steps``) makes each row's last step end at its last completion
token, so only padding is past it. A step end past T - 1 counts for every token.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from algorithms import common, grpo

SCALES = ("group", "batch", "none")


def normalized_step_rewards(step_rewards: jax.Array, step_mask: jax.Array, *, scale: str = "group",
                            eps: float = 1e-4, ddof: int = 1) -> jax.Array:
  """r~ = (r - mean(R)) / (std(R) + eps) per group, R = every valid step of the group's G rows.

  Args:
    step_rewards: [B, G, S] step rewards (NaN = not scored; left out like a masked step).
    step_mask: [B, G, S] 1 where the slot holds a step of the row, 0 for padding.
    scale: "group" (the paper's std of R), "batch" (the std of every valid step of the batch, as Lite PPO's
      batch std in ``algorithms.grpo.advantages``) or "none" (centred only, as Dr. GRPO).
    eps, ddof: added to the std; its delta degrees of freedom.

  Returns:
    float32 [B, G, S]: the normalised rewards, 0 on invalid slots and in degenerate groups.
  """
  chex.assert_rank(step_rewards, 3)
  chex.assert_equal_shape([step_rewards, step_mask])
  b, g, s = step_rewards.shape
  # The group's R is its G x S step slots; padding slots are missing rewards (NaN), which grpo.advantages leaves
  # out of the statistics and sets to 0, as it does degenerate groups: the same normalisation as outcome GRPO.
  r = jnp.where(step_mask > 0, common.f32(step_rewards), jnp.nan).reshape(b, g * s)
  return grpo.advantages(r, scale=scale, eps=eps, ddof=ddof).reshape(b, g, s)


def token_advantages(step_values: jax.Array, step_ends: jax.Array, step_mask: jax.Array,
                     num_tokens: int) -> jax.Array:
  """A_n,t = sum_j [mask_n,j and end_n,j >= t] * v_n,j for t in 0..T-1.

  The values are scattered onto the token where their step ends and summed from the right (a reverse cumsum),
  O(N*(S+T)); a step ending past T - 1 counts for every token.

  Args:
    step_values: [N, S] per-step values (e.g. ``normalized_step_rewards`` reshaped to rows).
    step_ends: [N, S] int: the completion token index (0-based, inclusive) where each step ends.
    step_mask: [N, S] 1 on steps, 0 on padding (whose ends and values are ignored).
    num_tokens: T.

  Returns:
    float32 [N, T].
  """
  chex.assert_rank([step_values, step_ends, step_mask], 2)
  chex.assert_equal_shape([step_values, step_ends, step_mask])
  n = step_values.shape[0]
  valid = (step_mask > 0) & (step_ends >= 0)
  v = jnp.where(valid, common.f32(step_values), 0.0)
  at = jnp.clip(step_ends, 0, num_tokens - 1).astype(jnp.int32)
  rows = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], at.shape)
  dense = jnp.zeros((n, num_tokens), v.dtype).at[rows, at].add(v)
  return jnp.flip(jnp.cumsum(jnp.flip(dense, axis=1), axis=1), axis=1)


def advantages(step_rewards: jax.Array, step_mask: jax.Array, step_ends: jax.Array, num_tokens: int, *,
               scale: str = "group", eps: float = 1e-4, ddof: int = 1) -> jax.Array:
  """Process-supervised GRPO advantages A_i,t (module docstring; arXiv:2402.03300, Sec. 4.1.3).

  Args:
    step_rewards: [B, G, S] step rewards r_i^index(j) (NaN = not scored).
    step_mask: [B, G, S] 1 on steps, 0 on padding (rows have different numbers of steps).
    step_ends: [B, G, S] int: index(j), the completion token where step j ends (inclusive).
    num_tokens: T, the completion width of the train batch.
    scale, eps, ddof: see ``normalized_step_rewards``.

  Returns:
    float32 [B*G, T] per-token advantages, row b*G + g.
  """
  chex.assert_equal_shape([step_rewards, step_mask, step_ends])
  b, g, s = step_rewards.shape
  norm = normalized_step_rewards(step_rewards, step_mask, scale=scale, eps=eps, ddof=ddof)
  return token_advantages(norm.reshape(b * g, s), step_ends.reshape(b * g, s), step_mask.reshape(b * g, s),
                          num_tokens)
