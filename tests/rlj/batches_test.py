"""Batch building per algorithm row (against slow loops), minibatching, DNO replay and the reference swap."""
import jax.numpy as jnp
import numpy as np
import pytest

from rewards import combine
from rlj import batches, dno_replay, rl_algos

B, G, K, T, P = 3, 4, 2, 5, 3
ADV = dict(scale="group", eps=1e-4, ddof=1, estimator="grpo", win_rate=False)
DNO = dict(iteration_steps=2, replay=(0.5,), min_chosen_score=0.5, min_margin=0.5, max_pairs=2, win_rate=False)


def settings(**kw):
  base = dict(loss_kwargs={"kl_coef": 0.05}, options={"advantage": ADV, "dno": DNO}, num_generations=G,
              max_new_tokens=T, num_minibatches=2, seed=7, pad_id=0)
  return batches.Settings(**{**base, **kw})


def rollout(seed=0, rows=B * G, width=P + T):
  rng = np.random.default_rng(seed)
  return {"tokens": rng.integers(1, 50, (rows, width)).astype(np.int32),
          "attn_mask": np.ones((rows, width), np.int32), "mask": rng.integers(0, 2, (rows, T)).astype(np.float32),
          "old_logp": rng.normal(size=(rows, T)).astype(np.float32)}


def rewards(seed=0):
  v = np.random.default_rng(seed).integers(0, 3, (B, G, K)).astype(np.float32)
  v[0, 1] = np.nan            # a row with every component missing
  v[1, 2, 0] = np.nan         # one missing component
  return v


W = np.array([1.0, 0.5], np.float32)


def _weighted_loop(values):
  out = np.zeros(values.shape[:2], np.float32)
  for b in range(values.shape[0]):
    for g in range(values.shape[1]):
      comps = [w * x for w, x in zip(W, values[b, g]) if not np.isnan(x)]
      out[b, g] = sum(comps) if comps else np.nan
  return out


def test_weighted_total_missing_rule():
  np.testing.assert_allclose(combine.weighted_total(rewards(), W), _weighted_loop(rewards()), equal_nan=True)


def test_group_batch_rows_and_advantages_against_a_loop():
  ro, values = rollout(), rewards()
  batch, m = rl_algos.ALGORITHMS["grpo"].batcher(settings()).build(ro, values, W, 0)
  r = _weighted_loop(values)
  expected = np.zeros((B, G), np.float32)
  for b in range(B):
    ok = ~np.isnan(r[b])
    x = r[b][ok]
    if len(x) >= 2 and x.max() > x.min():
      expected[b][ok] = (x - x.mean()) / (x.std(ddof=1) + 1e-4)
  np.testing.assert_allclose(batch["adv"], expected.reshape(-1), rtol=1e-5, atol=1e-6)
  for k in batches.ROLLOUT_KEYS:
    if k in ro:
      np.testing.assert_array_equal(batch[k], ro[k])
  assert "ref_logp" not in batch and "is_weight" not in batch and m["adv/distinct"] >= 1
  # the on-policy rollout has no old_logp, a mismatch correction adds is_weight: both carried as they are
  on_policy = {**{k: v for k, v in ro.items() if k != "old_logp"}, "is_weight": np.ones_like(ro["mask"])}
  weighted, _ = rl_algos.ALGORITHMS["grpo"].batcher(settings()).build(on_policy, values, W, 0)
  assert "old_logp" not in weighted
  np.testing.assert_array_equal(weighted["is_weight"], on_policy["is_weight"])
  gdpo_batch, gm = rl_algos.ALGORITHMS["gdpo"].batcher(settings()).build(ro, values, W, 0)
  assert gdpo_batch["adv"].shape == (B * G,) and "adv/distinct_grpo_sum" in gm


def test_p3o_batch_pairs_adjacent_rows_with_missing_as_zero():
  ro, values = rollout(), rewards()
  batch, _ = rl_algos.ALGORITHMS["p3o"].batcher(settings()).build(ro, values, W, 0)
  r = np.nan_to_num(_weighted_loop(values), nan=0.0).reshape(-1)
  np.testing.assert_allclose(batch["pair_rewards"], [[r[2 * i], r[2 * i + 1]] for i in range(B * G // 2)])


def test_dno_pairs_against_a_brute_force_search():
  ro, values = rollout(), rewards()
  batch, _ = dno_replay.select_pairs(ro, values, W, min_chosen_score=0.5, min_margin=0.5, max_pairs=2,
                                     win_rate=False)
  scores = _weighted_loop(values)
  rows = batch["tokens"].reshape(B, 2, 2, -1)
  valid = batch["pair_valid"].reshape(B, 2)
  for b in range(B):
    s = scores[b]
    cands = sorted(((s[i] - s[j], i, j) for i in range(G) for j in range(G) if i != j and not np.isnan(s[i])
                    and not np.isnan(s[j]) and s[i] >= 0.5 and s[j] <= s[i] - 0.5), key=lambda c: -c[0])
    assert int(valid[b].sum()) == min(len(cands), 2)
    for m, (margin, i, j) in enumerate(cands[:2]):
      np.testing.assert_array_equal(rows[b, m, 0], ro["tokens"][b * G + i])
      np.testing.assert_array_equal(rows[b, m, 1], ro["tokens"][b * G + j])
      np.testing.assert_allclose(batch["pair_scores"][b * 2 + m][0] - batch["pair_scores"][b * 2 + m][1], margin)


@pytest.mark.parametrize("unit", [1, 2])
def test_minibatches_partition_whole_units_with_step_normalisers(unit):
  ro = rollout(1, rows=8)
  batch = {**ro, "adv": np.arange(8, dtype=np.float32)}
  if unit == 2:
    batch["pair_rewards"] = np.arange(8, dtype=np.float32).reshape(4, 2)
  mbs = batches.minibatches(batch, num_minibatches=2, unit=unit, rng=np.random.default_rng(0))
  seen = np.sort(np.concatenate([mb["adv"] for mb in mbs]))
  np.testing.assert_array_equal(seen, np.arange(8))            # every row exactly once
  for mb in mbs:
    assert mb["num_tokens"] == max(mb["mask"].sum(), 1.0)
    assert mb["num_seqs"] == max((mb["mask"].sum(-1) > 0).sum(), 1)
    if unit == 2:   # pairs stay adjacent and keep their per-pair entries
      np.testing.assert_array_equal(mb["adv"][1::2] - mb["adv"][::2], 1.0)
      np.testing.assert_array_equal(mb["pair_rewards"][:, 0], mb["adv"][::2])
  with pytest.raises(ValueError, match="num_minibatches=3"):
    batches.minibatches(batch, num_minibatches=3, unit=unit, rng=np.random.default_rng(0))


def test_dno_replay_reference_swap_and_host_state_round_trip():
  s = settings(num_minibatches=1)
  batcher = dno_replay.DnoBatcher(s)
  params = {"w": jnp.ones(3)}
  ref = {"w": jnp.zeros(3)}
  assert batcher.begin_step(0, params, ref) is ref and batcher.begin_step(1, params, ref) is ref
  b0, m0 = batcher.build(rollout(0), rewards(0), W, 0)
  b1, _ = batcher.build(rollout(1), rewards(1), W, 1)
  assert "dno/replay_pairs_1" not in m0 and b0["tokens"].shape[0] == B * 2 * 2
  kept = int(b0["pair_valid"].sum() + b1["pair_valid"].sum())
  new_ref = batcher.begin_step(2, params, ref)                    # iteration boundary: pi_1 becomes the reference
  np.testing.assert_array_equal(new_ref["w"], params["w"])
  assert new_ref["w"] is not params["w"] and len(batcher.history) == 1 and not batcher.current
  assert batcher.history[0]["pair_valid"].shape[0] == kept and batcher.history[0]["pair_valid"].all()
  saved = batcher.host_state()
  b2, m2 = batcher.build(rollout(2), rewards(2), W, 2)
  want = int(0.5 * B * 2)
  assert m2["dno/replay_pairs_1"] == want and b2["tokens"].shape[0] == (B * 2 + want) * 2
  other = dno_replay.DnoBatcher(s)
  other.load_host_state(saved)
  b2_again, _ = other.build(rollout(2), rewards(2), W, 2)         # the same replay draw after a resume
  for k in b2:
    np.testing.assert_array_equal(b2_again[k], b2[k])
  assert other.step_metrics(5) == {"dno/iteration": 2.0}


def test_rows_check_their_settings():
  with pytest.raises(batches.SettingError, match="sampler.num_generations"):
    rl_algos.get("p3o").check(settings(num_generations=3))
  with pytest.raises(batches.SettingError, match="algo.kwargs.kl_coef"):
    rl_algos.get("p3o").check(settings(loss_kwargs={"kl_coef": 0.0}))
  with pytest.raises(batches.SettingError, match="algo.advantage.scale"):
    rl_algos.get("grpo").check(settings(options={"advantage": {**ADV, "scale": "x"}, "dno": DNO}))
  with pytest.raises(batches.SettingError, match="algo.name.*choose one of"):
    rl_algos.get("ppo")
  assert rl_algos.get("grpo").uses_reference({"kl_coef": 0.0}) is False
  assert rl_algos.get("dno").uses_reference({}) is True
  assert rl_algos.get("grpo").loss_kwargs(settings()) == {"max_len": T, "kl_coef": 0.05}


@pytest.mark.parametrize("config_arg", [("grpo_tpu", "runlocal"), ("gdpo_tpu", "runlocal"), ("p3o_tpu", "runlocal"),
                                        ("dno_tpu", "runlocal"), ("gspo_tpu", "runlocal"),
                                        ("gspo_tpu", "runlocal,algo=cispo")])
def test_every_row_builds_the_minibatch_launch_aot_compiles(config_arg):
  """``launch.aot`` builds its example minibatch with the row's own batcher: every algorithm, no branch on names."""
  import importlib  # pylint: disable=g-import-not-at-top
  from launch import builders  # pylint: disable=g-import-not-at-top
  from launch.aot_tools import shapes  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"configs.{config_arg[0]}").get_config(config_arg[1])
  lc = builders.loop_config(config)
  prompts = config.train.batch_prompts
  mb = shapes.example_minibatch(config, lc, shapes.example_rollout(config, prompts * config.sampler.num_generations, 8),
                                prompts)
  assert mb["tokens"].shape[0] % lc.row.unit == 0 and "num_tokens" in mb
  assert ("ref_logp" in mb) == lc.use_reference
