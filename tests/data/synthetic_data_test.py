"""Synthetic tasks: seeded determinism, exact arithmetic answers (checked by an independent parser)."""
import re

import pytest

from rlj.data import synthetic

_OPS = {"add": lambda a, b: a + b, "subtract": lambda a, b: a - b, "multiply by": lambda a, b: a * b,
        "divide by": lambda a, b: a / b}


def _solve(prompt):
  """Slow reference: reads the English prompt and evaluates it with exact fractions."""
  m = re.fullmatch(r"Start with (\d+)\. (.*)\. What is the result\?", prompt)
  assert m, prompt
  value = int(m.group(1))
  steps = m.group(2).split(", then ")
  for step in steps:
    op, b = re.fullmatch(r"(add|subtract|multiply by|divide by) (\d+)", step.lower()).groups()
    value = _OPS[op](value, int(b))
    assert value == int(value) and value >= 0  # exact, non-negative integers at every step
  return int(value), len(steps)


def test_answers_are_exact_and_worked_lines_check():
  for level in synthetic.LEVELS:
    task = synthetic.ArithmeticTask(60, seed=3, levels=(level,))
    for i in range(len(task)):
      rec = task[i]
      result, num_steps = _solve(rec["prompt"])
      assert num_steps == synthetic.LEVELS[level][0]
      assert synthetic.final_answer(rec["answer"]) == str(result)
      *lines, last = rec["answer"].split("\n")
      assert last == f"#### {result}" and len(lines) == num_steps
      for line in lines:
        a, op, b, r = re.fullmatch(r"(\d+) ([-+*/]) (\d+) = (\d+)", line).groups()
        assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b),
                "/": int(a) / int(b)}[op] == int(r)


def test_seeded_and_random_access():
  a = synthetic.ArithmeticTask(50, seed=1)
  b = synthetic.ArithmeticTask(50, seed=1)
  c = synthetic.ArithmeticTask(50, seed=2)
  forward = [a[i] for i in range(50)]
  assert [b[i] for i in reversed(range(50))] == forward[::-1]  # order of access does not matter
  assert sum(forward[i] != c[i] for i in range(50)) > 40
  assert [r["level"] for r in forward[:6]] == [1, 2, 3, 1, 2, 3]
  assert [r["index"] for r in forward] == list(range(50))
  with pytest.raises(IndexError):
    a[50]


def test_final_answer_parser():
  assert synthetic.final_answer("x = 3\n#### 72") == "72"
  assert synthetic.final_answer("#### 1,234\n") == "1234"
  assert synthetic.final_answer("#### -5") == "-5"
  assert synthetic.final_answer("the answer is 4") is None


def test_preference_task_follows_its_scorer():
  task = synthetic.PreferenceTask(200, seed=0)
  for i in range(len(task)):
    r = task[i]
    good = synthetic.number_score(r["prompt"], r["chosen"])
    bad = synthetic.number_score(r["prompt"], r["rejected"])
    assert good > bad and good - bad == r["margin"]
  assert synthetic.number_score("Name a number close to 10.", " 7.") == -3
  assert synthetic.number_score("Name a number close to 10.", " none") == float("-inf")
  assert task[5] == synthetic.PreferenceTask(200, seed=0)[5] != synthetic.PreferenceTask(200, seed=1)[5]
