"""Per-step summaries of a rollout for the console and ``metrics.jsonl``: completion lengths, the fraction cut at
the length limit, and the sampling distribution's entropy (host numpy, on the whole gathered rollout).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np


def completion_lengths(completion: np.ndarray, mask: np.ndarray, *, max_new_tokens: int,
                       stop_ids: Iterable[int]) -> dict[str, float]:
  """Mean and max completion length and the fraction of rows cut at ``max_new_tokens``.

  A row is cut when it holds ``max_new_tokens`` tokens and its last one is no stop / EOS id (the sampler's
  mask includes the stop token, so a row that stops on its last allowed token is not cut).

  Args:
    completion: [N, T] sampled ids.
    mask: [N, T] 1 on completion tokens (up to and including the first stop id).
    max_new_tokens: the sampler's length limit.
    stop_ids: the sampler's stop set (``SamplerConfig.stop_set``).

  Returns:
    ``response_len/mean``, ``response_len/max``, ``response_len/truncated_frac``.
  """
  lengths = (np.asarray(mask) > 0).sum(axis=1)
  cut = truncated(completion, mask, max_new_tokens=max_new_tokens, stop_ids=stop_ids)
  return {"response_len/mean": float(lengths.mean()), "response_len/max": float(lengths.max()),
          "response_len/truncated_frac": float(cut.mean())}


def truncated(completion: np.ndarray, mask: np.ndarray, *, max_new_tokens: int, stop_ids) -> np.ndarray:
  """[N] bool: the rows cut at ``max_new_tokens`` (``completion_lengths``'s definition of a cut row)."""
  lengths = (np.asarray(mask) > 0).sum(axis=1)
  last = np.asarray(completion)[np.arange(len(lengths)), np.maximum(lengths - 1, 0)]
  return (lengths >= max_new_tokens) & ~np.isin(last, np.asarray(list(stop_ids), dtype=last.dtype))


def overlong_filtered(mask: np.ndarray, cut: np.ndarray) -> np.ndarray:
  """Overlong filtering (DAPO, arXiv:2503.14476, Sec. 3.4; TRL's ``mask_truncated_completions``): the completion
  mask [N, T] with the rows ``cut`` [N] zeroed, so their tokens leave the loss (and its token counts) while their
  rewards still count in their group's advantages. ``algorithms.dapo.mask_truncated`` is the same on device."""
  return np.where(np.asarray(cut)[:, None], np.zeros_like(mask), mask)


def finished_row_steps(lengths: np.ndarray) -> dict[str, float]:
  """How much of the decode loop ran on rows that had already stopped: 1 - sum(lengths) / (N x max(lengths)).

  The loop decodes every row of the batch until the longest one stops (it draws max(lengths) tokens per row), so
  with lengths spread evenly between 10% and 100% of T about 45% of its row-steps decode rows that are done.
  Returns ``decode/finished_row_frac`` (0 when every row ran as long as the longest, or nothing was drawn).
  """
  lengths = np.asarray(lengths, np.float64)
  total = float(len(lengths)) * float(lengths.max(initial=0.0))
  return {"decode/finished_row_frac": 0.0 if total <= 0 else float(1.0 - lengths.sum() / total)}


def sampler_entropy(logp: np.ndarray, mask: np.ndarray) -> float:
  """Per-token entropy of the sampling distribution, estimated from its own samples: ``-mean(log q(y_t))`` over
  the completion tokens.

  For a token y_t drawn from q(. | s_t), E[-log q(y_t | s_t)] = H(q(. | s_t)), so the token mean is a Monte-Carlo
  estimate of the mean per-token entropy along the sampled completions (no extra forward pass: ``logp`` is the
  sampler's). q is the distribution the sampler draws from (temperature, top-k / top-p applied), which is the
  policy itself at temperature 1 without filters.

  Args:
    logp: [N, T] the sampler's log q of the sampled tokens.
    mask: [N, T] 1 on completion tokens.
  """
  mask = np.asarray(mask, np.float64)
  return float(-(np.asarray(logp, np.float64) * mask).sum() / max(mask.sum(), 1.0))
