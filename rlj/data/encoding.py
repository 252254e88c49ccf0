"""Per-record tokenisation and per-batch left-padding for the input pipelines (pure numpy, no grain).

A record goes through an encoder (``PromptEncoder`` / ``PreferenceEncoder``, run in grain workers) that
renders the prompt (a ``{prompt}`` template, or a ``prompts.PromptFormat``: plain or the checkpoint's chat
template), tokenises, and fits the sequence into the longest bucket: with ``overflow="truncate"`` it keeps the
END of the sequence (left truncation; a BOS token first, added or written by a chat template, stays first),
with ``overflow="drop"`` it marks the record ``too_long`` for the batcher to skip and count.
The batcher (``collate_prompts`` / ``collate_preferences``, run in the main process) left-pads a list of
encoded records to the smallest bucket that fits the longest of them.

Left padding puts every prompt's last token in the last column, which is where decoding starts; the
positions of a left-padded row are ``max(cumsum(mask) - 1, 0)``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from rlj.buckets import pick_bucket
from rlj.data.tokenizer import TokenizerBase

OVERFLOW = ("truncate", "drop")


def text(value: Any) -> str:
  """A record field as ``str`` (tfds data sources return text as UTF-8 bytes)."""
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8")
  return str(value)


def render(template: str, prompt: str) -> str:
  """Applies a prompt template with a ``{prompt}`` slot, e.g. ``"Question: {prompt}\\nAnswer:"``."""
  return template.format(prompt=prompt)


def fit(ids: list[int], max_len: int, *, keep_first: bool) -> list[int]:
  """Left-truncates ``ids`` to ``max_len`` tokens, keeping the first one (BOS) when ``keep_first``."""
  if len(ids) <= max_len:
    return ids
  if keep_first:
    return ids[:1] + ids[len(ids) - max_len + 1:]
  return ids[len(ids) - max_len:]


def left_pad(seqs: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads sequences into ``(tokens [B, length] int32, mask [B, length] int32)``."""
  tokens = np.full((len(seqs), length), pad_id, np.int32)
  mask = np.zeros((len(seqs), length), np.int32)
  for i, s in enumerate(seqs):
    if len(s):
      tokens[i, length - len(s):] = s
      mask[i, length - len(s):] = 1
  return tokens, mask


def _check_overflow(overflow: str) -> None:
  if overflow not in OVERFLOW:
    raise ValueError(f"unknown overflow {overflow!r}; choose one of {OVERFLOW}")


@dataclasses.dataclass(frozen=True)
class _Encoder:
  """What both encoders share: the tokenizer, the length bound and the rendering of a record's prompt.

  ``prompt_format`` (a ``prompts.PromptFormat``), when given, renders the prompt instead of ``template``; for a
  chat format pass ``add_bos=prompt_format.add_bos(tokenizer)`` (False: the chat template writes BOS itself).
  """
  tokenizer: TokenizerBase
  max_len: int
  template: str = "{prompt}"
  add_bos: bool = True
  overflow: str = "truncate"
  prompt_format: Any = None

  def __post_init__(self):
    _check_overflow(self.overflow)
    if self.prompt_format is not None and self.template != "{prompt}":
      raise ValueError("give either a prompt template or a prompt_format (whose user_template replaces it)")
    if self.prompt_format is not None and self.add_bos and not self.prompt_format.add_bos(self.tokenizer):
      raise ValueError(f"add_bos=True with a {self.prompt_format.format!r} prompt format whose checkpoint adds no "
                       f"BOS (a chat template writes its own); pass add_bos=prompt_format.add_bos(tokenizer)")

  def encode_prompt(self, record: dict) -> tuple[str, list[int]]:
    """The record's rendered prompt and its token ids (BOS first when ``add_bos``)."""
    if self.prompt_format is not None:
      prompt = self.prompt_format.render(record)
    else:
      prompt = render(self.template, text(record["prompt"]))
    return prompt, self.tokenizer.encode(prompt, add_bos=self.add_bos)

  def keep_first(self, ids: Sequence[int]) -> bool:
    """Whether truncation keeps the first token: a BOS, added here or written by the chat template."""
    return self.add_bos or (len(ids) > 0 and self.tokenizer.bos_id is not None and ids[0] == self.tokenizer.bos_id)


@dataclasses.dataclass(frozen=True)
class PromptEncoder(_Encoder):
  """Record ``{"prompt", "answer", "index"[, "rubric"]}`` -> element ``{"tokens", "prompt", "question", "answer",
  "index", "truncated", "too_long"[, "rubric"]}``; ``tokens`` = BOS (if ``add_bos``) + tokens of the rendered
  prompt, ``prompt`` the rendered text, ``question`` the record's own prompt text (what a judge is shown, without
  the policy's prompt format or chat template); a ``rubric`` (its items as a JSON string) is passed on as it is."""

  def __call__(self, record: dict) -> dict:
    prompt, ids = self.encode_prompt(record)
    too_long = len(ids) > self.max_len
    extra = {"rubric": text(record["rubric"])} if "rubric" in record else {}
    return {"tokens": np.asarray(fit(ids, self.max_len, keep_first=self.keep_first(ids)), np.int32),
            "prompt": prompt, "question": text(record["prompt"]), "answer": text(record["answer"]),
            "index": int(record["index"]),
            "truncated": too_long and self.overflow == "truncate", "too_long": too_long, **extra}


def collate_prompts(elements: Sequence[dict], *, batch_size: int, buckets: Sequence[int],
                    pad_id: int) -> dict[str, np.ndarray]:
  """Stacks up to ``batch_size`` encoded prompts into a left-padded batch.

  Returns:
    ``prompt_tokens`` [B, P] int32, ``prompt_mask`` [B, P] int32 (1 on tokens), ``prompt`` [B] str (rendered),
    ``question`` [B] str (the record's prompt), ``answer`` [B] str, ``index`` [B] int64 (record index in its
    source), ``truncated`` [B] bool, ``valid`` [B] bool, and ``rubric`` [B] str when the elements have one. P is
    the smallest bucket fitting the longest prompt. Rows past ``len(elements)`` (only in a final partial batch)
    are filler: valid False, mask 0, index -1.
  """
  n = len(elements)
  seqs = [e["tokens"] for e in elements] + [[]] * (batch_size - n)
  length = pick_bucket(max(len(s) for s in seqs), buckets)
  tokens, mask = left_pad(seqs, length, pad_id)
  extra = ({"rubric": _strings([e["rubric"] for e in elements], batch_size)}
           if elements and "rubric" in elements[0] else {})
  return {"prompt_tokens": tokens, "prompt_mask": mask,
          "prompt": _strings([e["prompt"] for e in elements], batch_size),
          "question": _strings([e.get("question", e["prompt"]) for e in elements], batch_size),
          "answer": _strings([e["answer"] for e in elements], batch_size),
          "index": _ints([e["index"] for e in elements], batch_size),
          "truncated": _flags([e["truncated"] for e in elements], batch_size),
          "valid": _flags([True] * n, batch_size), **extra}


@dataclasses.dataclass(frozen=True)
class PreferenceEncoder(_Encoder):
  """Record ``{"prompt", "chosen", "rejected", "index"}`` -> element with, for ``c`` in chosen/rejected,
  ``{c}_tokens`` = BOS + prompt tokens + response tokens + EOS and ``{c}_loss`` (1 on response tokens and
  EOS); ``truncated``/``too_long`` when either sequence exceeds ``max_len``."""

  def __call__(self, record: dict) -> dict:
    prompt, prompt_ids = self.encode_prompt(record)
    out = {"prompt": prompt, "index": int(record["index"])}
    too_long, keep_first = False, self.keep_first(prompt_ids)
    for name in ("chosen", "rejected"):
      response_ids = self.tokenizer.encode(text(record[name]), add_eos=True)
      ids = prompt_ids + response_ids
      loss = [0] * len(prompt_ids) + [1] * len(response_ids)
      too_long |= len(ids) > self.max_len
      out[f"{name}_tokens"] = np.asarray(fit(ids, self.max_len, keep_first=keep_first), np.int32)
      out[f"{name}_loss"] = np.asarray(fit(loss, self.max_len, keep_first=keep_first), np.int32)
    out["truncated"] = too_long and self.overflow == "truncate"
    out["too_long"] = too_long
    return out


def collate_preferences(elements: Sequence[dict], *, batch_size: int, buckets: Sequence[int],
                        pad_id: int) -> dict[str, np.ndarray]:
  """Stacks encoded preference pairs; chosen and rejected share one length L (the smallest bucket that
  fits the longest of both), so they stack into [B, 2, L] for a reward model.

  Returns:
    ``chosen_tokens``, ``chosen_mask`` (1 on tokens), ``chosen_loss_mask`` (1 on response tokens and
    EOS), the same three for ``rejected``, all [B, L] int32; ``prompt`` [B] str, ``index`` [B] int64,
    ``truncated`` [B] bool, ``valid`` [B] bool (filler rows as in ``collate_prompts``).
  """
  n = len(elements)
  filler = [[]] * (batch_size - n)
  length = pick_bucket(max(len(e[f"{c}_tokens"]) for e in elements for c in ("chosen", "rejected")), buckets)
  batch = {}
  for c in ("chosen", "rejected"):
    tokens, mask = left_pad([e[f"{c}_tokens"] for e in elements] + filler, length, pad_id)
    loss, _ = left_pad([e[f"{c}_loss"] for e in elements] + filler, length, 0)
    batch.update({f"{c}_tokens": tokens, f"{c}_mask": mask, f"{c}_loss_mask": loss})
  batch.update({"prompt": _strings([e["prompt"] for e in elements], batch_size),
                "index": _ints([e["index"] for e in elements], batch_size),
                "truncated": _flags([e["truncated"] for e in elements], batch_size),
                "valid": _flags([True] * n, batch_size)})
  return batch


def _strings(values: list[str], size: int) -> np.ndarray:
  out = np.full((size,), "", dtype=object)
  out[:len(values)] = values
  return out


def _ints(values: list[int], size: int) -> np.ndarray:
  out = np.full((size,), -1, np.int64)
  out[:len(values)] = values
  return out


def _flags(values: list[bool], size: int) -> np.ndarray:
  out = np.zeros((size,), bool)
  out[:len(values)] = values
  return out
