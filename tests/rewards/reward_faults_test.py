"""Reward faults: a reward function that raises or returns a non-finite value is named with the offending row,
and its spec's ``on_error`` either stops the run or scores the row as missing (NaN) for the NaN-aware paths."""
import logging

import numpy as np
import pytest

from rewards import combine
from rlj import dno_replay, rl_algos

PROMPTS = combine.repeat_per_prompt(["1+1", "2+2", "3+3"], 2)
COMPLETIONS = ["2", "3", "4", "boom", "6", "7"]
ANSWERS = combine.repeat_per_prompt(["2", "4", "6"], 2)
ADV = dict(scale="group", eps=1e-4, ddof=1, estimator="grpo", win_rate=False)


def exact(prompts, completions, *, answers, **_):
  return np.array([float(c == a) for c, a in zip(completions, answers)], np.float32)


def fragile(prompts, completions, *, answers, **_):
  """Exact match that raises on one completion: the retry must slice ``answers`` row by row to score the rest."""
  if "boom" in completions:
    raise RuntimeError("cannot parse 'boom'")
  return exact(prompts, completions, answers=answers)


def nan_on_boom(prompts, completions, *, answers, **_):
  out = exact(prompts, completions, answers=answers)
  out[[c == "boom" for c in completions]] = np.nan
  return out


def batch_only_failure(prompts, completions, **_):
  if len(completions) > 1:
    raise MemoryError("batch too large")
  return np.ones(len(completions), np.float32)


def _compute(*specs):
  fns = combine.build([dict(name="ok", fn=exact)] + [dict(s) for s in specs])
  return combine.compute(fns, PROMPTS, COMPLETIONS, num_generations=2, answers=ANSWERS)


def test_raise_policy_names_function_and_sample():
  with pytest.raises(combine.RewardError) as info:
    _compute(dict(name="parse", fn=fragile))
  e = info.value
  msg = str(e)
  for part in ("'parse'", "RuntimeError", "cannot parse", "row 3", "'2+2'", "'boom'", "on_error='missing'"):
    assert part in msg, (part, msg)
  assert (e.name, e.index, e.prompt, e.completion) == ("parse", 3, "2+2", "boom")
  assert isinstance(e.__cause__, RuntimeError)


def test_missing_policy_scores_only_the_faulted_row_nan(caplog):
  clean = exact(PROMPTS, COMPLETIONS, answers=ANSWERS).reshape(3, 2)
  with caplog.at_level(logging.WARNING, logger="rewards.combine"):
    out = _compute(dict(name="parse", fn=fragile, on_error="missing"))
  parse = out.component("parse")
  assert np.isnan(parse[1, 1]) and np.isnan(parse).sum() == 1
  keep = ~np.isnan(parse)
  np.testing.assert_array_equal(parse[keep], clean[keep])      # the other rows scored with their own answers
  np.testing.assert_array_equal(out.component("ok"), clean)    # other components untouched
  assert out.errors == (0, 1)
  assert out.fault_metrics() == {"reward/ok/errors": 0.0, "reward/parse/errors": 1.0}
  warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warned) == 1 and "'parse'" in warned[0] and "row 3" in warned[0] and "'boom'" in warned[0]


def test_nan_return_is_a_fault_only_when_not_allowed(caplog):
  with caplog.at_level(logging.WARNING, logger="rewards.combine"):
    allowed = _compute(dict(name="na", fn=nan_on_boom))      # default: NaN means "does not apply"
  assert np.isnan(allowed.component("na")[1, 1]) and allowed.errors == (0, 0) and not caplog.records
  with pytest.raises(combine.RewardError, match=r"'strict' returned nan on row 3 \(prompt '2\+2', completion 'boom'"):
    _compute(dict(name="strict", fn=nan_on_boom, allow_nan=False))
  with caplog.at_level(logging.WARNING, logger="rewards.combine"):
    missing = _compute(dict(name="strict", fn=nan_on_boom, allow_nan=False, on_error="missing"))
  np.testing.assert_array_equal(np.isnan(missing.component("strict")), np.isnan(allowed.component("na")))
  assert missing.errors == (0, 1)
  assert any("'strict' returned nan on row 3" in r.getMessage() for r in caplog.records)


def test_inf_is_always_a_fault():
  def inf_on_boom(prompts, completions, **_):
    return np.array([np.inf if c == "boom" else 0.5 for c in completions])
  with pytest.raises(combine.RewardError, match="returned inf on row 3"):
    _compute(dict(name="inf", fn=inf_on_boom))
  out = _compute(dict(name="inf", fn=inf_on_boom, on_error="missing"))
  np.testing.assert_array_equal(out.component("inf"), [[0.5, 0.5], [0.5, np.nan], [0.5, 0.5]])


def test_batch_level_failure_when_every_row_alone_succeeds(caplog):
  with pytest.raises(combine.RewardError, match="MemoryError.*each row alone succeeded.*on all 6 rows") as info:
    _compute(dict(name="big", fn=batch_only_failure))
  assert info.value.index is None
  with caplog.at_level(logging.WARNING, logger="rewards.combine"):
    out = _compute(dict(name="big", fn=batch_only_failure, on_error="missing"))
  assert np.isnan(out.component("big")).all() and out.errors == (0, 6)
  warned = [r.getMessage() for r in caplog.records]
  assert len(warned) == 4 and "3 more of 6 rows" in warned[-1]   # three rows named, the rest counted


def test_read_only_outputs_are_accepted():
  """Device results come back as read-only arrays; the faulted rows are still overwritten in a copy."""
  def frozen(prompts, completions, **_):
    out = np.array([np.inf if c == "boom" else 1.0 for c in completions], np.float32)
    out.flags.writeable = False
    return out
  out = _compute(dict(name="frozen", fn=frozen, on_error="missing"))
  np.testing.assert_array_equal(out.component("frozen"), [[1, 1], [1, np.nan], [1, 1]])


def test_unknown_policy_and_shape_errors_are_not_faults():
  with pytest.raises(ValueError, match="on_error='skip'"):
    combine.build([dict(name="x", fn="format", on_error="skip")])
  with pytest.raises(ValueError, match="returned shape"):
    _compute(dict(name="short", fn=lambda p, c, **_: np.ones(2), on_error="missing"))


def test_grpo_leaves_a_missing_row_out_of_its_group():
  """One component: the faulted row's summed reward is NaN, its advantage 0, its group normalised without it."""
  fns = combine.build([dict(name="parse", fn=fragile, on_error="missing")])
  prompts, comps = combine.repeat_per_prompt(["q"], 3), ["4", "5", "boom"]
  out = combine.compute(fns, prompts, comps, num_generations=3, answers=["4"] * 3)
  adv = rl_algos.advantages("grpo", out.values, np.ones(1, np.float32), ADV)
  a = 0.5 / (np.std([1.0, 0.0], ddof=1) + 1e-4)       # the two scored rows: rewards 1 and 0
  np.testing.assert_allclose(adv, [[a, -a, 0.0]], rtol=1e-5)


def test_gdpo_treats_a_missing_reward_as_not_applicable():
  """GDPO normalises each component over its valid rows of a group; with G = 2 a group left with one valid value
  contributes 0, exactly as if that component were constant there, and the other component still counts."""
  def second(prompts, completions, **_):
    return np.array([len(c) / 4 + i % 3 for i, c in enumerate(completions)], np.float32)
  out = _compute(dict(name="parse", fn=fragile, on_error="missing"), dict(name="len", fn=second))
  w = np.array([1.0, 1.0, 0.5], np.float32)
  kw = dict(ADV)
  adv = rl_algos.advantages("gdpo", out.values, w, kw)
  assert np.isfinite(adv).all()
  constant = out.values.copy()
  constant[1, :, 1] = 7.0                              # the faulted group's "parse" values made constant
  np.testing.assert_allclose(adv, rl_algos.advantages("gdpo", constant, w, kw), rtol=1e-5, atol=1e-6)
  zero = out.values.copy()
  zero[1, 1, 1] = 0.0                                  # scoring the fault 0 instead would change group 1
  assert not np.allclose(adv[1], rl_algos.advantages("gdpo", zero, w, kw)[1], atol=1e-3)
  assert abs(adv[1, 1]) > 0.1                          # the faulted row still has the other components' signal


def test_the_config_key_reaches_compute():
  """``rewards[i].on_error`` / ``allow_nan`` in a job config pass validation and set the built function's policy."""
  from configs import grpo_tpu
  from launch import checks, reward_setup
  c = grpo_tpu.get_config("runlocal")
  c.rewards = ({"name": "correct", "fn": "math_exact_match"},
               {"name": "parse", "fn": "math_exact_match", "on_error": "missing", "allow_nan": False})
  checks.validate(c)
  fns = dict(combine.build(reward_setup.reward_specs(c)))
  assert (fns["correct"].on_error, fns["correct"].allow_nan) == ("raise", True)
  assert (fns["parse"].on_error, fns["parse"].allow_nan) == ("missing", False)


def test_dno_pairs_leave_out_completions_with_a_missing_reward():
  """A NaN (missing) reward puts its completion in no pair; the pair scores stay finite."""
  b, g, t = 2, 4, 3
  values = np.array([[[1.0], [0.0], [np.nan], [0.5]], [[np.nan], [np.nan], [2.0], [0.0]]], np.float32)
  rollout = {"tokens": np.arange(b * g * t).reshape(b * g, t), "attn_mask": np.ones((b * g, t), np.int32),
             "mask": np.ones((b * g, t), np.float32)}
  batch, _ = dno_replay.select_pairs(rollout, values, np.ones(1, np.float32), min_chosen_score=-10.0, min_margin=0.1,
                                max_pairs=3, win_rate=False)
  valid = batch["pair_valid"] > 0
  assert valid.any() and np.isfinite(batch["pair_scores"]).all()
  used = batch["tokens"][:, 0].reshape(-1, 2)[valid] // t    # row index of each chosen / rejected completion
  assert not set(used.ravel()) & {2, 4, 5}
  best = batch["pair_scores"][valid]
  assert (best[:, 0] > best[:, 1]).all()
