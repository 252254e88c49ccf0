"""Process-supervised GRPO (DeepSeekMath, arXiv:2402.03300, Sec. 4.1.3): advantages against a slow per-token loop
over steps, the outcome special case, and the GRPO loss with per-token advantages."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms import grpo, process

import algo_reference as ref_impl

TOL = dict(rtol=1e-5, atol=1e-5)
_adv = jax.jit(process.advantages, static_argnames=("num_tokens", "scale", "eps", "ddof"))


def slow_process_advantages(r, mask, ends, t, *, scale="group", eps=1e-4, ddof=1):
  """float64 loops, straight from the paper: r~ = (r - mean(R)) / std(R) over every step of the group's G outputs,
  A_i,t = sum over the steps j of output i with index(j) >= t of r~_i^index(j)."""
  b, g, s = r.shape
  valid = (mask > 0) & ~np.isnan(r)
  everything = r[valid].astype(np.float64)
  out = np.zeros((b * g, t))
  for bi in range(b):
    group = r[bi][valid[bi]].astype(np.float64)             # R: all steps of all G outputs
    if len(group) < 2 or np.all(group == group[0]):
      continue
    for gi in range(g):
      for tok in range(t):
        total = 0.0
        for j in range(s):
          if not valid[bi, gi, j] or ends[bi, gi, j] < tok:
            continue
          c = r[bi, gi, j] - group.mean()
          if scale == "group":
            c /= group.std(ddof=ddof) + eps
          elif scale == "batch":
            c /= everything.std(ddof=ddof) + eps
          total += c
        out[bi * g + gi, tok] = total
  return out


def random_steps(rng, b, g, s, t):
  """Ragged steps: row (b, g) has k in 0..s steps with strictly increasing ends in [0, t); pad slots hold junk."""
  r = rng.normal(size=(b, g, s)).astype(np.float32)
  mask = np.zeros((b, g, s), np.float32)
  ends = rng.integers(-5, 3 * t, size=(b, g, s)).astype(np.int32)   # junk in the pad slots
  for bi in range(b):
    for gi in range(g):
      k = int(rng.integers(0, s + 1))
      mask[bi, gi, :k] = 1
      ends[bi, gi, :k] = np.sort(rng.choice(t, size=k, replace=False))
  return r, mask, ends


@pytest.mark.parametrize("scale", process.SCALES)
def test_advantages_equal_a_slow_loop_over_steps(scale):
  rng = np.random.default_rng(0)
  b, g, s, t = 3, 4, 5, 9
  r, mask, ends = random_steps(rng, b, g, s, t)
  r[0, 1, 0] = np.nan                       # a step that is not scored: left out, adds nothing
  r[2] = 0.5                                # a group of equal step rewards: 0 everywhere
  mask[2, 0, 0] = 1
  for ddof in (0, 1):
    got = np.asarray(_adv(r, mask, ends, num_tokens=t, scale=scale, ddof=ddof))
    want = slow_process_advantages(r, mask, ends, t, scale=scale, ddof=ddof)
    np.testing.assert_allclose(got, want, **TOL)
  assert got.shape == (b * g, t) and got.dtype == np.float32
  assert np.all(got[2 * g:] == 0.0)


def test_tokens_after_the_last_step_get_zero_and_a_late_end_counts_everywhere():
  r = np.array([[[1.0, 2.0], [0.0, 5.0]]], np.float32)           # B=1, G=2, S=2
  mask = np.array([[[1, 1], [1, 0]]], np.float32)
  ends = np.array([[[1, 3], [20, 0]]], np.int32)                 # row 1's only step ends past T
  a = np.asarray(_adv(r, mask, ends, num_tokens=6, scale="none"))
  mean = 1.0                                                      # (1 + 2 + 0) / 3
  np.testing.assert_allclose(a[0], [0.0 + 1.0, 0.0 + 1.0, 1.0, 1.0, 0.0, 0.0], **TOL)
  np.testing.assert_allclose(a[1], np.full(6, 0.0 - mean), **TOL)


def test_one_step_per_output_at_its_last_token_is_outcome_grpo():
  """Outcome supervision (Sec. 4.1.2) is the special case of one step per output ending at its last token."""
  rng = np.random.default_rng(1)
  b, g, t = 2, 5, 7
  outcome = rng.normal(size=(b, g)).astype(np.float32)
  lengths = rng.integers(1, t + 1, size=(b, g))
  a = np.asarray(_adv(outcome[..., None], np.ones((b, g, 1), np.float32), (lengths - 1)[..., None].astype(np.int32),
                      num_tokens=t))
  want = ref_impl.group_adv(outcome).reshape(-1)
  tokens = np.arange(t)[None] < lengths.reshape(-1, 1)
  np.testing.assert_allclose(np.where(tokens, a, 0.0), np.where(tokens, want[:, None], 0.0), **TOL)
  assert np.all(a[~tokens] == 0.0)


def test_grpo_loss_with_per_token_advantages_equal_to_a_broadcast_gives_the_same_loss():
  rng = np.random.default_rng(2)
  n, t = 6, 5
  logp = jnp.asarray(rng.normal(size=(n, t)) * 0.3 - 1.0, jnp.float32)
  old = logp + jnp.asarray(rng.normal(size=(n, t)) * 0.3, jnp.float32)
  ref = logp + jnp.asarray(rng.normal(size=(n, t)) * 0.1, jnp.float32)
  mask = jnp.asarray(rng.random((n, t)) > 0.3, jnp.float32).at[0, 0].set(1.0)
  adv = jnp.asarray(rng.normal(size=n), jnp.float32)
  kw = dict(clip_eps=0.2, clip_eps_high=0.28, dual_clip=3.0, kl_coef=0.05, agg="seq_mean_token_mean")

  def f(lp, a):
    return grpo.loss(lp, old, ref, a, mask, **kw)

  vg = jax.jit(jax.value_and_grad(f, has_aux=True))     # one compilation per advantage shape
  (l1, m1), g1 = vg(logp, adv)
  (l2, m2), g2 = vg(logp, jnp.broadcast_to(adv[:, None], (n, t)))
  np.testing.assert_allclose(l2, l1, rtol=1e-6)
  np.testing.assert_allclose(g2, g1, rtol=1e-6, atol=1e-7)
  for k in ("pg_loss", "clip_frac_low", "clip_frac_high", "clip_frac_dual", "kl"):
    np.testing.assert_allclose(m2[k], m1[k], rtol=1e-6)
  # per token: a row's advantage set to 0 on its first token alone changes that token's gradient, as setting
  # the whole row's [N] advantage to 0 does, and leaves every other token's
  per_token = jnp.broadcast_to(adv[:, None], (n, t)).at[0, 0].set(0.0)
  g3 = np.asarray(vg(logp, per_token)[1])
  g0 = np.asarray(vg(logp, adv.at[0].set(0.0))[1])
  np.testing.assert_allclose(g3[0, 0], g0[0, 0], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(g3[0, 1:], np.asarray(g1)[0, 1:], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(g3[1:], np.asarray(g1)[1:], rtol=1e-6, atol=1e-7)
