"""Rule-based verifiable rewards on the host: math answer extraction, exact match, format and length.

Every function parses text with regular expressions and ``fractions.Fraction``; model output is never
evaluated as code. Malformed input gives ``None`` (extraction) or reward 0, never an exception.

Reward functions share one calling convention so ``rewards.combine`` can stack them:
``fn(prompts: list[str], completions: list[str], **batch) -> np.ndarray [N] float32``, where ``batch`` holds
per-row metadata such as ``answers`` (reference solutions) or ``lengths`` (completion token counts); each
function takes the keys it needs and ignores the rest.
"""
from __future__ import annotations

import fractions
import re
from typing import Any, Sequence

import numpy as np

# A number as written in math answers: thousands separators only in groups of three, optional decimals,
# optional leading minus (ASCII or Unicode), or a bare leading-dot decimal.
_NUM = r"[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-\u2212]?\.\d+"
_NUM_RE = re.compile(rf"(?<![\w.])(?:{_NUM})(?:\s*/\s*(?:{_NUM}))?")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*(?:\{([^{}]*)\}\s*\{([^{}]*)\}|(\d)\s*(\d))")
_HASH_RE = re.compile(r"####\s*([^\n]*)")
_WRAPPERS_RE = re.compile(r"\\(?:text|mathrm|textbf|mbox)\s*\{([^{}]*)\}")
_STRIP_CHARS = "$€£¥₹ \t\n\r"


def parse_number(text: Any) -> fractions.Fraction | None:
  """Parses one number: ``1,234``, ``-3``, ``18.50``, ``$5``, ``3/4``, ``\\frac{3}{4}``, ``50%`` -> Fraction.

  Commas between digit groups, currency symbols, a trailing period, ``\\text{}`` wrappers and a percent sign
  (kept as its number: ``50%`` -> 50) are removed. Returns None unless the whole (cleaned) text is one number.
  """
  if not isinstance(text, str):
    return None
  s = _WRAPPERS_RE.sub(r"\1", text).strip()
  s = s.replace("\\$", "$").replace("\\%", "%").replace("\\!", "").replace("{,}", ",")
  s = s.strip(_STRIP_CHARS).rstrip(".").rstrip("%").strip(_STRIP_CHARS)
  m = _FRAC_RE.fullmatch(s)
  if m:
    num, den = (parse_number(g) for g in (m.groups()[:2] if m.group(1) is not None else m.groups()[2:]))
    return num / den if num is not None and den else None
  if not re.fullmatch(rf"(?:{_NUM})(?:\s*/\s*(?:{_NUM}))?", s):
    return None
  parts = [p.strip().replace(",", "").replace("\u2212", "-") for p in s.split("/")]
  try:
    values = [fractions.Fraction(p) for p in parts]
  except (ValueError, ZeroDivisionError):
    return None
  if len(values) == 2:
    return values[0] / values[1] if values[1] != 0 else None
  return values[0]


def format_number(value: fractions.Fraction | None) -> str | None:
  """Canonical text of a parsed number: integers plainly (``-10``), others as a reduced fraction (``3/4``)."""
  if value is None:
    return None
  return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _last_boxed(text: str) -> str | None:
  """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces; None if absent/unclosed."""
  starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
  if not starts:
    return None
  i = start = starts[-1]
  depth = 1
  while i < len(text):
    if text[i] == "{":
      depth += 1
    elif text[i] == "}":
      depth -= 1
      if depth == 0:
        return text[start:i]
    i += 1
  return None


def _number_in(span: str, *, first: bool = False) -> fractions.Fraction | None:
  """The span as one number, else its last (or first) number: ``x = \\frac{1}{2}`` -> 1/2, ``18 dollars`` -> 18."""
  whole = parse_number(span)
  if whole is not None:
    return whole
  fracs = [m.span() for m in _FRAC_RE.finditer(span)]
  found = [(a, span[a:b]) for a, b in fracs]
  found += [(m.start(), m.group(0)) for m in _NUM_RE.finditer(span)
            if not any(a <= m.start() < b for a, b in fracs)]          # digits inside a \frac belong to it
  if not found:
    return None
  found.sort()
  return parse_number(found[0][1] if first else found[-1][1])


def extract_answer(text: Any) -> str | None:
  """Final numeric answer of a math completion, canonicalised, or None.

  Order: the first number after the last GSM8K marker ``#### <answer>``, else the last number inside the last
  ``\\boxed{<answer>}``, else the last number in the text. A marker whose content holds no number
  (``#### banana``, ``\\boxed{}``) makes the completion malformed: None, with no fallback to stray numbers.

  Args:
    text: a completion or a reference solution (GSM8K reference answers end with ``#### <number>``).

  Returns:
    The canonical string of ``format_number`` (``"70000"``, ``"-3"``, ``"3/4"``, ``"37/2"``) or None.
  """
  if not isinstance(text, str) or not text.strip():
    return None
  hashes = _HASH_RE.findall(text)
  if hashes:
    return format_number(_number_in(hashes[-1], first=True))
  if re.search(r"\\(?:boxed|fbox)\s*\{", text):
    boxed = _last_boxed(text)
    return format_number(_number_in(boxed)) if boxed is not None else None
  return format_number(_number_in(text))


def _as_list(x: Any, n: int, name: str) -> list:
  if x is None:
    raise ValueError(f"reward needs batch key {name!r} with {n} rows")
  x = list(x)
  if len(x) != n:
    raise ValueError(f"batch key {name!r} has {len(x)} rows, completions have {n}")
  return x


def math_exact_match(prompts: Sequence[str], completions: Sequence[str], *, answers: Sequence[Any] = None,
                     **_) -> np.ndarray:
  """1.0 where the completion's extracted answer equals the reference's, else 0.0; [N] float32.

  ``answers`` may be full reference solutions (``... #### 18``) or bare numbers (``"18"``, ``18``). A reference
  that yields no number scores every completion 0.
  """
  del prompts
  answers = _as_list(answers, len(completions), "answers")
  out = np.zeros(len(completions), np.float32)
  for i, (c, a) in enumerate(zip(completions, answers)):
    gold = extract_answer(a if isinstance(a, str) else str(a))
    out[i] = float(gold is not None and extract_answer(c) == gold)
  return out


_FORMATS = {
    "gsm8k": re.compile(rf"####\s*(?:{_NUM})\s*\.?\s*$"),
    "boxed": re.compile(r"\\boxed\s*\{"),
    "think_answer": re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL),
}


def format_reward(prompts: Sequence[str], completions: Sequence[str], *, style: str = "gsm8k", **_) -> np.ndarray:
  """1.0 where the completion follows the answer format, else 0.0; [N] float32.

  Styles: ``gsm8k`` (ends with a ``#### <number>`` line), ``boxed`` (a closed ``\\boxed{}`` holding a number),
  ``think_answer`` (``<think>...</think><answer>...</answer>`` and nothing else).
  """
  del prompts
  if style not in _FORMATS:
    raise ValueError(f"unknown format style {style!r}; choose one of {sorted(_FORMATS)}")
  out = np.zeros(len(completions), np.float32)
  for i, c in enumerate(completions):
    if not isinstance(c, str):
      continue
    if style == "boxed":
      boxed = _last_boxed(c) if _FORMATS["boxed"].search(c) else None
      out[i] = float(boxed is not None and _number_in(boxed) is not None)
    else:
      out[i] = float(_FORMATS[style].search(c) is not None)
  return out


def length_penalty(prompts: Sequence[str], completions: Sequence[str], *, lengths: Sequence[int] = None,
                   max_len: int, cache_len: int, **_) -> np.ndarray:
  """Soft overlong punishment of DAPO; [N] float32 in [-1, 0].

  R(|o|) = 0 if |o| <= L - C;  ((L - C) - |o|) / C if L - C < |o| <= L;  -1 if |o| > L,
  with |o| = lengths (completion tokens), L = max_len, C = cache_len.

  See "DAPO: An Open-Source LLM Reinforcement Learning System at Scale" (arXiv:2503.14476), the
  "Soft Overlong Punishment" of its overlong reward shaping.
  """
  del prompts
  if not 0 < cache_len <= max_len:
    raise ValueError(f"need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
  n = np.asarray(_as_list(lengths, len(completions), "lengths"), np.float64)
  free = max_len - cache_len
  out = np.where(n <= free, 0.0, np.where(n <= max_len, (free - n) / cache_len, -1.0))
  return out.astype(np.float32)


def turn_rewards(prompts: Sequence[str], completions: Sequence[str], *, turn_rewards: Sequence[float] = None,
                 **_) -> np.ndarray:
  """The environment's per-turn rewards of a multi-turn trajectory, summed over its turns; [N] float32
  (``rlj.agents.rollout``: an agent job passes them; give the spec a weight to train on them)."""
  if turn_rewards is None:
    raise ValueError("reward 'turn_rewards' needs a multi-turn rollout (an agent job, agent.enabled=True)")
  out = np.asarray(turn_rewards, np.float32)
  if out.shape != (len(completions),):
    raise ValueError(f"turn_rewards holds {out.shape} values for {len(completions)} completions")
  return out
