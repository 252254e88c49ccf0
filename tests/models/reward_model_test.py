"""Reward-model wrapper: last-real-token pooling whatever the padding side, BT / IQN outputs, backbone tree."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import presets
from models.reward_model import RewardModel, last_token_index, positions_from_mask
from models.transformer import Transformer

CONFIG = presets.get("tiny")
S = 10


pytestmark = pytest.mark.usefixtures("fast_compile")


def _pad(rows, side):
  """Pads variable-length rows to S on one side; returns tokens, mask [len(rows), S]."""
  tokens = np.zeros((len(rows), S), np.int32)
  mask = np.zeros((len(rows), S), np.int32)
  for i, r in enumerate(rows):
    sl = slice(S - len(r), S) if side == "left" else slice(0, len(r))
    tokens[i, sl], mask[i, sl] = r, 1
  return jnp.asarray(tokens), jnp.asarray(mask)


ROWS = [[3, 9, 27, 5, 1], [7, 7, 2, 11, 4, 6, 8, 10], [12]]


@pytest.fixture(scope="module")
def models():
  bt, iqn = RewardModel(CONFIG, kind="bt"), RewardModel(CONFIG, kind="iqn", num_cosines=8, monotone="cumsoftplus")
  tokens, mask = _pad(ROWS, "right")
  taus = jnp.array([0.1, 0.5, 0.9])
  p_bt = jax.jit(bt.init)(jax.random.key(0), tokens, mask)["params"]
  p_iqn = jax.jit(iqn.init)(jax.random.key(1), tokens, mask, taus)["params"]
  score_bt = jax.jit(lambda p, t, m: bt.apply({"params": p}, t, m))
  score_iqn = jax.jit(lambda p, t, m: iqn.apply({"params": p}, t, m, taus))
  return dict(p_bt=p_bt, p_iqn=p_iqn, bt=score_bt, iqn=score_iqn)


def test_last_token_index_and_positions():
  mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  ref = [max(i for i, v in enumerate(row) if v) for row in np.asarray(mask)]
  np.testing.assert_array_equal(last_token_index(mask), ref)
  np.testing.assert_array_equal(positions_from_mask(mask)[0], [0, 0, 0, 1, 2])


def test_padding_side_does_not_change_scores(models):
  for kind in ("bt", "iqn"):
    params = nn.unbox(models[f"p_{kind}"])
    left = models[kind](params, *_pad(ROWS, "left"))
    right = models[kind](params, *_pad(ROWS, "right"))
    np.testing.assert_allclose(left, right, rtol=1e-4, atol=1e-5)   # rows carry 0, 2 and 9 pad tokens
  assert left.shape == (3, 3) and np.all(np.diff(np.asarray(left), axis=-1) >= 0)


def test_padding_tokens_are_ignored_real_tokens_are_not(models):
  params = nn.unbox(models["p_bt"])
  tokens, mask = _pad(ROWS, "right")
  base = models["bt"](params, tokens, mask)
  junk = jnp.where(mask == 1, tokens, 99)
  np.testing.assert_allclose(models["bt"](params, junk, mask), base, rtol=1e-5, atol=1e-6)
  changed = models["bt"](params, tokens.at[0, 4].set(50), mask)       # the last real token of row 0
  assert abs(float(changed[0] - base[0])) > 1e-4
  np.testing.assert_allclose(changed[1:], base[1:], rtol=1e-5, atol=1e-6)


def test_backbone_tree_is_the_policy_tree(models):
  tokens, mask = _pad(ROWS, "right")
  policy = jax.eval_shape(Transformer(CONFIG).init, jax.random.key(2), tokens, positions_from_mask(mask), mask)
  policy = policy["params"]
  shapes = lambda t: jax.tree.map(lambda x: x.shape, nn.unbox(t))
  assert shapes(models["p_bt"]["backbone"]) == shapes(policy)
  assert nn.get_partition_spec(models["p_bt"]["backbone"]) == nn.get_partition_spec(policy)
  assert set(models["p_iqn"]) == {"backbone", "head"}


def test_argument_errors():
  tokens, mask = _pad(ROWS, "right")
  with pytest.raises(ValueError):
    jax.eval_shape(RewardModel(CONFIG, kind="gaussian").init, jax.random.key(0), tokens, mask)
  with pytest.raises(ValueError):
    jax.eval_shape(RewardModel(CONFIG, kind="iqn").init, jax.random.key(0), tokens, mask)
  with pytest.raises(ValueError):
    jax.eval_shape(RewardModel(CONFIG, kind="bt").init, jax.random.key(0), tokens, mask, jnp.ones(3) * 0.5)
