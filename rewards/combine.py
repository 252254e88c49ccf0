"""Named reward functions -> one ``[B, G, K]`` reward array with component names.

Reward components are chosen by config as a list of specs. A spec names a built-in (``BUILTINS``, an explicit
switchboard) or a user function by import string ``"package.module:function"``, resolved with ``importlib``;
nothing is ever evaluated. Every reward function follows the host-side convention of ``rewards.verifiable``:
``fn(prompts, completions, **batch) -> [N]`` with N = B * G rows in group-major order (row b * G + g is
completion g of prompt b). NaN means "this component does not apply to this row" (GDPO handles it).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from rewards import verifiable

RewardFn = Callable[..., np.ndarray]

BUILTINS: dict[str, RewardFn] = {
    "math_exact_match": verifiable.math_exact_match,
    "format": verifiable.format_reward,
    "length_penalty": verifiable.length_penalty,
}

_IMPORT_RE = re.compile(r"[A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*")


class Rewards(NamedTuple):
  """Stacked reward components: ``values`` [B, G, K] float32 and their ``names`` (K strings)."""
  values: np.ndarray
  names: tuple[str, ...]

  def component(self, name: str) -> np.ndarray:
    """The [B, G] slice of one named component."""
    return self.values[..., self.names.index(name)]


@dataclasses.dataclass(frozen=True)
class RewardSpec:
  """One reward component: its ``name`` (a metrics key), the function (``fn``: a built-in name or
  ``"module:function"``), keyword arguments bound to it, and its ``weight`` in ``weighted_sum``."""
  name: str
  fn: str
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  weight: float = 1.0


def resolve(fn: str | RewardFn) -> RewardFn:
  """A reward function from a built-in name, an import string ``"module:attr"``, or a callable.

  Raises:
    ValueError: unknown built-in, malformed import string, or a target that is not callable.
    ImportError / AttributeError: the module or attribute does not exist (message names the string).
  """
  if callable(fn):
    return fn
  if not isinstance(fn, str):
    raise ValueError(f"reward function must be a name, 'module:function' or a callable, got {fn!r}")
  if fn in BUILTINS:
    return BUILTINS[fn]
  if ":" not in fn:
    raise ValueError(f"unknown reward {fn!r}; choose one of {sorted(BUILTINS)} or give 'module:function'")
  if not _IMPORT_RE.fullmatch(fn):
    raise ValueError(f"malformed import string {fn!r}; expected 'package.module:function'")
  module_name, attr_path = fn.split(":")
  try:
    obj: Any = importlib.import_module(module_name)
  except ImportError as e:
    raise ImportError(f"reward {fn!r}: cannot import module {module_name!r}: {e}") from e
  for attr in attr_path.split("."):
    if not hasattr(obj, attr):
      raise AttributeError(f"reward {fn!r}: {module_name!r} has no attribute {attr_path!r}")
    obj = getattr(obj, attr)
  if not callable(obj):
    raise ValueError(f"reward {fn!r} resolves to a non-callable {type(obj).__name__}")
  return obj


def build(specs: Sequence[RewardSpec | Mapping[str, Any]]) -> list[tuple[str, RewardFn]]:
  """Resolves specs (``RewardSpec`` or dicts with the same keys) to ``[(name, fn with kwargs bound)]``.

  Raises ValueError on repeated names or unknown spec keys.
  """
  out, seen = [], set()
  for spec in specs:
    if not isinstance(spec, RewardSpec):
      spec = RewardSpec(**dict(spec))
    if spec.name in seen:
      raise ValueError(f"reward name {spec.name!r} appears twice")
    seen.add(spec.name)
    fn = resolve(spec.fn)
    out.append((spec.name, functools.partial(fn, **dict(spec.kwargs)) if spec.kwargs else fn))
  return out


def repeat_per_prompt(values: Sequence[Any], num_generations: int) -> list[Any]:
  """Per-prompt metadata [B] -> per-row [B * G] in group-major order (each item repeated G times)."""
  return [v for v in values for _ in range(num_generations)]


def compute(reward_fns: Sequence[tuple[str, RewardFn]], prompts: Sequence[str], completions: Sequence[str], *,
            num_generations: int, **batch) -> Rewards:
  """Runs every reward function on the N = B * G rows and stacks the results.

  Args:
    reward_fns: ``[(name, fn)]``, e.g. from ``build``.
    prompts: [N] prompt texts (row b * G + g belongs to prompt b).
    completions: [N] completion texts.
    num_generations: G; N must divide by it.
    **batch: per-row metadata passed to every function (``answers``, ``lengths``, ...), each of length N.

  Returns:
    ``Rewards(values [B, G, K] float32, names)``.

  Raises:
    ValueError: naming the component whose output is not N finite-or-NaN numbers.
  """
  n = len(completions)
  if len(prompts) != n or num_generations < 1 or n % num_generations:
    raise ValueError(f"{len(prompts)} prompts and {n} completions must match and divide by G={num_generations}")
  if not reward_fns:
    raise ValueError("no reward functions given")
  cols = []
  for name, fn in reward_fns:
    try:
      col = np.asarray(fn(list(prompts), list(completions), **batch), dtype=np.float32)
    except (TypeError, ValueError) as e:
      raise ValueError(f"reward {name!r} failed: {e}") from e
    if col.shape != (n,):
      raise ValueError(f"reward {name!r} returned shape {col.shape}, expected ({n},)")
    if np.isinf(col).any():
      raise ValueError(f"reward {name!r} returned inf")
    cols.append(col)
  values = np.stack(cols, axis=-1).reshape(n // num_generations, num_generations, len(cols))
  return Rewards(values=values, names=tuple(name for name, _ in reward_fns))


def weighted_sum(rewards: Rewards, weights: Mapping[str, float] | Sequence[float] | None = None) -> np.ndarray:
  """sum_k w_k r_k -> [B, G]; NaN components (not applicable to a row) contribute 0.

  ``weights`` maps names to weights (missing names weigh 0) or lists K weights; None weighs all 1.
  """
  k = len(rewards.names)
  if weights is None:
    w = np.ones(k, np.float32)
  elif isinstance(weights, Mapping):
    unknown = set(weights) - set(rewards.names)
    if unknown:
      raise ValueError(f"weights name unknown rewards {sorted(unknown)}; have {list(rewards.names)}")
    w = np.array([weights.get(name, 0.0) for name in rewards.names], np.float32)
  else:
    w = np.asarray(weights, np.float32)
    if w.shape != (k,):
      raise ValueError(f"need {k} weights for {list(rewards.names)}, got {w.shape}")
  return np.nansum(rewards.values * w, axis=-1).astype(np.float32)


def weights_of(specs: Sequence[RewardSpec | Mapping[str, Any]]) -> dict[str, float]:
  """The ``{name: weight}`` of a spec list (dicts may omit ``weight``, default 1)."""
  return {(s.name if isinstance(s, RewardSpec) else s["name"]):
          float(s.weight if isinstance(s, RewardSpec) else s.get("weight", 1.0)) for s in specs}
