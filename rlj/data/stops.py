"""Cutting a completion at its first stop token or stop string, for reward functions (host side, no jax).

The sampler ends a row at the first of its stop ids (every EOS id of the checkpoint, ``tokenizer.eos_ids``) and
keeps that token in the row's mask. A reward function wants the text before it: ``cut_ids`` drops the stop token
and everything after; ``cut_text`` does the same on decoded text for stop strings (a turn marker the model wrote as
text, a "\\n\\nQuestion:" the model began on its own). ``completion_text`` combines both.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def cut_ids(ids: Iterable[int], stop_ids: Iterable[int], *, keep_stop: bool = False) -> list[int]:
  """The ids before the first one in ``stop_ids`` (and that stop id too when ``keep_stop``); all ids if none."""
  stops, out = {int(s) for s in stop_ids}, []
  for i in ids:
    i = int(i)
    if i in stops:
      return out + [i] if keep_stop else out
    out.append(i)
  return out


def cut_text(text: str, stop_strings: Iterable[str], *, keep_stop: bool = False) -> str:
  """``text`` up to the earliest occurrence of any of ``stop_strings`` (empty strings ignored); all of it if none.

  At one position the longest stop string matching there is the one kept with ``keep_stop``.
  """
  best, best_len = len(text), 0
  for stop in stop_strings:
    if not stop:
      continue
    at = text.find(stop)
    if at >= 0 and (at < best or (at == best and len(stop) > best_len)):
      best, best_len = at, len(stop)
  return text[:best + (best_len if keep_stop else 0)]


def completion_text(tokenizer, ids: Sequence[int], *, stop_ids: Iterable[int] | None = None,
                    stop_strings: Iterable[str] = ()) -> str:
  """Decoded text of a completion before its first stop id (default ``tokenizer.eos_ids``), then cut at the
  first of ``stop_strings``."""
  stop_ids = tokenizer.eos_ids if stop_ids is None else stop_ids
  return cut_text(tokenizer.decode(cut_ids(ids, stop_ids), stop_at_eos=False), stop_strings)


def completion_texts(tokenizer, tokens, mask=None, *, stop_ids: Iterable[int] | None = None,
                     stop_strings: Iterable[str] = ()) -> list[str]:
  """``completion_text`` of each row of ``tokens`` [N, T], keeping only positions where ``mask`` [N, T] is
  nonzero when given (the sampler's completion mask)."""
  tokens = np.asarray(tokens)
  if mask is not None:
    mask = np.asarray(mask)
    if mask.shape != tokens.shape:
      raise ValueError(f"tokens {tokens.shape} and mask {mask.shape} differ in shape")
  stop_ids, stop_strings = tuple(tokenizer.eos_ids if stop_ids is None else stop_ids), tuple(stop_strings)
  rows = [row if mask is None else row[m != 0] for row, m in zip(tokens, mask if mask is not None else tokens)]
  return [completion_text(tokenizer, row, stop_ids=stop_ids, stop_strings=stop_strings) for row in rows]


def stop_strings(tokenizer, stop_ids: Iterable[int] | None = None) -> tuple[str, ...]:
  """The text of each stop id (default: every EOS id), for cutting text that was decoded with special tokens."""
  ids = tokenizer.eos_ids if stop_ids is None else stop_ids
  return tuple(dict.fromkeys(tokenizer.id_to_piece(i) for i in ids))
