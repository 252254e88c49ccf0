"""Named reward functions -> one ``[B, G, K]`` reward array with component names.

Reward components are chosen by config as a list of specs. A spec names a built-in (``BUILTINS``, an explicit
switchboard) or a user function by import string ``"package.module:function"``, resolved with ``importlib``;
nothing is ever evaluated. Every reward function follows the host-side convention of ``rewards.verifiable``:
``fn(prompts, completions, **batch) -> [N]`` with N = B * G rows in group-major order (row b * G + g is
completion g of prompt b). NaN means "this component does not apply to this row" (GDPO handles it).

Faults. A reward function that raises, or returns inf (or NaN when its spec sets ``allow_nan=False``), is a
fault of the rows it failed on; a batch call that raises is retried row by row to find them. The spec's
``on_error`` decides what a fault does:

  "raise"    (default) stop with a ``RewardError`` naming the reward, the row index, its prompt and completion.
  "missing"  the faulted rows get NaN in that component, a warning names each of them (the first few), and
             ``Rewards.errors`` counts them (``fault_metrics``: ``reward/<name>/errors``).

A missing value then follows the NaN convention of the algorithms (ALGORITHMS.md): GDPO leaves the component
out of that row's normalisation; the GRPO family sums the other components of the row (the missing one counts
0, ``weighted_total``), and a row whose every component is missing stays missing (NaN): it gets advantage 0 and
is left out of its group's mean and std (``algorithms.grpo.advantages``). P3O scores such a row 0 and DNO ranks
it below every scored row (``rlj.rl_algos.p3o_batch``, ``rlj.dno_replay.select_pairs``).
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from rewards import par, verifiable

RewardFn = Callable[..., np.ndarray]

_log = logging.getLogger(__name__)

BUILTINS: dict[str, RewardFn] = {
    "math_exact_match": verifiable.math_exact_match,
    "format": verifiable.format_reward,
    "length_penalty": verifiable.length_penalty,
    "turn_rewards": verifiable.turn_rewards,
}

ON_ERROR = ("raise", "missing")

# Faulted rows named in warnings per reward and call (the rest are counted).
_MAX_WARNED_ROWS = 3

_IMPORT_RE = re.compile(r"[A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*")


class RewardError(ValueError):
  """A reward function failed on a row (raised, or returned a non-finite value) under ``on_error="raise"``."""

  def __init__(self, message: str, *, name: str, index: int | None, prompt: str | None = None,
               completion: str | None = None):
    super().__init__(message)
    self.name, self.index, self.prompt, self.completion = name, index, prompt, completion


class Rewards(NamedTuple):
  """Stacked reward components: ``values`` [B, G, K] float32, their ``names`` (K strings) and per component
  the number of faulted rows that became NaN under ``on_error="missing"`` (``errors``, K ints)."""
  values: np.ndarray
  names: tuple[str, ...]
  errors: tuple[int, ...] = ()

  def component(self, name: str) -> np.ndarray:
    """The [B, G] slice of one named component."""
    return self.values[..., self.names.index(name)]

  def fault_metrics(self) -> dict[str, float]:
    """``{"reward/<name>/errors": count}`` for every component."""
    errors = self.errors or (0,) * len(self.names)
    return {f"reward/{name}/errors": float(n) for name, n in zip(self.names, errors)}


@dataclasses.dataclass(frozen=True)
class RewardSpec:
  """One reward component: its ``name`` (a metrics key), the function (``fn``: a built-in name or
  ``"module:function"``), keyword arguments bound to it, its ``weight`` in ``weighted_sum``, what a fault
  does (``on_error``: "raise" | "missing") and whether NaN is a legitimate "not applicable" value
  (``allow_nan``; False makes a NaN a fault like an exception). ``par``: score the reward as Preference As Reward
  against reference completions of each prompt (``rewards.par``; a dict of ``ParSettings``, True for the defaults)."""
  name: str
  fn: str
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  weight: float = 1.0
  on_error: str = "raise"
  allow_nan: bool = True
  par: Any = None


@dataclasses.dataclass(frozen=True)
class BoundReward:
  """A resolved reward function with its spec's kwargs and fault policy; calls like the function itself."""
  fn: RewardFn
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  on_error: str = "raise"
  allow_nan: bool = True

  def __call__(self, prompts, completions, **batch):
    return self.fn(prompts, completions, **{**dict(self.kwargs), **batch})


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
  return import_callable(fn, "reward")


def import_callable(spec: str, what: str) -> Callable:
  """The callable an import string ``"package.module:attr[.attr]"`` names (imported, never evaluated); ``what``
  ("reward", "tool", ...) names it in the errors.

  Raises:
    ValueError: a malformed string, or a target that is not callable.
    ImportError / AttributeError: the module or attribute does not exist (message names the string).
  """
  if not _IMPORT_RE.fullmatch(spec):
    raise ValueError(f"malformed import string {spec!r}; expected 'package.module:function'")
  module_name, attr_path = spec.split(":")
  try:
    obj: Any = importlib.import_module(module_name)
  except ImportError as e:
    raise ImportError(f"{what} {spec!r}: cannot import {module_name!r}: {e}") from e
  for attr in attr_path.split("."):
    if not hasattr(obj, attr):
      raise AttributeError(f"{what} {spec!r}: {module_name!r} has no attribute {attr_path!r}")
    obj = getattr(obj, attr)
  if not callable(obj):
    raise ValueError(f"{what} {spec!r} resolves to a non-callable {type(obj).__name__}")
  return obj


def build(specs: Sequence[RewardSpec | Mapping[str, Any]]) -> list[tuple[str, BoundReward]]:
  """Resolves specs (``RewardSpec`` or dicts with the same keys) to ``[(name, BoundReward)]`` (a spec with ``par``:
  a ``rewards.par.ParReward`` around it).

  Raises:
    ValueError: repeated names, an unknown ``on_error`` or a bad ``par`` section; TypeError: unknown spec keys.
  """
  out, seen = [], set()
  for spec in specs:
    if not isinstance(spec, RewardSpec):
      spec = RewardSpec(**dict(spec))
    if spec.name in seen:
      raise ValueError(f"reward name {spec.name!r} appears twice")
    seen.add(spec.name)
    if spec.on_error not in ON_ERROR:
      raise ValueError(f"reward {spec.name!r}: on_error={spec.on_error!r}; choose one of {ON_ERROR}")
    fn = BoundReward(resolve(spec.fn), dict(spec.kwargs), spec.on_error, bool(spec.allow_nan))
    if spec.par is not None:
      try:
        fn = par.ParReward(fn, par.parse(spec.par))
      except par.ParSettingError as e:
        raise ValueError(f"reward {spec.name!r}: par.{e}" if e.key else f"reward {spec.name!r}: par={e}") from None
    out.append((spec.name, fn))
  return out


def repeat_per_prompt(values: Sequence[Any], num_generations: int) -> list[Any]:
  """Per-prompt metadata [B] -> per-row [B * G] in group-major order (each item repeated G times)."""
  return [v for v in values for _ in range(num_generations)]


def compute(reward_fns: Sequence[tuple[str, RewardFn]], prompts: Sequence[str], completions: Sequence[str], *,
            num_generations: int, **batch) -> Rewards:
  """Runs every reward function on the N = B * G rows and stacks the results, applying each one's fault policy.

  Args:
    reward_fns: ``[(name, fn)]``, e.g. from ``build`` (a plain callable has ``on_error="raise"``,
      ``allow_nan=True``).
    prompts: [N] prompt texts (row b * G + g belongs to prompt b).
    completions: [N] completion texts.
    num_generations: G; N must divide by it.
    **batch: per-row metadata passed to every function (``answers``, ``lengths``, ...), each of length N.

  Returns:
    ``Rewards(values [B, G, K] float32, names, errors)``.

  Raises:
    RewardError: a fault under ``on_error="raise"``, naming the reward, the row, its prompt and completion.
    ValueError: a component whose output is not N numbers.
  """
  n = len(completions)
  if len(prompts) != n or num_generations < 1 or n % num_generations:
    raise ValueError(f"{len(prompts)} prompts and {n} completions must match and divide by G={num_generations}")
  if not reward_fns:
    raise ValueError("no reward functions given")
  prompts, completions = list(prompts), list(completions)
  cols, errors = [], []
  for name, fn in reward_fns:
    on_error, allow_nan = getattr(fn, "on_error", "raise"), getattr(fn, "allow_nan", True)
    col, faults = _run(name, fn, prompts, completions, batch, stop_early=on_error == "raise")
    if None not in faults:  # values came back: inf, and NaN where not allowed, are faults too
      bad = np.isinf(col) | (np.isnan(col) & (not allow_nan))
      faults.update({int(i): (f"returned {col[i]}", None) for i in np.flatnonzero(bad) if int(i) not in faults})
    rows = list(range(n)) if None in faults else sorted(faults)
    if rows and on_error == "raise":
      i = None if None in faults else rows[0]
      reason, cause = faults[i]
      raise RewardError(f"reward {name!r} {reason} {_where(i, prompts, completions)}; set on_error='missing' in "
                        f"its spec to score such rows as missing (NaN)", name=name, index=i,
                        prompt=None if i is None else prompts[i],
                        completion=None if i is None else completions[i]) from cause
    col[rows] = np.nan
    for i in rows[:_MAX_WARNED_ROWS]:
      reason = faults[None if None in faults else i][0]
      _log.warning("reward %r %s %s; scored as missing (NaN)", name, reason, _where(i, prompts, completions))
    if len(rows) > _MAX_WARNED_ROWS:
      _log.warning("reward %r: %d more of %d rows scored as missing", name, len(rows) - _MAX_WARNED_ROWS, n)
    cols.append(col)
    errors.append(len(rows))
  values = np.stack(cols, axis=-1).reshape(n // num_generations, num_generations, len(cols))
  return Rewards(values=values, names=tuple(name for name, _ in reward_fns), errors=tuple(errors))


def _row(batch: Mapping[str, Any], i: int, n: int) -> dict:
  """Row ``i`` of every per-row metadata entry (sequences and arrays of length n); other entries as they are."""
  out = {}
  for k, v in batch.items():
    if hasattr(v, "shape"):
      per_row = len(v.shape) >= 1 and v.shape[0] == n
    else:
      per_row = isinstance(v, (list, tuple)) and len(v) == n
    out[k] = v[i:i + 1] if per_row else v
  return out


def _run(name: str, fn: RewardFn, prompts: list, completions: list, batch: Mapping[str, Any], *,
         stop_early: bool) -> tuple[np.ndarray, dict]:
  """One component over all rows -> (column [N], faults ``{row: (reason, exception)}``).

  A batch call that raises (or returns something that is not numbers) is retried one row at a time; rows that
  fail alone are the faults (NaN in the column). When every row succeeds alone the batch itself is at fault:
  ``{None: ...}``. ``stop_early`` stops at the first faulted row (the caller raises on it).
  """
  n = len(completions)
  try:
    col = np.array(fn(prompts, completions, **batch), dtype=np.float32)  # a writable copy
  except Exception as e:  # noqa: BLE001 (any failure of user code is a fault to report)
    batch_error = e
  else:
    if col.shape != (n,):
      raise ValueError(f"reward {name!r} returned shape {col.shape}, expected ({n},)")
    return col, {}
  col, faults = np.full(n, np.nan, np.float32), {}
  for i in range(n):
    try:
      value = np.asarray(fn(prompts[i:i + 1], completions[i:i + 1], **_row(batch, i, n)), dtype=np.float32)
      if value.shape != (1,):
        raise ValueError(f"returned shape {value.shape} for one row, expected (1,)")
      col[i] = value[0]
    except Exception as e:  # noqa: BLE001
      faults[i] = (f"raised {type(e).__name__}: {e}", e)
      if stop_early:
        break
  if not faults:
    faults[None] = (f"raised {type(batch_error).__name__}: {batch_error} on the batch of {n} rows (each row "
                    f"alone succeeded)", batch_error)
  return col, faults


def _where(i: int | None, prompts: Sequence[str], completions: Sequence[str], limit: int = 200) -> str:
  """``on row i (prompt '...', completion '...')``, texts clipped to ``limit`` characters."""
  if i is None:
    return f"on all {len(completions)} rows"
  clip = lambda s: s if len(s) <= limit else s[:limit] + "..."  # noqa: E731
  return f"on row {i} (prompt {clip(str(prompts[i]))!r}, completion {clip(str(completions[i]))!r})"


def weighted_total(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """sum_k w_k r_k over the last axis ([..., K] -> [...]), the one place the missing-value rule lives:
  a NaN component (not applicable, or a fault scored missing) contributes 0; a row whose every component is
  NaN stays NaN (it has no reward at all, and the algorithms treat it as missing)."""
  values = np.asarray(values, np.float32)
  all_nan = np.all(np.isnan(values), axis=-1)
  total = np.nansum(values * np.asarray(weights, np.float32), axis=-1).astype(np.float32)
  return np.where(all_nan, np.float32(np.nan), total)


def weighted_sum(rewards: Rewards, weights: Mapping[str, float] | Sequence[float] | None = None) -> np.ndarray:
  """``weighted_total`` of a ``Rewards``' values -> [B, G].

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
  return weighted_total(rewards.values, w)


def weights_of(specs: Sequence[RewardSpec | Mapping[str, Any]]) -> dict[str, float]:
  """The ``{name: weight}`` of a spec list (dicts may omit ``weight``, default 1)."""
  return {(s.name if isinstance(s, RewardSpec) else s["name"]):
          float(s.weight if isinstance(s, RewardSpec) else s.get("weight", 1.0)) for s in specs}
