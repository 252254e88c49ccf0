"""Reward-model train step: a tiny BT and a tiny IQN model learn a known preference (more token 5 wins)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models import presets
from models.reward_model import RewardModel
from rewards import bradley_terry, quantile
from rlj import rm_step

S = 8
CONFIG = dataclasses.replace(presets.get("tiny"), vocab_size=16)


pytestmark = pytest.mark.usefixtures("fast_compile")


def _synthetic(rng, n):
  """n pairs of equal-length sequences over {5, 6, 7, 8}; chosen has strictly more 5s. Random pad side."""
  out = {k: np.zeros((n, S), np.int32) for k in ("ct", "cm", "rt", "rm")}
  i = 0
  while i < n:
    length = rng.integers(4, S + 1)
    a, b = (rng.choice([5, 6, 7, 8], size=length, p=[0.4, 0.2, 0.2, 0.2]) for _ in range(2))
    if (a == 5).sum() == (b == 5).sum():
      continue
    chosen, rejected = (a, b) if (a == 5).sum() > (b == 5).sum() else (b, a)
    for (tk, mk), seq in ((("ct", "cm"), chosen), (("rt", "rm"), rejected)):
      sl = slice(S - length, S) if rng.random() < 0.5 else slice(0, length)
      out[tk][i, sl], out[mk][i, sl] = seq, 1
    i += 1
  return rm_step.batch_from_numpy(out["ct"], out["cm"], out["rt"], out["rm"])


def _split(batch, size):
  n = batch.chosen_tokens.shape[0]
  return [rm_step.PreferenceBatch(*(x[i:i + size] for x in batch[:4])) for i in range(0, n, size)]


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  return _split(_synthetic(rng, 32 * 40), 32), _split(_synthetic(rng, 256), 128)


@pytest.fixture(scope="module")
def bt_params(data):
  return rm_step.init_params(RewardModel(CONFIG, kind="bt"), jax.random.key(0), data[0][0])


def _train(model, data, steps, params=None, **kw):
  train, held_out = data
  tx = optax.adam(3e-3)
  if params is None:
    state = rm_step.init_state(model, tx, jax.random.key(0), train[0], num_taus=kw.get("num_taus", 32))
  else:
    state = rm_step.TrainState.create(jax.tree.map(jnp.copy, params), tx)   # the step donates its state
  step_fn = rm_step.make_train_step(model, tx, **kw)
  eval_fn = rm_step.make_eval_step(model, **kw)
  before = rm_step.evaluate(eval_fn, state.params, held_out)
  traces = []
  for i in range(steps):
    state, metrics = step_fn(state, train[i % len(train)], jax.random.fold_in(jax.random.key(1), i))
    traces.append(step_fn._cache_size())
  after = rm_step.evaluate(eval_fn, state.params, held_out)
  assert traces[-1] == 1                                  # one compilation for every step
  assert int(state.step) == steps and np.isfinite(float(metrics["loss"]))
  return before, after, state


def test_bt_learns_synthetic_preference(data, bt_params):
  before, after, _ = _train(RewardModel(CONFIG, kind="bt"), data, 40, params=bt_params)
  print("BT held-out", before, "->", after)
  assert after["count"] == 256
  assert after["accuracy"] >= 0.85 and after["loss"] < before["loss"]


def test_iqn_learns_synthetic_preference(data):
  model = RewardModel(CONFIG, kind="iqn", num_cosines=16, monotone="cumsoftplus")
  before, after, _ = _train(model, data, 40, num_taus=8, tau_sampling="uniform", mean_anchor_coef=0.1)
  print("IQN held-out", before, "->", after)
  assert after["accuracy"] >= 0.85 and after["mean_accuracy"] >= 0.85 and after["loss"] < before["loss"]


def test_loss_fn_matches_direct_losses(data, bt_params):
  """The step's objective equals the loss module applied to separately scored chosen / rejected rows."""
  batch, params = data[1][0], bt_params
  bt = RewardModel(CONFIG, kind="bt")
  score = jax.jit(lambda p, t, m: bt.apply({"params": p}, t, m))
  r_w, r_l = score(params, batch.chosen_tokens, batch.chosen_mask), score(params, batch.rejected_tokens,
                                                                        batch.rejected_mask)
  margin = jnp.linspace(0.0, 1.0, r_w.shape[0])
  loss = jax.jit(lambda p, b: rm_step.loss_fn(p, b, model=bt, center_coef=0.01))
  got, _ = loss(params, batch._replace(margin=margin))
  want, _ = bradley_terry.loss(r_w, r_l, margin=margin, center_coef=0.01)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  taus = quantile.midpoint_taus(4)
  assert rm_step.step_taus(None, 3, num_taus=4, tau_sampling="midpoint").shape == (4,)
  u = rm_step.step_taus(jax.random.key(0), 3, num_taus=4, tau_sampling="uniform")
  assert u.shape == (3, 4) and np.all(np.diff(np.asarray(u), axis=-1) >= 0)
  np.testing.assert_allclose(taus, [0.125, 0.375, 0.625, 0.875])
  with pytest.raises(ValueError):
    rm_step.step_taus(None, 3, num_taus=4, tau_sampling="uniform")
