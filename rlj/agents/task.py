"""The built-in tool-use task: multi-digit multiplication that a tiny model cannot compute unaided.

``CalculatorTask`` records are ``{"prompt": "What is 37 * 48?", "answer": <demonstration>, "index"}``. The
demonstration (the SFT stage's target) is one of two kinds, chosen per record with probability ``tool_fraction``:

- a tool-using one: a call of the calculator, its result as the tool's observation, then the final answer (one
  line in the record)::

    <tool_call>{"name": "calculator", "arguments": {"expression": "37 * 48"}}</tool_call>
    <tool_response>1776</tool_response>#### 1776

- a direct one: ``#### 1776`` (right, but the model cannot learn to compute it).

So after SFT the policy calls the tool on some prompts and guesses on others; the reward (exact match of the
``####`` answer) can only be earned reliably by calling the tool, which RL has to find out. The observation part
(``<tool_response>...</tool_response>``) is what the environment writes during rollouts: the SFT stage masks it out
of the loss (``skip_spans``). Record ``i`` depends only on ``(seed, i)``.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np

from rlj.agents.calculator import calculator


def call_text(expression: str, *, open: str = "<tool_call>", close: str = "</tool_call>") -> str:
  """A calculator call in the default call format."""
  return f'{open}{json.dumps({"name": "calculator", "arguments": {"expression": expression}})}{close}'


@dataclasses.dataclass(frozen=True)
class CalculatorTask:
  """``num_records`` multiplication problems with ``digits`` = (digits of a, digits of b).

  Attributes:
    tool_fraction: the fraction of demonstrations that call the calculator (the rest answer directly).
    observation_template: how the tool's result appears in a demonstration (the rollout's observation template).
  """
  num_records: int
  seed: int = 0
  digits: tuple[int, int] = (2, 2)
  tool_fraction: float = 0.5
  observation_template: str = "<tool_response>{observation}</tool_response>"

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < self.num_records:
      raise IndexError(f"record {index} out of range [0, {self.num_records})")
    rng = np.random.default_rng([self.seed, index, 31])
    a, b = (int(rng.integers(10 ** (d - 1), 10 ** d)) for d in self.digits)
    expression = f"{a} * {b}"
    result = calculator(expression)
    if rng.random() < self.tool_fraction:
      answer = (call_text(expression) + self.observation_template.format(observation=result) + f"#### {result}")
    else:
      answer = f"#### {result}"
    return {"prompt": f"What is {expression}?", "answer": answer, "index": index}
