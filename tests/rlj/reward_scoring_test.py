"""Reward scoring of rollouts (sharded and not, padding on both sides) and group win-rate rewards."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import presets
from models.reward_model import RewardModel
from rewards import dominance, quantile
from rlj import reward_scoring, sharding

CONFIG = presets.get("tiny")
P, T, G = 4, 6, 4
Rollout = collections.namedtuple("Rollout", "tokens attn_mask")


pytestmark = pytest.mark.usefixtures("fast_compile")


def _rollout():
  """N = 8 rows: prompts left-padded to P, completions right-padded to T (padding on both sides)."""
  rng = np.random.default_rng(0)
  tokens = np.zeros((8, P + T), np.int32)
  mask = np.zeros((8, P + T), np.int32)
  real = []
  for i in range(8):
    p_len, c_len = rng.integers(1, P + 1), rng.integers(1, T + 1)
    prompt, comp = rng.integers(3, 100, p_len), rng.integers(3, 100, c_len)
    tokens[i, P - p_len:P], mask[i, P - p_len:P] = prompt, 1
    tokens[i, P:P + c_len], mask[i, P:P + c_len] = comp, 1
    real.append(np.concatenate([prompt, comp]))
  return Rollout(jnp.asarray(tokens), jnp.asarray(mask)), real


@pytest.fixture(scope="module")
def setup():
  model = RewardModel(CONFIG, kind="iqn", num_cosines=8)
  rollout, real = _rollout()
  taus = quantile.midpoint_taus(5)
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  params, shardings = sharding.sharded_init(lambda k: model.init(k, rollout.tokens, rollout.attn_mask, taus)["params"],
                                            mesh, sharding.DEFAULT_RULES, jax.random.key(0))
  return dict(model=model, rollout=rollout, real=real, params=params, mesh=mesh, scorer=reward_scoring.make_scorer(
      model, num_taus=5))


def test_scorer_sharded_matches_single_device_and_ignores_padding(setup):
  model, rollout, params, mesh = setup["model"], setup["rollout"], setup["params"], setup["mesh"]
  assert any(len(s.spec) and any(a is not None for a in s.spec)
             for s in jax.tree.leaves(jax.tree.map(lambda x: x.sharding, params)))   # params really are sharded
  sharded_rows = jax.device_put(rollout, sharding.batch_sharding(mesh, 2))
  q_sharded = reward_scoring.score_rollout(setup["scorer"], params, sharded_rows)
  local = jax.device_put(params, jax.devices()[0])
  q = reward_scoring.score_rollout(setup["scorer"], local, jax.device_put(rollout, jax.devices()[0]))
  assert q.shape == (8, 5) and q.dtype == jnp.float32
  np.testing.assert_allclose(q_sharded, q, rtol=1e-4, atol=1e-5)
  # Packing the real tokens to the left (no padding inside) gives the same quantiles.
  packed = np.zeros((8, P + T), np.int32)
  packed_mask = np.zeros((8, P + T), np.int32)
  for i, r in enumerate(setup["real"]):
    packed[i, :len(r)], packed_mask[i, :len(r)] = r, 1
  np.testing.assert_allclose(setup["scorer"](local, jnp.asarray(packed), jnp.asarray(packed_mask)), q,
                             rtol=1e-4, atol=1e-5)


def test_bt_scorer_returns_one_reward_per_row():
  model = RewardModel(CONFIG, kind="bt")
  rollout, _ = _rollout()
  params = jax.eval_shape(model.init, jax.random.key(0), rollout.tokens, rollout.attn_mask)["params"]
  out = jax.eval_shape(reward_scoring.make_scorer(model), params, rollout.tokens, rollout.attn_mask)
  assert out.shape == (8,) and out.dtype == jnp.float32


def test_group_preferences_and_win_rates_match_numpy():
  q = np.random.default_rng(1).normal(size=(8, 5)).round(1).astype(np.float32)
  p = np.asarray(reward_scoring.group_preferences(jnp.asarray(q), G))
  assert p.shape == (2, G, G)
  for b, j, k in np.ndindex(2, G, G):
    a, c = q[b * G + j], q[b * G + k]
    ref = np.mean([[float(x > y) + 0.5 * float(x == y) for y in c] for x in a])
    np.testing.assert_allclose(p[b, j, k], ref, rtol=1e-6)
  r = np.asarray(reward_scoring.win_rate_rewards(jnp.asarray(q), G))
  ref = [[sum(p[b, j, k] for k in range(G) if k != j) / (G - 1) for j in range(G)] for b in range(2)]
  np.testing.assert_allclose(r, ref, rtol=1e-6)
  np.testing.assert_allclose(r.sum(-1), [G / 2, G / 2], rtol=1e-6)
  soft = reward_scoring.win_rate_rewards(jnp.asarray(q), G, temperature=0.5)
  np.testing.assert_allclose(np.asarray(soft).sum(-1), [G / 2, G / 2], rtol=1e-5)


def test_qd_win_rates_follow_the_preorder():
  # One group of 4: candidate 2 is best on objective 0 (top priority); 0 and 3 tie there, 3 wins objective 1.
  base = np.array([[1.0, 0.0], [0.0, 5.0], [2.0, -1.0], [1.0, 1.0]], np.float32)
  q = np.repeat(base[:, :, None], 3, axis=2) + np.linspace(-0.1, 0.1, 3, dtype=np.float32)
  s = np.asarray(reward_scoring.group_verdicts(jnp.asarray(q), G, ((0,), (1,))))
  np.testing.assert_array_equal(s[0], np.asarray(dominance.verdicts(jnp.asarray(q), ((0,), (1,)))))
  r = np.asarray(reward_scoring.win_rate_rewards(jnp.asarray(q), G, method="qd", levels=((0,), (1,))))[0]
  np.testing.assert_allclose(r, [1 / 3, 0.0, 1.0, 2 / 3], rtol=1e-6)     # 2 > {3 > 0} > 1
  np.testing.assert_allclose(r.sum(), G / 2, rtol=1e-6)
  pareto = np.asarray(reward_scoring.win_rate_rewards(jnp.asarray(q), G, method="qd"))[0]
  np.testing.assert_allclose(pareto.sum(), G / 2, rtol=1e-6)
  with pytest.raises(ValueError):
    reward_scoring.win_rate_rewards(jnp.asarray(q), 3, method="qd")
  with pytest.raises(ValueError):
    reward_scoring.win_rate_rewards(jnp.asarray(q[:, 0]), G, method="borda")


@pytest.mark.parametrize("kind", ["bt", "iqn"])
def test_reward_model_pairwise_rewards_are_group_win_rates(kind, setup):
  """``fn: reward_model`` with ``pairwise=True``: each row's win rate within its group of G, from the BT
  preference sigmoid(r_j - r_j') or the IQN preference on the quantiles, against numpy loops."""
  from rlj import rm_reward  # pylint: disable=g-import-not-at-top
  rollout, _ = _rollout()
  model = setup["model"] if kind == "iqn" else RewardModel(CONFIG, kind="bt")
  params = setup["params"] if kind == "iqn" else jax.jit(model.init)(jax.random.key(1), rollout.tokens,
                                                                      rollout.attn_mask)["params"]
  meta = {"num_taus": 5, "tokenizer_path": "tok.model"}
  scalar = rm_reward.make_reward_fn(model, params, meta)
  pairwise = rm_reward.make_reward_fn(model, params, meta, pairwise=True)
  kw = dict(tokens=np.asarray(rollout.tokens), attn_mask=np.asarray(rollout.attn_mask))
  got = pairwise(["p"] * 8, ["c"] * 8, group_size=G, **kw)
  if kind == "bt":
    r = scalar(["p"] * 8, ["c"] * 8, **kw).astype(np.float64)
    pref = lambda a, b: 1 / (1 + np.exp(-(r[a] - r[b])))  # noqa: E731
  else:
    q = np.asarray(setup["scorer"](params, rollout.tokens, rollout.attn_mask), np.float64)
    pref = lambda a, b: np.mean([[float(x > y) + 0.5 * float(x == y) for y in q[b]] for x in q[a]])  # noqa: E731
  ref = [np.mean([pref(b * G + j, b * G + k) for k in range(G) if k != j]) for b in range(2) for j in range(G)]
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  assert not np.allclose(got, 0.5)
  with pytest.raises(ValueError, match="group_size"):
    pairwise(["p"] * 8, ["c"] * 8, group_size=3, **kw)
