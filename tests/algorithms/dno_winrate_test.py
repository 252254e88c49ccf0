"""DNO loss (vectors, log 2 at iteration start, soft labels) and pair selection; win-rate rewards."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from algorithms import dno
from algorithms import winrate

import algo_reference as ref_impl

TOL = dict(rtol=1e-5, atol=1e-6)
_loss = jax.jit(dno.loss, static_argnames=("beta", "soft_labels"))
_select = jax.jit(dno.select_pairs, static_argnames=("max_pairs",))


def _pairs(b=3, t=5, seed=0):
  rng = np.random.default_rng(seed)
  lc, lr = rng.normal(-1, 0.5, size=(2, b, t)).astype(np.float32)
  rc, rr = (lc + rng.normal(0, 0.3, size=(b, t))).astype(np.float32), (lr + 0.2).astype(np.float32)
  mc = (np.arange(t)[None] < rng.integers(1, t + 1, size=(b, 1))).astype(np.float32)
  mr = (np.arange(t)[None] < rng.integers(1, t + 1, size=(b, 1))).astype(np.float32)
  return lc, rc, mc, lr, rr, mr


def test_vector_and_reference():
  mask = jnp.ones((1, 2))
  value, m = _loss(jnp.array([[1.5, 0.5]]), jnp.zeros((1, 2)), mask, jnp.array([[-1.0, 0.0]]), jnp.zeros((1, 2)),
                   mask, beta=0.1)
  np.testing.assert_allclose(value, 0.554355, **TOL)
  np.testing.assert_allclose(m["accuracy"], 1.0)
  lc, rc, mc, lr, rr, mr = _pairs()
  value, _ = _loss(lc, rc, mc, lr, rr, mr, beta=0.1)
  h = (mc * (lc - rc)).sum(-1) - (mr * (lr - rr)).sum(-1)
  np.testing.assert_allclose(value, np.mean([ref_impl.softplus(-0.1 * x) for x in h]), **TOL)


def test_log2_at_iteration_start_and_gradient():
  lc, _, mc, lr, _, mr = _pairs(seed=1)
  beta = 0.1
  vg = jax.jit(jax.value_and_grad(lambda a, b: dno.loss(a, a, mc, b, b, mr, beta=beta)[0], argnums=(0, 1)))
  value, (gc, gr) = vg(lc, lr)  # pi = pi_t: the reference is the current iterate
  np.testing.assert_allclose(value, np.log(2.0), **TOL)
  n = lc.shape[0]
  np.testing.assert_allclose(gc, -(beta / 2) * mc / n, **TOL)
  np.testing.assert_allclose(gr, (beta / 2) * mr / n, **TOL)


def test_soft_labels_symmetry_and_hard_limit():
  lc, rc, mc, lr, rr, mr = _pairs(seed=2)
  sc, sr = jnp.array([0.9, 0.4, 0.6]), jnp.array([0.1, 0.5, 0.6])
  soft, _ = _loss(lc, rc, mc, lr, rr, mr, soft_labels=True, score_chosen=sc, score_rejected=sr)
  swapped, _ = _loss(lr, rr, mr, lc, rc, mc, soft_labels=True, score_chosen=sr, score_rejected=sc)
  np.testing.assert_allclose(soft, swapped, **TOL)
  hard, _ = _loss(lc, rc, mc, lr, rr, mr)
  one, _ = _loss(lc, rc, mc, lr, rr, mr, label=jnp.ones(3))
  np.testing.assert_allclose(one, hard, **TOL)
  h = (mc * (lc - rc)).sum(-1) - (mr * (lr - rr)).sum(-1)
  lab = 1 / (1 + np.exp(-(np.asarray(sc) - np.asarray(sr))))
  want = np.mean([l * ref_impl.softplus(-0.1 * x) + (1 - l) * ref_impl.softplus(0.1 * x) for l, x in zip(lab, h)])
  np.testing.assert_allclose(soft, want, **TOL)
  masked, m = _loss(lc, rc, mc, lr, rr, mr, valid=jnp.array([1.0, 0.0, 1.0]))
  np.testing.assert_allclose(masked, np.mean([ref_impl.softplus(-0.1 * h[i]) for i in (0, 2)]), **TOL)
  assert float(m["num_pairs"]) == 2.0


def _brute_force(scores, from_policy, rejected_only, min_chosen, margin, margin_policy):
  out = set()
  for i, j in itertools.permutations(range(len(scores)), 2):
    need = margin_policy if from_policy[i] else margin
    if scores[i] >= min_chosen and scores[j] <= scores[i] - need and not rejected_only[i]:
      out.add((i, j))
  return out


def test_select_pairs_properties():
  rng = np.random.default_rng(3)
  b, c = 6, 5
  scores = rng.integers(1, 7, size=(b, c)).astype(np.float32)  # a 6-point rubric
  from_policy = rng.random((b, c)) < 0.7
  rejected_only = rng.random((b, c)) < 0.15
  kw = dict(min_chosen_score=5.0, min_margin=2.0, min_margin_policy_chosen=1.0)
  ch, rj, valid = _select(scores, from_policy=from_policy, rejected_only=rejected_only, **kw)
  assert ch.shape == rj.shape == valid.shape == (b, c * (c - 1))
  ch, rj, valid = map(np.asarray, (ch, rj, valid))
  assert valid.sum() > 0
  for row in range(b):
    got = [(int(i), int(j)) for i, j, v in zip(ch[row], rj[row], valid[row]) if v]
    assert len(got) == len(set(got)) and all(i != j for i, j in got)
    assert set(got) == _brute_force(scores[row], from_policy[row], rejected_only[row], 5.0, 2.0, 1.0)
    assert all(scores[row, i] >= 5 for i, _ in got)
    for i, j in got:
      assert scores[row, i] - scores[row, j] >= (1.0 if from_policy[row, i] else 2.0)
    assert np.all(valid[row, :len(got)]) and not np.any(valid[row, len(got):])  # valid slots first
    margins = [scores[row, i] - scores[row, j] for i, j in got]
    assert margins == sorted(margins, reverse=True)
  again = _select(scores, from_policy=from_policy, rejected_only=rejected_only, **kw)
  np.testing.assert_array_equal(np.asarray(again[0]), ch)  # deterministic
  top = _select(scores, from_policy=from_policy, rejected_only=rejected_only, max_pairs=2, **kw)
  np.testing.assert_array_equal(np.asarray(top[0]), ch[:, :2])
  gathered = dno.gather(jnp.asarray(scores), jnp.asarray(ch))
  np.testing.assert_array_equal(np.asarray(gathered), np.take_along_axis(scores, ch, axis=1))


def test_win_rates():
  rng = np.random.default_rng(4)
  strength = rng.normal(size=(2, 4))
  prefs = 1 / (1 + np.exp(-(strength[:, :, None] - strength[:, None, :])))  # Bradley-Terry P(j > j')
  noisy = np.clip(prefs + rng.normal(0, 0.05, size=prefs.shape), 0, 1).astype(np.float32)
  want = np.array([[np.mean([(noisy[b, j, k] + 1 - noisy[b, k, j]) / 2 for k in range(4) if k != j])
                    for j in range(4)] for b in range(2)])
  got = np.asarray(winrate.win_rates(noisy))
  np.testing.assert_allclose(got, want, **TOL)
  assert np.all((got >= 0) & (got <= 1))
  np.testing.assert_allclose(got.sum(-1), 2.0, **TOL)  # G / 2
  verdicts = 2 * noisy - 1
  np.testing.assert_allclose(winrate.win_rates(verdicts, kind="verdict"), got, **TOL)
  hard = np.asarray(winrate.win_rates(prefs.astype(np.float32), hard=True))
  ranks = np.argsort(np.argsort(strength, -1), -1) / 3.0  # wins / (G - 1)
  np.testing.assert_allclose(hard, ranks, **TOL)
  matrix = winrate.preference_matrix(lambda a, b: jax.nn.sigmoid(a - b), jnp.asarray(strength, jnp.float32))
  np.testing.assert_allclose(matrix, prefs, rtol=1e-5, atol=1e-6)


def test_dno_sharded_over_8_devices_and_single_trace():
  from jax.sharding import NamedSharding, PartitionSpec as P
  from rlj import sharding
  mesh = sharding.make_mesh([("data", 8)])
  traces = []

  @jax.jit
  def step(*args):
    traces.append(1)
    return jax.value_and_grad(lambda lc, lr: dno.loss(lc, args[1], args[2], lr, args[4], args[5])[0],
                              argnums=(0, 1))(args[0], args[3])

  args = _pairs(b=16, seed=5)
  v1, g1 = step(*args)
  v8, g8 = step(*(jax.device_put(x, NamedSharding(mesh, P("data"))) for x in args))
  step(*_pairs(b=16, seed=6))
  np.testing.assert_allclose(v8, v1, rtol=1e-6, atol=1e-7)
  for a, b in zip(g8, g1):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
  assert len(traces) == 2  # one trace per input sharding; a new batch with the same shapes reuses it
