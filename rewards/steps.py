"""Process rewards on the host: a completion split into steps, each step's end on the sampled tokens, step rewards.

Process supervision (DeepSeekMath, arXiv:2402.03300, Sec. 4.1.3; the advantages are ``algorithms.process``) needs,
for every completion, the rewards of its steps and index(j), the token where step j ends. Here:

Steps. A completion's text is split after each run of the separator (``algo.process.separator``, e.g. "\\n"):
a step is its text plus the separators that follow it, so the steps concatenate to the completion. Separators at
the very start join the first step, those at the very end the last one; an empty completion is one empty step.

Step ends on the tokens. The text is never encoded again (a re-encoding may split it into other tokens than the
ones sampled): the sampled ids are decoded as prefixes, the way the completion text itself was decoded, and a step
that ends at character e ends at the first token k whose prefix decode(ids[:k + 1]) starts with text[:e]: the
token that completes the step's last separator (a token holding the separator and the start of the next step
belongs to the earlier step). k is found by bisection, so a row costs O(steps * log T) prefix decodes; this
assumes that a longer prefix of ids decodes to a longer prefix of the text, which holds for SentencePiece and
byte-level BPE decoders (a split multi-byte character decodes as a replacement character, which is no prefix
of the text, until its last byte). Steps that end on the same token are merged into one (the token is the
unit of credit), and the last step ends at the completion's last token: its EOS when it has one.

Step rewards. A step reward function is called like any reward function (``rewards.combine``) with two more
keyword arguments, ``steps`` (per row, the list of its step texts) and ``step_ends`` (per row, the completion
token index where each step ends), and returns per row a sequence of one reward per step (ragged across rows;
NaN: the step is not scored, whatever ``allow_nan`` says). Several functions are summed per step with their weights
under the missing-value rule of ``combine.weighted_total``. A function that raises stops the run with a
``combine.RewardError`` under ``on_error="raise"`` and scores every step of the batch missing under "missing"; an
inf does the same for its row; an output without one value per step always stops the run.

The result is two fixed-width arrays, so that rollouts concatenate (``rlj.dynamic_sampling``) and minibatches
split them like any per-row array: ``step_rewards`` [N, T] (slot j: step j's reward, NaN past the last step)
and ``step_ends`` [N, T] int32 (-1 past the last step); a row has at most T steps since their ends differ.
"""
from __future__ import annotations

import dataclasses
import fractions
import logging
import re
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from rewards import combine, verifiable

_log = logging.getLogger(__name__)

STEP_KEYS = ("step_rewards", "step_ends")


def split_steps(text: str, separator: str) -> list[tuple[int, int]]:
  """The character spans ``(start, end)`` of the steps of ``text`` (module docstring); they tile the text."""
  if not separator:
    raise ValueError("the step separator must be a non-empty string")
  spans, start, i = [], 0, 0
  while True:
    j = text.find(separator, i)
    if j < 0:
      break
    end = j + len(separator)
    while text.startswith(separator, end):
      end += len(separator)
    if j > start and end < len(text):     # text before the separators, and text after them
      spans.append((start, end))
      start = end
    i = end
  spans.append((start, len(text)))
  return spans


def token_ends(decode: Callable[[Sequence[int]], str], ids: Sequence[int], text: str,
               char_ends: Iterable[int]) -> list[int]:
  """For each character end e (ascending), the index k of the first token with decode(ids[:k + 1]) starting
  with text[:e] (bisection; see the module docstring); len(ids) - 1 when no prefix covers it."""
  out, lo = [], 1
  n = len(ids)
  for e in char_ends:
    target = text[:e]
    hi = n
    lo = min(lo, n)
    while lo < hi:
      mid = (lo + hi) // 2
      if decode(ids[:mid]).startswith(target):
        hi = mid
      else:
        lo = mid + 1
    out.append(max(lo - 1, 0))
  return out


def completion_steps(decode: Callable[[Sequence[int]], str], completion: np.ndarray, mask: np.ndarray,
                     stop_ids: Iterable[int], separator: str) -> tuple[str, list[str], list[int]]:
  """One row: (its text, its step texts, the completion position where each step ends).

  ``completion`` [T] and ``mask`` [T] are the row's sampled ids and completion mask; the text is the decode of
  the masked ids before the first stop id (as ``rlj.data.stops.completion_text``). A row without completion
  tokens has no steps.
  """
  positions = np.flatnonzero(np.asarray(mask) != 0)
  if positions.size == 0:
    return "", [], []
  ids = [int(i) for i in np.asarray(completion)[positions]]
  stops = {int(s) for s in stop_ids}
  cut = next((k for k, i in enumerate(ids) if i in stops), len(ids))
  text = decode(ids[:cut])
  spans = split_steps(text, separator)
  ends = token_ends(decode, ids[:cut], text, [e for _, e in spans[:-1]]) + [len(ids) - 1]
  texts, where, start = [], [], 0
  for (_, e), k in zip(spans, ends):
    if where and k <= where[-1]:      # ends on the same token as the step before: one step
      texts[-1] += text[start:e]
    else:
      texts.append(text[start:e])
      where.append(k)
    start = e
  return text, texts, [int(positions[k]) for k in where]


@dataclasses.dataclass(frozen=True)
class StepRewards:
  """The step reward functions of a run (config ``algo.process``): ``[(name, fn)]`` as ``combine.build`` makes
  them, their weights [K] and the step separator."""
  reward_fns: Sequence[tuple[str, Any]]
  weights: np.ndarray
  separator: str

  def __call__(self, decode: Callable[[Sequence[int]], str], prompts: Sequence[str], completion: np.ndarray,
               mask: np.ndarray, *, stop_ids: Iterable[int], **batch) -> dict[str, np.ndarray]:
    """Rows [n] -> ``{"step_rewards": [n, T] float32, "step_ends": [n, T] int32}`` (module docstring).

    ``decode`` maps sampled ids to text as the completions were decoded; ``completion`` [n, T] and ``mask``
    [n, T] are the sampled completion ids and their mask; ``batch`` is passed on to every function.

    Raises:
      combine.RewardError: a function that raised or returned inf (``on_error="raise"``), or whose output does
        not have one value per step.
    """
    completion, mask = np.asarray(completion), np.asarray(mask)
    n, width = completion.shape
    stop_ids = tuple(int(s) for s in stop_ids)
    rows = [completion_steps(decode, c, m, stop_ids, self.separator) for c, m in zip(completion, mask)]
    texts, steps, ends = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
    values = np.full((n, width, len(self.reward_fns)), np.nan, np.float32)
    for k, (name, fn) in enumerate(self.reward_fns):
      for i, r in enumerate(_call(name, fn, list(prompts), texts, steps, ends, batch)):
        values[i, :len(r), k] = r
    step_ends = np.full((n, width), -1, np.int32)
    for i, e in enumerate(ends):
      step_ends[i, :len(e)] = e
    rewards = combine.weighted_total(values, self.weights)
    return {"step_rewards": np.where(step_ends >= 0, rewards, np.nan).astype(np.float32), "step_ends": step_ends}


def _call(name: str, fn, prompts: list, texts: list, steps: list, ends: list, batch) -> list[np.ndarray]:
  """One step reward function over the rows -> per row its step rewards (float32, one per step)."""
  on_error = getattr(fn, "on_error", "raise")

  def fault(message: str, i: int | None, cause=None):
    where = "on all rows" if i is None else f"on row {i} (completion {texts[i][:200]!r})"
    if on_error == "missing" and cause is not None:
      _log.warning("step reward %r %s %s; its steps are scored as missing (NaN)", name, message, where)
      return [np.full(len(s), np.nan, np.float32) for s in steps]
    raise combine.RewardError(f"step reward {name!r} {message} {where}", name=name, index=i,
                              prompt=None if i is None else prompts[i],
                              completion=None if i is None else texts[i]) from cause

  try:
    out = fn(prompts, texts, steps=steps, step_ends=ends, **batch)
  except Exception as e:  # noqa: BLE001 (any failure of user code is a fault to report)
    return fault(f"raised {type(e).__name__}: {e}", None, e)
  if len(out) != len(steps):
    return fault(f"returned {len(out)} rows, expected {len(steps)} (one sequence of step rewards per row)", None)
  rows = []
  for i, (r, s) in enumerate(zip(out, steps)):
    r = np.asarray(r, np.float32).reshape(-1)
    if r.shape != (len(s),):
      return fault(f"returned {r.size} step rewards for the {len(s)} steps of the row (steps split at "
                   f"algo.process.separator)", i)
    if np.isinf(r).any():
      if on_error != "missing":
        return fault(f"returned {r.tolist()}", i)
      _log.warning("step reward %r returned %s on row %d; its steps are scored as missing (NaN)", name, r.tolist(),
                   i)
      r = np.full_like(r, np.nan)
    rows.append(r)
  return rows


_EQUATION = re.compile(r"^\s*(-?\d+)\s*([-+*/])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")


def _holds(a: int, op: str, b: int, r: int) -> bool:
  if op == "/":
    return b != 0 and fractions.Fraction(a, b) == r
  return {"+": a + b, "-": a - b, "*": a * b}[op] == r


def arithmetic_steps(prompts, completions, *, steps, answers, **_) -> list[list[float]]:
  """A verifiable step reward for worked arithmetic (the synthetic task's answers, GSM8K style: one equation per
  line, then ``#### N``): a step ``a op b = r`` scores 1 when the equation holds, a step with ``#### N`` 1 when
  N is the reference's answer (``verifiable.extract_answer``), any other step 0. It checks each step's arithmetic
  alone, not that the step uses the previous result: an example of the interface more than a full grader."""
  del prompts, completions
  out = []
  for row, answer in zip(steps, answers):
    gold = verifiable.extract_answer(answer if isinstance(answer, str) else str(answer))
    scores = []
    for text in row:
      m = _EQUATION.match(text)
      if "####" in text:
        scores.append(float(gold is not None and verifiable.extract_answer(text) == gold))
      else:
        scores.append(float(m is not None and _holds(int(m.group(1)), m.group(2), int(m.group(3)),
                                                     int(m.group(4)))))
    out.append(scores)
  return out
