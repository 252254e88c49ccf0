"""Process rewards on the host (``rewards.steps``): steps split at a separator, their ends on the sampled tokens
(never re-encoded), and step reward functions with ragged outputs."""
import numpy as np
import pytest

from rewards import combine, steps
from rlj.data import tokenizer as tok_lib


# A hand-built vocabulary: tokens that hold a separator and the start of the next step, or several steps.
VOCAB = {0: "", 1: "", 2: "a", 3: "b\n", 4: "\nc", 5: "\n", 6: "x\ny\nz", 7: "d"}     # 0 pad, 1 eos
PAD, EOS = 0, 1


def decode(ids):
  return "".join(VOCAB[int(i)] for i in ids)


def test_split_steps_tiles_the_text():
  cases = {
      ("ab\n\nc\nx", "\n"): ["ab\n\n", "c\n", "x"],
      ("\n\nab\ncd", "\n"): ["\n\nab\n", "cd"],          # leading separators join the first step
      ("ab\ncd\n\n", "\n"): ["ab\n", "cd\n\n"],          # trailing ones the last
      ("no separator", "\n"): ["no separator"],
      ("", "\n"): [""],                                   # an empty completion is one empty step
      ("a\n\n\n\nb", "\n\n"): ["a\n\n\n\n", "b"],
      ("a\n\n\nb", "\n\n"): ["a\n\n", "\nb"],
      ("1. x; 2. y; 3.", "; "): ["1. x; ", "2. y; ", "3."],
  }
  for (text, sep), want in cases.items():
    got = [text[s:e] for s, e in steps.split_steps(text, sep)]
    assert got == want, (text, sep)
    assert "".join(got) == text
  with pytest.raises(ValueError, match="non-empty"):
    steps.split_steps("a", "")


def test_step_ends_on_a_hand_built_vocabulary():
  # [a][b\n][\nc][\n][x\ny\nz][d][eos] [pad][pad] -> "ab\n\nc\nx\ny\nzd"
  row = np.array([2, 3, 4, 5, 6, 7, EOS, PAD, PAD])
  mask = (np.arange(9) < 7).astype(np.float32)
  text, texts, ends = steps.completion_steps(decode, row, mask, [EOS], "\n")
  assert text == "ab\n\nc\nx\ny\nzd"
  # "ab\n\n" ends in the token "\nc" (it completes the separator run); "x\n" and "y\n" end in the same token and
  # are one step; the last step ends at the EOS
  assert texts == ["ab\n\n", "c\n", "x\ny\n", "zd"]
  assert ends == [2, 3, 4, 6]
  # without an EOS (cut at the width) the last step ends at the last token, where "zd" is then the step's end
  _, texts, ends = steps.completion_steps(decode, row[:6], mask[:6], [EOS], "\n")
  assert (texts, ends) == (["ab\n\n", "c\n", "x\ny\n", "zd"], [2, 3, 4, 5])
  # only EOS: one empty step on it; no completion tokens: no steps
  assert steps.completion_steps(decode, np.array([EOS, PAD]), np.array([1, 0]), [EOS], "\n") == ("", [""], [0])
  assert steps.completion_steps(decode, np.array([PAD, PAD]), np.zeros(2), [EOS], "\n") == ("", [], [])


def test_step_ends_on_a_sentencepiece_tokenizer_with_split_characters():
  """A real SentencePiece model with byte fallback: "é" is two byte pieces, the first decodes as U+FFFD, so no
  prefix covers a boundary after it until both are in. The ids are the tokenizer's own; nothing is re-encoded."""
  tok = tok_lib.train(["step one: 1 + 1 = 2\nstep two: 2 + 2 = 4\n"] * 20, vocab_size=300)
  text = "step one: \u00e9\n\nstep two: 4\nend"
  ids = tok.encode(text) + [tok.eos_id, tok.pad_id]
  dec = lambda x: tok.decode(x, stop_at_eos=False)  # noqa: E731
  pieces = [dec(ids[:k]) for k in range(len(ids) + 1)]
  # independent: the first token after which the decoded prefix holds the step's text
  first = lambda prefix: next(k for k in range(len(ids)) if pieces[k + 1].startswith(prefix))  # noqa: E731
  mask = np.ones(len(ids), np.float32)
  mask[-1] = 0
  got_text, texts, ends = steps.completion_steps(dec, np.array(ids), mask, tok.eos_ids, "\n")
  assert got_text == text
  assert texts == ["step one: \u00e9\n\n", "step two: 4\n", "end"]
  assert ends == [first("step one: \u00e9\n\n"), first("step one: \u00e9\n\nstep two: 4\n"), len(ids) - 2]
  assert tok.id_to_piece(ids[ends[0]]) == "\n" and tok.id_to_piece(ids[ends[1]]) == "\n"
  # a step ending right after the split character ends on its second byte piece, not the first
  _, texts, ends = steps.completion_steps(dec, np.array(ids), mask, tok.eos_ids, "\u00e9")
  assert texts[0] == "step one: \u00e9" and pieces[ends[0]] == "step one: \ufffd"


def step_fn(prompts, completions, *, steps, step_ends, group_size, **_):
  """Per step: its length, and NaN for a step that starts with "c" (not scored)."""
  assert group_size == 2 and len(step_ends) == len(steps) == len(completions)
  return [[np.nan if s.startswith("c") else float(len(s)) for s in row] for row in steps]


def bonus_fn(prompts, completions, *, steps, **_):
  return [np.full(len(row), 0.5) for row in steps]


def test_step_rewards_weighted_per_step_in_fixed_width_arrays():
  completion = np.array([[2, 3, 4, 5, 6, 7, EOS], [2, 3, EOS, PAD, PAD, PAD, PAD], [PAD] * 7])
  mask = np.array([[1] * 7, [1, 1, 1, 0, 0, 0, 0], [0] * 7], np.float32)
  fns = combine.build([{"name": "len", "fn": step_fn, "weight": 2.0}, {"name": "bonus", "fn": bonus_fn}])
  sr = steps.StepRewards(fns, np.array([2.0, 1.0], np.float32), "\n")
  out = sr(decode, ["p"] * 3, completion, mask, stop_ids=[EOS], group_size=2)
  assert set(out) == set(steps.STEP_KEYS)
  assert out["step_rewards"].shape == out["step_ends"].shape == (3, 7)
  np.testing.assert_array_equal(out["step_ends"][0], [2, 3, 4, 6, -1, -1, -1])
  np.testing.assert_array_equal(out["step_ends"][1], [2, -1, -1, -1, -1, -1, -1])   # "ab\n": one step, to the EOS
  assert np.all(out["step_ends"][2] == -1)
  # 2 * len + 0.5; the "c\n" step: len is missing, the bonus alone counts (combine.weighted_total)
  np.testing.assert_allclose(out["step_rewards"][0, :4], [8.5, 0.5, 8.5, 4.5])
  np.testing.assert_allclose(out["step_rewards"][1, :1], [6.5])
  assert np.isnan(out["step_rewards"][0, 4:]).all() and np.isnan(out["step_rewards"][1, 1:]).all()
  assert np.isnan(out["step_rewards"][2]).all()


def test_step_reward_faults():
  completion, mask = np.array([[2, 3, 4, EOS]]), np.ones((1, 4), np.float32)

  def run(fn, on_error="raise"):
    sr = steps.StepRewards(combine.build([{"name": "s", "fn": fn, "on_error": on_error}]), np.ones(1), "\n")
    return sr(decode, ["p"], completion, mask, stop_ids=[EOS])

  with pytest.raises(combine.RewardError, match=r"step reward 's' returned 1 step rewards for the 2 steps"):
    run(lambda p, c, steps, **_: [[1.0]])
  with pytest.raises(combine.RewardError, match=r"returned 2 rows, expected 1"):
    run(lambda p, c, steps, **_: [[1.0, 2.0], [1.0]])
  with pytest.raises(combine.RewardError, match=r"raised ZeroDivisionError"):
    run(lambda p, c, steps, **_: 1 / 0)
  with pytest.raises(combine.RewardError, match=r"returned \[1.0, inf\]"):
    run(lambda p, c, steps, **_: [[1.0, np.inf]])
  assert np.isnan(run(lambda p, c, steps, **_: 1 / 0, on_error="missing")["step_rewards"]).all()
  out = run(lambda p, c, steps, **_: [[1.0, np.inf]], on_error="missing")
  assert np.isnan(out["step_rewards"]).all() and list(out["step_ends"][0, :2]) == [2, 3]


def test_arithmetic_steps_scores_each_equation_and_the_final_answer():
  rows = [["3 + 4 = 7\n", "7 * 2 = 15\n", "#### 14"], ["12 / 4 = 3\n", "junk\n", "#### 3"], ["5 - 6 = -1"]]
  got = steps.arithmetic_steps(["p"] * 3, ["".join(r) for r in rows], steps=rows,
                               answers=["3 + 4 = 7\n7 * 2 = 14\n#### 14", "#### 4", 0])
  assert got == [[1.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0]]
