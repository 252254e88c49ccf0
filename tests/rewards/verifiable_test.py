"""Verifiable rewards: GSM8K extraction on every reference answer, normalisation, malformed input, format, length."""
import json
import pathlib

import numpy as np
import pytest

from rewards import verifiable

_GSM8K = pathlib.Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "gsm8k" / "test.jsonl"


def _gsm8k_rows():
  if not _GSM8K.exists():
    pytest.skip(f"GSM8K test split not found at <repo>/../shared/data/gsm8k/test.jsonl ({_GSM8K})")
  return [json.loads(line) for line in _GSM8K.read_text().splitlines() if line.strip()]


def test_every_gsm8k_reference_answer():
  rows = _gsm8k_rows()
  assert len(rows) == 1319
  for i, row in enumerate(rows):
    body, ref = row["answer"].rsplit("####", 1)
    ref = ref.strip()
    gold = str(int(ref.replace(",", "")))          # independent parse: GSM8K finals are integers
    variants = {
        "reference": row["answer"],
        "boxed": body + f"So the answer is \\boxed{{{ref}}}.",
        "last_number": body + f"The final answer is ${ref}.",
    }
    for kind, text in variants.items():
      assert verifiable.extract_answer(text) == gold, (i, kind, text[-120:])
  ones = verifiable.math_exact_match([""] * len(rows), [r["answer"] for r in rows], answers=[r["answer"] for r in rows])
  assert ones.dtype == np.float32 and ones.sum() == len(rows)


@pytest.mark.parametrize("text, expected", [
    ("#### 18", "18"),
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("profit: $70,000.", "70000"),
    ("#### 1,450,000", "1450000"),
    ("#### -10", "-10"),
    ("it drops by \u22127 degrees", "-7"),
    ("costs 18.50 dollars", "37/2"),
    ("exactly 12.0", "12"),
    ("a share of 3/4.", "3/4"),
    ("so \\boxed{\\frac{3}{4}}", "3/4"),
    ("\\boxed{\\dfrac12}", "1/2"),
    ("\\boxed{\\text{18 apples}}", "18"),
    ("\\boxed{x = -2.50}", "-5/2"),
    ("\\boxed{\\$1{,}000}", "1000"),
    ("first \\boxed{4} then \\boxed{5}", "5"),
    ("#### 5 then later 7", "5"),
    ("1, 2, 3", "3"),
    ("about .5 of it", "1/2"),
    ("50%", "50"),
    ("The answer is 0.25", "1/4"),
])
def test_extract_answer_normalises(text, expected):
  assert verifiable.extract_answer(text) == expected


@pytest.mark.parametrize("text", [
    "", "   ", "no numbers here", "#### banana", "#### ", "\\boxed{", "\\boxed{}", "\\boxed{abc}",
    "\\frac{1}{0}", "#### 5/0", None, 42, b"#### 18", ["#### 18"], "\x00\x01", "####" * 1000, "{" * 500,
])
def test_malformed_completions_give_none_and_zero(text):
  assert verifiable.extract_answer(text) is None
  assert verifiable.math_exact_match([""], [text], answers=["#### 18"])[0] == 0.0


def test_math_exact_match_against_bare_and_full_references():
  got = verifiable.math_exact_match(
      [""] * 5, ["x #### 1,000", "\\boxed{0.5}", "I think 3", "#### 4", "#### 7"],
      answers=["1000", "#### 1/2", 3, "#### four", "#### 8"])
  np.testing.assert_array_equal(got, [1, 1, 1, 0, 0])
  with pytest.raises(ValueError):
    verifiable.math_exact_match([""], ["#### 1"])
  with pytest.raises(ValueError):
    verifiable.math_exact_match([""] * 2, ["#### 1"] * 2, answers=["1"])


def test_format_reward_styles():
  comps = ["work\n#### 42", "work\n#### 42 apples", "\\boxed{42}", "\\boxed{x}", "<think>a</think><answer>4</answer>",
           "<think>a</think> junk <answer>4</answer>", None]
  np.testing.assert_array_equal(verifiable.format_reward([""] * 7, comps, style="gsm8k"), [1, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(verifiable.format_reward([""] * 7, comps, style="boxed"), [0, 0, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(verifiable.format_reward([""] * 7, comps, style="think_answer"), [0, 0, 0, 0, 1, 0, 0])
  with pytest.raises(ValueError):
    verifiable.format_reward([""], ["x"], style="xml")


def test_length_penalty_dapo_piecewise():
  lengths = [0, 12, 16, 17, 18, 20, 21, 100]
  got = verifiable.length_penalty([""] * 8, [""] * 8, lengths=lengths, max_len=20, cache_len=4)
  ref = [0.0 if n <= 16 else ((16 - n) / 4 if n <= 20 else -1.0) for n in lengths]
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  assert got.dtype == np.float32
  with pytest.raises(ValueError):
    verifiable.length_penalty([""], [""], lengths=[1], max_len=4, cache_len=8)
