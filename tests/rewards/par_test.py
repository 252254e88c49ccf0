"""Preference As Reward (rewards/par.py): the formula against a float64 loop, its bounds and its centre, missing
values, the settings, the reference cache through a checkpoint file, and the wrapper inside rewards.combine."""
import math
import warnings

import numpy as np
import pytest

from rewards import combine, par


def _loop(rewards, refs):
  """mean over the non-NaN references of 1 / (1 + exp(-(r - r_ref))), one row at a time, in float64."""
  out = []
  for r, row in zip(rewards, refs):
    terms = [1.0 / (1.0 + math.exp(-(r - x))) for x in row if not math.isnan(x)]
    out.append(math.nan if math.isnan(r) or not terms else sum(terms) / len(terms))
  return np.array(out)


def test_par_equals_its_formula_on_random_inputs():
  rng = np.random.default_rng(0)
  for m in (1, 3):
    r, refs = rng.normal(0, 3, 64), rng.normal(0, 3, (64, m))
    got = par.par_rewards(r, refs)
    assert got.dtype == np.float32 and got.shape == (64,)
    np.testing.assert_allclose(got, _loop(r, refs), rtol=1e-6, atol=1e-7)
  # Per prompt: [B, G] rewards against [B, 1, M] references, as the G rows of each prompt share its references.
  r, refs = rng.normal(size=(4, 5)), rng.normal(size=(4, 2))
  got = par.par_rewards(r, refs[:, None, :])
  assert got.shape == (4, 5)
  np.testing.assert_allclose(got.reshape(-1), _loop(r.reshape(-1), np.repeat(refs, 5, axis=0)), rtol=1e-6, atol=1e-7)


def test_par_is_bounded_and_the_reference_itself_scores_one_half():
  rng = np.random.default_rng(1)
  r, refs = rng.normal(0, 2, 2000), rng.normal(0, 2, (2000, 4))
  got = par.par_rewards(r, refs)
  assert np.all(got > 0) and np.all(got < 1)
  # Huge margins saturate (float32 rounds them to 0 or 1) without overflow or NaN.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    np.testing.assert_array_equal(par.par_rewards([1e6, -1e6], [[-1e6], [1e6]]), [1.0, 0.0])
  # The reference response itself: r(x, y) = r(x, y_ref) -> sigmoid(0) = 1/2, with one reference or M equal ones.
  np.testing.assert_array_equal(par.par_rewards(refs[:, 0], refs[:, :1]), 0.5)
  np.testing.assert_array_equal(par.par_rewards(r, np.repeat(r[:, None], 3, axis=1)), 0.5)
  # One reference: the preference of y over y_ref and of y_ref over y add to 1, and PAR grows with r.
  np.testing.assert_allclose(par.par_rewards(r, refs[:, :1]) + par.par_rewards(refs[:, 0], r[:, None]), 1.0,
                             atol=1e-6)
  ladder = par.par_rewards(np.linspace(-5, 5, 11), np.zeros((11, 2)))
  assert np.all(np.diff(ladder) > 0)


def test_a_nan_reward_stays_missing_and_nan_references_are_left_out():
  refs = np.array([[0.0, np.nan, 1.0], [np.nan, np.nan, np.nan], [2.0, 2.0, 2.0]])
  with warnings.catch_warnings():
    warnings.simplefilter("error")      # no "mean of empty slice" on the all-NaN row
    got = par.par_rewards(np.array([0.5, 0.5, np.nan]), refs)
  assert got[0] == par.par_rewards([0.5], [[0.0, 1.0]])[0]
  assert np.isnan(got[1]) and np.isnan(got[2])


def test_settings_defaults_and_choices():
  assert par.parse(True) == par.parse({}) == par.ParSettings(num_refs=1, decode="greedy", source="reference")
  assert par.parse(dict(num_refs=4, decode="sample", source="policy")) == par.ParSettings(4, "sample", "policy")


@pytest.mark.parametrize("section,key", [
    (dict(num_refs=0), "num_refs"), (dict(num_refs=2), "num_refs"), (dict(num_refs=2.0, decode="sample"), "num_refs"),
    (dict(num_refs=True), "num_refs"), (dict(decode="beam"), "decode"), (dict(source="sft"), "source"),
    (dict(refs=1), "refs"), (3, "")])
def test_bad_settings_name_their_key(section, key):
  with pytest.raises(par.ParSettingError) as info:
    par.parse(section)
  assert info.value.key == key and "\n" not in str(info.value)


def test_prompt_keys_and_the_cache_through_a_checkpoint_file(tmp_path):
  keys = [par.prompt_key("1+1", "2"), par.prompt_key("1+1", "3"), par.prompt_key("2+2")]
  assert len(set(keys)) == 3 and par.prompt_key("2+2", "") == keys[2] == par.prompt_key("2+2", None)
  cache = par.ReferenceCache(2)
  cache.put(keys, [[0.0, 1.0], [2.0, np.nan], [4.0, 5.0]])
  cache.put(keys[:1], [[9.0, 9.0]])                       # computed once: the first value stays
  np.savez(tmp_path / "host.npz", **{f"par/r/{k}": v for k, v in cache.host_state().items()})
  with np.load(tmp_path / "host.npz") as z:               # as rlj.checkpoint reads host state: no pickle
    host = {k[len("par/r/"):]: z[k] for k in z.files}
  restored = par.ReferenceCache(2)
  restored.load_host_state(host)
  assert len(restored) == 3
  np.testing.assert_array_equal(restored.get(keys), [[0.0, 1.0], [2.0, np.nan], [4.0, 5.0]])
  with pytest.raises(KeyError, match="no reference rewards for 1 prompt"):
    restored.get([par.prompt_key("3+3")])
  with pytest.raises(ValueError, match="num_refs=3"):
    par.ReferenceCache(3).load_host_state(host)
  empty = par.ReferenceCache(1)
  empty.load_host_state(par.ReferenceCache(1).host_state())
  assert len(empty) == 0 and empty.get([]).shape == (0, 1)


def _length(prompts, completions, **_):
  return np.array([len(c) for c in completions], np.float32)


def _picky(prompts, completions, **_):
  if "boom" in completions:
    raise ValueError("cannot score boom")
  return _length(prompts, completions)


def test_wrapper_in_combine_scores_each_row_against_its_prompt_references():
  (name, fn), = combine.build([{"name": "len", "fn": _length, "par": {}}])
  assert isinstance(fn, par.ParReward) and (fn.on_error, fn.allow_nan) == ("raise", True)
  fn.cache.put([par.prompt_key("p0", "a0"), par.prompt_key("p1", "a1")], [[3.0], [1.0]])
  out = combine.compute([(name, fn)], ["p0", "p0", "p1", "p1"], ["abc", "abcde", "a", ""], num_generations=2,
                        answers=["a0", "a0", "a1", "a1"])
  np.testing.assert_allclose(out.values[..., 0].reshape(-1), _loop([3, 5, 1, 0], [[3], [3], [1], [1]]), rtol=1e-6)
  assert out.values[0, 0, 0] == out.values[1, 0, 0] == 0.5      # as good as the reference
  with pytest.raises(combine.RewardError, match="no reference rewards"):   # a prompt never referenced
    combine.compute([(name, fn)], ["p2", "p2"], ["a", "b"], num_generations=2, answers=["a2", "a2"])


def test_wrapper_keeps_the_wrapped_fault_policy():
  (name, fn), = combine.build([{"name": "p", "fn": _picky, "on_error": "missing", "par": {}}])
  assert fn.on_error == "missing"
  fn.cache.put([par.prompt_key("p0", "a")], [[3.0]])
  out = combine.compute([(name, fn)], ["p0"] * 3, ["abc", "boom", "ab"], num_generations=3, answers=["a"] * 3)
  assert out.values[0, 0, 0] == 0.5 and np.isnan(out.values[0, 1, 0]) and out.errors == (1,)
  np.testing.assert_allclose(out.values[0, 2, 0], 1 / (1 + math.exp(1)), rtol=1e-6)


def test_bad_par_section_in_build_names_the_reward():
  with pytest.raises(ValueError, match=r"^reward 'x': par\.decode: 'beam'; choose greedy \| sample$"):
    combine.build([{"name": "x", "fn": _length, "par": {"decode": "beam"}}])
