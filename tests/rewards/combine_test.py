"""Reward combination: [B, G, K] stacking with names, built-ins, user functions by import string, weights."""
import textwrap

import numpy as np
import pytest

from rewards import combine, verifiable


def test_builtins_stack_group_major():
  prompts = ["p0", "p1"]
  answers = combine.repeat_per_prompt(["#### 3", "#### 5"], 3)
  comps = ["#### 3", "so 4", "\\boxed{3}", "#### 5", "#### 6", "five"]
  fns = combine.build([
      {"name": "correct", "fn": "math_exact_match"},
      combine.RewardSpec(name="fmt", fn="format", kwargs={"style": "gsm8k"}, weight=0.5),
      {"name": "len", "fn": "length_penalty", "kwargs": {"max_len": 8, "cache_len": 4}},
  ])
  out = combine.compute(fns, combine.repeat_per_prompt(prompts, 3), comps, num_generations=3, answers=answers,
                        lengths=[1, 2, 5, 6, 8, 9])
  assert out.names == ("correct", "fmt", "len")
  assert out.values.shape == (2, 3, 3) and out.values.dtype == np.float32
  np.testing.assert_array_equal(out.component("correct"), [[1, 0, 1], [1, 0, 0]])
  np.testing.assert_array_equal(out.component("fmt"), [[1, 0, 0], [1, 1, 0]])
  np.testing.assert_allclose(out.component("len"), [[0, 0, -0.25], [-0.5, -1, -1]])
  # Row b * G + g is completion g of prompt b: the flat columns reshape back.
  np.testing.assert_array_equal(out.values.reshape(6, 3)[:, 0],
                                verifiable.math_exact_match(None, comps, answers=answers))
  w = combine.weights_of([{"name": "correct", "fn": "x"}, combine.RewardSpec("fmt", "format", weight=0.5)])
  assert w == {"correct": 1.0, "fmt": 0.5}
  np.testing.assert_allclose(combine.weighted_sum(out, w), out.values[..., 0] + 0.5 * out.values[..., 1])
  np.testing.assert_allclose(combine.weighted_sum(out, [1.0, 0.0, 2.0]), out.values[..., 0] + 2 * out.values[..., 2])


def test_user_function_by_import_string(tmp_path, monkeypatch):
  (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
      import numpy as np
      def count_token(prompts, completions, *, token="a", **_):
        return np.array([c.count(token) for c in completions], np.float32)
      def not_applicable(prompts, completions, **_):
        return np.array([np.nan if p == "skip" else 1.0 for p in prompts])
      class Scorers:
        @staticmethod
        def length(prompts, completions, **_):
          return [len(c) for c in completions]
      CONSTANT = 3
  """))
  monkeypatch.syspath_prepend(str(tmp_path))
  fns = combine.build([{"name": "a", "fn": "my_rewards:count_token"},
                       {"name": "b", "fn": "my_rewards:count_token", "kwargs": {"token": "b"}},
                       {"name": "na", "fn": "my_rewards:not_applicable"},
                       {"name": "len", "fn": "my_rewards:Scorers.length"},
                       {"name": "ex", "fn": "rewards.verifiable:math_exact_match"}])
  out = combine.compute(fns, ["q", "skip"], ["aab", "b"], num_generations=2, answers=["2", "b"])
  np.testing.assert_array_equal(out.values[0, :, 0], [2, 0])
  np.testing.assert_array_equal(out.values[0, :, 1], [1, 1])
  assert out.values[0, 0, 2] == 1.0 and np.isnan(out.values[0, 1, 2])
  np.testing.assert_array_equal(out.values[0, :, 3], [3, 1])
  np.testing.assert_array_equal(out.values[0, :, 4], [0, 0])
  np.testing.assert_allclose(combine.weighted_sum(out, {"na": 1.0}), [[1.0, 0.0]])   # NaN counts 0
  with pytest.raises(ValueError, match="non-callable"):
    combine.resolve("my_rewards:CONSTANT")
  with pytest.raises(AttributeError):
    combine.resolve("my_rewards:missing")
  with pytest.raises(ImportError):
    combine.resolve("no_such_module_xyz:f")


@pytest.mark.parametrize("bad", ["__import__('os').system('true')", "os:system; rm", "lambda p, c: 1", "nope", 3])
def test_malformed_specs_are_rejected_not_evaluated(bad):
  with pytest.raises(ValueError):
    combine.resolve(bad)


def test_validation_errors():
  good = [("one", lambda p, c, **_: np.ones(len(c)))]
  with pytest.raises(ValueError, match="twice"):
    combine.build([{"name": "x", "fn": "format"}, {"name": "x", "fn": "format"}])
  with pytest.raises(TypeError):
    combine.build([{"name": "x", "fn": "format", "colour": 1}])
  with pytest.raises(ValueError, match="divide"):
    combine.compute(good, ["p"] * 3, ["c"] * 3, num_generations=2)
  with pytest.raises(ValueError, match="shape"):
    combine.compute([("bad", lambda p, c, **_: np.ones((len(c), 2)))], ["p"] * 2, ["c"] * 2, num_generations=2)
  with pytest.raises(ValueError, match="inf"):
    combine.compute([("inf", lambda p, c, **_: np.full(len(c), np.inf))], ["p"] * 2, ["c"] * 2, num_generations=2)
  with pytest.raises(ValueError, match="unknown"):
    combine.weighted_sum(combine.compute(good, ["p"] * 2, ["c"] * 2, num_generations=2), {"two": 1.0})
