"""Preference As Reward (PAR): a scalar reward turned into its own preference for a completion over reference
completions of the same prompt.

Fu et al., "Reward Shaping to Mitigate Reward Hacking in RLHF" (arXiv:2502.18770), take the RL reward of a response
y to prompt x to be the Bradley-Terry preference, under the reward r itself, of y over reference responses of x:

  r_PAR(x, y) = (1 / M) sum_{m=1..M} sigmoid(r(x, y) - r(x, y_ref_m))                      (the paper's PAR)

The paper's design principles (its abstract): the RL reward should be bounded, and it should grow fast at first and
then converge. PAR lies in (0, 1), is centred on the references (a response exactly as good as its one reference
scores 1/2), and its slope sigmoid' is largest near the references and vanishes once a response is clearly ahead,
so pushing r far beyond what the initial policy achieves, the usual route of reward hacking, earns almost nothing.

References. The paper's references are responses of the SFT (initial) policy to the same prompt (the authors' code
samples them, and its data-efficiency runs compare 1, 3 and 5 per prompt). rlj uses:

  num_refs=1, decode="greedy"  (default) the initial policy's greedy completion: one reference, as the paper
                               found enough ("requiring only a single reference reward for optimal performance",
                               abstract), and deterministic, so the reference reward is not one noisy draw;
  num_refs=M, decode="sample"  M of the reference policy's samples at the sampler's temperature (the first M of one
                               rollout of G >= M), the paper's sampled references, averaged over M.

Each prompt's reference rewards r(x, y_ref_m) are computed once, when the prompt is first seen, and cached by a key
of the prompt's text and answer (``prompt_key``; the reward may read the answer); the loop's host state keeps the
cache in every checkpoint (``rlj.par_refs``), so a resume never recomputes them. Which policy writes the references
(``source``): "reference" (default) the frozen reference the run keeps, i.e. the policy at RL step 0 (the
full copy, or LoRA's base: its adapters start at zero), as in the paper (DNO, which makes each iteration's policy the
next reference, gives the reference of the iteration the prompt is first seen in); "policy" the policy at the step
the prompt is first seen, for runs that keep no reference (PAR then centres each prompt on the policy of that step).

Missing values (NaN, ``rewards.combine``): a NaN reward stays NaN; a NaN reference reward (a reference the wrapped
reward does not apply to) is left out of the mean; a prompt whose every reference is NaN scores NaN.

Config: any scalar reward spec takes ``par=dict(num_refs=1, decode="greedy", source="reference")`` (``parse``);
``rewards.combine.build`` wraps it in a ``ParReward``.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np

DECODES = ("greedy", "sample")
SOURCES = ("reference", "policy")


class ParSettingError(ValueError):
  """A bad ``par`` setting; ``key`` is the sub-key at fault ("" for the section itself)."""

  def __init__(self, key: str, message: str):
    super().__init__(f"{key}: {message}" if key else message)
    self.key, self.message = key, message


@dataclasses.dataclass(frozen=True)
class ParSettings:
  """A reward spec's ``par`` section: ``num_refs`` references per prompt, drawn greedily or by sampling
  (``decode``) from the run's frozen reference or from the policy when the prompt is first seen (``source``)."""
  num_refs: int = 1
  decode: str = "greedy"
  source: str = "reference"


def parse(section: Any) -> ParSettings:
  """A spec's ``par`` value (a dict, or ``True`` for the defaults) -> ``ParSettings``.

  Raises:
    ParSettingError: an unknown key or a bad value, naming the key and the choices.
  """
  if section is True:
    return ParSettings()
  if not hasattr(section, "keys"):
    raise ParSettingError("", f"{section!r}; give a dict with num_refs, decode, source (or True for the defaults "
                              f"num_refs=1, decode='greedy', source='reference')")
  d = {k: section[k] for k in section.keys()}
  fields = [f.name for f in dataclasses.fields(ParSettings)]
  unknown = sorted(set(d) - set(fields))
  if unknown:
    raise ParSettingError(unknown[0], f"unknown key; a par section takes {', '.join(fields)}")
  s = ParSettings(**d)
  if not isinstance(s.num_refs, int) or isinstance(s.num_refs, bool) or s.num_refs < 1:
    raise ParSettingError("num_refs", f"{s.num_refs!r}; the number of reference completions per prompt, an int >= 1")
  if s.decode not in DECODES:
    raise ParSettingError("decode", f"{s.decode!r}; choose {' | '.join(DECODES)}")
  if s.decode == "greedy" and s.num_refs != 1:
    raise ParSettingError("num_refs", f"{s.num_refs} greedy references would all be the same completion; use "
                                      f"num_refs=1, or decode='sample' for {s.num_refs} sampled references")
  if s.source not in SOURCES:
    raise ParSettingError("source", f"{s.source!r}; choose {' | '.join(SOURCES)}")
  return s


def par_rewards(rewards: np.ndarray, ref_rewards: np.ndarray) -> np.ndarray:
  """r_PAR = mean_m sigmoid(r - r_ref_m), NaN-aware.

  Args:
    rewards: [...] scalar rewards r(x, y), e.g. [N], or [B, G] for G completions of B prompts.
    ref_rewards: [..., M] reference rewards r(x, y_ref_m); the leading dims broadcast against ``rewards``' (pass
      [N, M] with [N] rewards, or [B, 1, M] with [B, G] rewards).

  Returns:
    float32 with ``rewards``' (broadcast) shape, in (0, 1) (margins beyond about 17 round to 0 or 1 in float32);
    NaN where the reward is NaN or every reference reward is NaN (NaN references are left out of the mean).
  """
  r = np.asarray(rewards, np.float64)
  ref = np.asarray(ref_rewards, np.float64)
  if ref.ndim < 1 or ref.shape[-1] < 1:
    raise ValueError(f"ref_rewards needs a trailing axis of M >= 1 references, got shape {ref.shape}")
  d = r[..., None] - ref
  valid = ~np.isnan(d)
  s = np.exp(-np.logaddexp(0.0, -np.where(valid, d, 0.0)))       # sigmoid(d), no overflow for large |d|
  count = valid.sum(axis=-1)
  total = np.where(valid, s, 0.0).sum(axis=-1)
  return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


def prompt_key(prompt: str, answer: Any = None) -> str:
  """The cache key of a prompt: a 128-bit hash (hex) of its text and its answer (a reward may read the answer, so
  one question with two answers has two reference rewards). ``None`` and "" are the same answer."""
  data = str(prompt).encode("utf-8") + b"\x00" + ("" if answer is None else str(answer)).encode("utf-8")
  return hashlib.blake2b(data, digest_size=16).hexdigest()


class ReferenceCache:
  """Reference rewards by prompt key: ``[M]`` float32 per prompt, written once (``put`` keeps what it has)."""

  def __init__(self, num_refs: int):
    self.num_refs = int(num_refs)
    self._rewards: dict[str, np.ndarray] = {}

  def __contains__(self, key: str) -> bool:
    return key in self._rewards

  def __len__(self) -> int:
    return len(self._rewards)

  def put(self, keys: Sequence[str], rewards: np.ndarray) -> None:
    """Stores ``rewards`` [K, M] of ``keys`` [K]; a key already cached keeps its first value."""
    rewards = np.asarray(rewards, np.float32)
    if rewards.shape != (len(keys), self.num_refs):
      raise ValueError(f"{len(keys)} keys need rewards of shape ({len(keys)}, {self.num_refs}), got {rewards.shape}")
    for k, v in zip(keys, rewards):
      self._rewards.setdefault(k, v.copy())

  def get(self, keys: Sequence[str]) -> np.ndarray:
    """[K, M] reference rewards of ``keys``.

    Raises:
      KeyError: a key without reference rewards (its prompt's references were never computed).
    """
    missing = [k for k in keys if k not in self._rewards]
    if missing:
      raise KeyError(f"no reference rewards for {len(missing)} prompt(s) (key {missing[0]}); the loop computes them "
                     f"before the rewards of a rollout (rlj.par_refs.ParReferences.prepare)")
    return np.stack([self._rewards[k] for k in keys]) if keys else np.zeros((0, self.num_refs), np.float32)

  def host_state(self) -> dict[str, np.ndarray]:
    """``{"keys": [K] str, "rewards": [K, M] float32}``: plain arrays, saved without pickling (``np.savez``)."""
    keys = list(self._rewards)
    rewards = (np.stack([self._rewards[k] for k in keys]) if keys
               else np.zeros((0, self.num_refs), np.float32))
    return {"keys": np.asarray(keys, dtype="<U32"), "rewards": rewards.astype(np.float32)}

  def load_host_state(self, host: Mapping[str, np.ndarray]) -> None:
    """Restores what ``host_state`` saved (nothing when absent).

    Raises:
      ValueError: saved rewards of another number of references than this cache's.
    """
    if "keys" not in host:
      return
    rewards = np.asarray(host["rewards"], np.float32)
    if rewards.ndim != 2 or rewards.shape[1] != self.num_refs:
      raise ValueError(f"the checkpoint holds {rewards.shape[-1] if rewards.ndim == 2 else '?'} reference rewards "
                       f"per prompt, this run uses num_refs={self.num_refs}")
    self._rewards = {str(k): v.copy() for k, v in zip(host["keys"], rewards)}


class ParReward:
  """A scalar reward wrapped as PAR: ``fn(prompts, completions, **batch) -> [N]`` like any reward
  (``rewards.combine``), scoring each row against its prompt's cached reference rewards.

  ``inner`` is the wrapped reward (its ``on_error`` / ``allow_nan`` apply to the PAR reward too); ``cache`` holds
  the reference rewards, which the RL loop fills before each rollout's rewards (``rlj.par_refs``).
  """

  def __init__(self, inner: Callable[..., Any], settings: ParSettings = ParSettings()):
    self.inner, self.settings = inner, settings
    self.cache = ReferenceCache(settings.num_refs)

  @property
  def on_error(self) -> str:
    return getattr(self.inner, "on_error", "raise")

  @property
  def allow_nan(self) -> bool:
    return getattr(self.inner, "allow_nan", True)

  def keys(self, prompts: Sequence[str], answers: Sequence[Any] | None) -> list[str]:
    return [prompt_key(p, None if answers is None else answers[i]) for i, p in enumerate(prompts)]

  def __call__(self, prompts, completions, **batch) -> np.ndarray:
    r = np.asarray(self.inner(prompts, completions, **batch), np.float32)
    if r.shape != (len(completions),):
      raise ValueError(f"the wrapped reward returned shape {r.shape}, expected ({len(completions)},)")
    return par_rewards(r, self.cache.get(self.keys(prompts, batch.get("answers"))))
