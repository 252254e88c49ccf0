"""The environment interface of multi-turn rollouts (host side, plain Python, no jax).

An episode: ``reset(example)`` starts it from a dataset example (``{"prompt", "answer", "index"}``: the prompt as
the config's data section rendered it); it returns the first observation, or None when the first observation is
that prompt itself (the usual case: the G trajectories of a prompt then share one prefill). Then every model turn
goes to ``step``, which returns a ``StepResult``: the next observation's text (None or ``done`` ends the episode),
a reward for the turn, and counters for the metrics. The rollout (``rlj.agents.rollout``) turns an observation's
text into tokens with the turn markers of the chat template (``rlj.agents.observations``); the environment never
sees or makes token ids of its own except the model's turn as sampled.

Usage::

  class Guess(Environment):
    def reset(self, example):
      self.target = int(example["answer"])
    def step(self, turn):
      guess = int(turn.text.strip() or -1)
      if guess == self.target:
        return StepResult(done=True, reward=1.0)
      return StepResult(observation="higher" if guess < self.target else "lower")
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

COUNTERS = ("tool_calls", "tool_errors", "malformed_calls")


@dataclasses.dataclass(frozen=True)
class Turn:
  """One model turn as the environment sees it.

  Attributes:
    text: the turn decoded, up to (not including) an end-of-sequence token; a stop token that is not EOS (a
      ``</tool_call>`` marker) is part of the text.
    tokens: the ids exactly as sampled, the stop token included.
    stopped: the turn ended at a stop token (False: cut by ``max_new_tokens`` or the trajectory's budget).
    index: 0 for the first model turn.
  """
  text: str
  tokens: tuple[int, ...]
  stopped: bool
  index: int


@dataclasses.dataclass(frozen=True)
class StepResult:
  """What an environment answers to a turn: the next observation (None ends the episode, as does ``done``), the
  turn's reward and counters (``COUNTERS``: tool calls made, tool errors, malformed calls)."""
  observation: str | None = None
  reward: float = 0.0
  done: bool = False
  counts: Mapping[str, int] = dataclasses.field(default_factory=dict)

  @property
  def ends(self) -> bool:
    return self.done or self.observation is None


class Environment:
  """Base class: override ``step`` (and ``reset`` for per-episode state)."""

  def reset(self, example: Mapping) -> str | None:
    """Starts an episode; returns the first observation after the prompt, or None (the prompt is the first)."""
    del example
    return None

  def step(self, turn: Turn) -> StepResult:
    raise NotImplementedError


class SingleTurn(Environment):
  """Every episode ends after the model's first turn: a multi-turn rollout with it is a single-turn rollout."""

  def step(self, turn: Turn) -> StepResult:
    del turn
    return StepResult(done=True)
