"""Synthetic datasets generated from a seed, so a local run needs no files.

``ArithmeticTask``: multi-step integer arithmetic with exact answers, written like GSM8K (worked steps,
then ``#### N``), in difficulty levels. ``PreferenceTask``: preference pairs whose ground truth is a known
scorer (``number_score``), for reward-model tests. Both are random-access sources (``len``, ``[i]``) with
the record schema of the tfds builders (``prompt``/``answer``/``index``; ``prompt``/``chosen``/
``rejected``/``index``), so they plug into the same grain pipelines.

Record ``i`` depends only on ``(seed, i)`` (``np.random.default_rng([seed, i])``), never on what was read
before, so any subset, order or number of workers sees the same records.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

# Level -> (number of operations, largest operand). Level 1 is one addition-sized step; level 5 chains five.
LEVELS = {1: (1, 10), 2: (2, 20), 3: (3, 50), 4: (4, 100), 5: (5, 200)}
_WORDS = {"+": "add {b}", "-": "subtract {b}", "*": "multiply by {b}", "/": "divide by {b}"}
_FINAL = re.compile(r"####\s*(-?[\d,]+(?:\.\d+)?)\s*$")


def final_answer(answer: str) -> str | None:
  """The number after ``####`` at the end of a GSM8K-style answer, commas removed; None if absent."""
  m = _FINAL.search(answer.strip())
  return None if m is None else m.group(1).replace(",", "")


def _step(rng: np.random.Generator, value: int, max_operand: int) -> tuple[str, int, int]:
  """One operation on ``value``: (op, operand, result), results stay non-negative integers."""
  ops = ["+", "*"] + (["-"] if value > 1 else []) + (["/"] if value > 1 else [])
  op = ops[int(rng.integers(len(ops)))]
  if op == "+":
    b = int(rng.integers(1, max_operand + 1))
    return op, b, value + b
  if op == "-":
    b = int(rng.integers(1, min(value, max_operand) + 1))
    return op, b, value - b
  if op == "*":
    b = int(rng.integers(2, min(max_operand, 12) + 1))
    return op, b, value * b
  divisors = [d for d in range(2, min(value, max_operand) + 1) if value % d == 0]
  if not divisors:  # a prime (or 1): add instead
    b = int(rng.integers(1, max_operand + 1))
    return "+", b, value + b
  b = divisors[int(rng.integers(len(divisors)))]
  return op, b, value // b


def arithmetic_problem(seed: int, index: int, level: int) -> dict:
  """The ``index``-th problem of a level: prompt, worked answer ending ``#### N``, and the steps."""
  if level not in LEVELS:
    raise ValueError(f"unknown level {level}; choose one of {sorted(LEVELS)}")
  num_ops, max_operand = LEVELS[level]
  rng = np.random.default_rng([seed, index, level])
  value = int(rng.integers(1, max_operand + 1))
  start, steps = value, []
  for _ in range(num_ops):
    op, b, result = _step(rng, value, max_operand)
    steps.append((value, op, b, result))
    value = result
  words = ", then ".join(_WORDS[op].format(b=b) for _, op, b, _ in steps)
  prompt = f"Start with {start}. {words[0].upper()}{words[1:]}. What is the result?"
  lines = [f"{a} {op} {b} = {r}" for a, op, b, r in steps]
  answer = "\n".join(lines + [f"#### {value}"])
  return {"prompt": prompt, "answer": answer, "result": value, "steps": steps}


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
  """``num_records`` arithmetic problems; record ``i`` has level ``levels[i % len(levels)]``.

  Records: ``{"prompt": str, "answer": str (GSM8K style), "index": int, "level": int}``.
  """
  num_records: int
  seed: int = 0
  levels: tuple[int, ...] = (1, 2, 3)

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict:
    index = _check_index(index, self.num_records)
    level = self.levels[index % len(self.levels)]
    p = arithmetic_problem(self.seed, index, level)
    return {"prompt": p["prompt"], "answer": p["answer"], "index": index, "level": level}


_NUMBER = re.compile(r"-?\d+")


def number_score(prompt: str, response: str) -> float:
  """Ground-truth scorer of ``PreferenceTask``: ``-|x - target|``, x = first integer in the response,
  target = first integer in the prompt; a response without an integer scores ``-inf``."""
  target = _NUMBER.search(prompt)
  x = _NUMBER.search(response)
  if target is None:
    raise ValueError(f"prompt has no target number: {prompt!r}")
  return float("-inf") if x is None else -abs(int(x.group()) - int(target.group()))


@dataclasses.dataclass(frozen=True)
class PreferenceTask:
  """Pairs of answers to "name a number close to T"; ``chosen`` scores strictly higher under
  ``number_score`` (no ties).

  Records: ``{"prompt", "chosen", "rejected": str, "index": int, "margin": int}`` (margin = score gap).
  """
  num_records: int
  seed: int = 0
  max_target: int = 100

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict:
    index = _check_index(index, self.num_records)
    rng = np.random.default_rng([self.seed, index, 7])
    target = int(rng.integers(0, self.max_target + 1))
    near, far = sorted(rng.choice(self.max_target // 2, size=2, replace=False).tolist())
    signs = rng.choice([-1, 1], size=2)
    good, bad = target + int(signs[0]) * near, target + int(signs[1]) * far
    prompt = f"Name a number close to {target}."
    return {"prompt": prompt, "chosen": f" {good}.", "rejected": f" {bad}.", "index": index,
            "margin": far - near}


def _check_index(index: int, n: int) -> int:
  index = int(index)
  if not 0 <= index < n:
    raise IndexError(f"record {index} out of range [0, {n})")
  return index
