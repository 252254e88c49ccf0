"""P3O's running reward normalisation (``algo.p3o.reward_norm``): the pair rewards divided by numpy's std of every
difference (or reward) seen so far, its state through a real checkpoint, and the row check; the minibatches keep
a step scalar (the adaptive KL coefficient) whole."""
import jax
import numpy as np
import pytest

from rlj import batches, checkpoint, rl_algos

B, G, T, P = 3, 4, 5, 2
W = np.array([1.0, 0.5], np.float32)


def settings(norm):
  return batches.Settings(loss_kwargs={"kl_coef": 0.05}, options={"p3o": {"reward_norm": norm}}, num_generations=G,
                          max_new_tokens=T)


def step_inputs(step):
  rng = np.random.default_rng(step)
  rows = B * G
  rollout = {"tokens": rng.integers(1, 50, (rows, P + T)).astype(np.int32),
             "attn_mask": np.ones((rows, P + T), np.int32), "mask": np.ones((rows, T), np.float32),
             "old_logp": rng.normal(size=(rows, T)).astype(np.float32)}
  values = rng.normal(loc=step, scale=1.0 + step, size=(B, G, 2)).astype(np.float32)
  values[0, 1] = np.nan           # a completion without any reward: scored 0
  return rollout, values


def _raw_pairs(values):
  total = np.nan_to_num(np.nansum(values * W, -1) * ~np.all(np.isnan(values), -1), nan=0.0)   # [B, G]
  return total.reshape(-1, 2).astype(np.float64)                                                # (2j, 2j+1)


@pytest.mark.parametrize("norm", ["diff_std", "score_std"])
def test_pair_rewards_are_divided_by_numpys_std_of_the_history(norm):
  batcher, seen = rl_algos.ALGORITHMS["p3o"].batcher(settings(norm)), []
  for step in range(4):
    rollout, values = step_inputs(step)
    batch, m = batcher.build(rollout, values, W, step)
    raw = _raw_pairs(values)
    seen.append(raw[:, 0] - raw[:, 1] if norm == "diff_std" else raw.reshape(-1))
    std = np.concatenate(seen).std(ddof=1)
    np.testing.assert_allclose(m["p3o/reward_std"], std, rtol=1e-5)
    np.testing.assert_allclose(batch["pair_rewards"], raw / std, rtol=1e-5, atol=1e-6)


def test_without_normalisation_the_rewards_stay_raw():
  rollout, values = step_inputs(1)
  batch, m = rl_algos.ALGORITHMS["p3o"].batcher(settings("none")).build(rollout, values, W, 0)
  np.testing.assert_allclose(batch["pair_rewards"], _raw_pairs(values), rtol=1e-6)
  assert m == {}


def test_normaliser_state_resumes_from_a_checkpoint(tmp_path):
  """Steps 0-1, save, restore into a new batcher, steps 2-3: the batches of an uninterrupted run."""
  whole = rl_algos.ALGORITHMS["p3o"].batcher(settings("diff_std"))
  want = [whole.build(*step_inputs(s), W, s)[0]["pair_rewards"] for s in range(4)]
  first = rl_algos.ALGORITHMS["p3o"].batcher(settings("diff_std"))
  for s in range(2):
    first.build(*step_inputs(s), W, s)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ck"), async_save=False)
  ckpt.save(2, {"x": jax.numpy.zeros(2)}, {"step": 2}, host=first.host_state())
  ckpt.close()
  _, _, meta = checkpoint.Checkpointer(str(tmp_path / "ck")).restore_latest({"x": jax.numpy.zeros(2)})
  resumed = rl_algos.ALGORITHMS["p3o"].batcher(settings("diff_std"))
  resumed.load_host_state(meta["host"])
  for s in (2, 3):
    np.testing.assert_array_equal(resumed.build(*step_inputs(s), W, s)[0]["pair_rewards"], want[s])


def test_row_check_names_the_key():
  with pytest.raises(batches.SettingError, match="algo.p3o.reward_norm"):
    rl_algos.ALGORITHMS["p3o"].check(settings("running"))


def test_minibatches_keep_step_scalars_whole():
  rollout, values = step_inputs(0)
  batch, _ = rl_algos.ALGORITHMS["p3o"].batcher(settings("none")).build(rollout, values, W, 0)
  batch["kl_coef"] = np.float32(0.07)
  parts = batches.minibatches(batch, num_minibatches=2, unit=2, rng=np.random.default_rng(0))
  assert [float(p["kl_coef"]) for p in parts] == [np.float32(0.07)] * 2
  assert sum(p["pair_rewards"].shape[0] for p in parts) == B * G // 2
