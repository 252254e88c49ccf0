"""Special-token ids of a checkpoint, read from its own files (never guessed from token names).

A Hugging Face checkpoint directory says what its special tokens are in up to four JSON files:

- ``tokenizer_config.json``: ``bos_token``, ``eos_token``, ``pad_token``, ``unk_token`` (a string, or an
  ``AddedToken`` dict ``{"content": ...}``), ``add_bos_token`` / ``add_eos_token``, ``added_tokens_decoder``
  (id -> token, with its ``special`` flag) and ``chat_template``;
- ``special_tokens_map.json``: the same named tokens (older checkpoints; ``tokenizer_config.json`` wins);
- ``generation_config.json``: ``eos_token_id`` (an int or a list: Llama 3.1 lists three), ``pad_token_id``;
- ``config.json``: the model's ``eos_token_id`` / ``pad_token_id``.

``resolve`` turns them into a ``SpecialTokens``:

- ``bos_id``: the tokenizer's BOS token (None when it has none: Qwen).
- ``eos_ids``: the tokenizer's EOS token first (the one a chat template ends a turn with), then every id of
  ``generation_config.json`` and ``config.json``; a completion ends at the first of any of them.
- ``pad_id``, by priority: (1) the checkpoint's pad (tokenizer files, then the tokenizer model, then
  ``generation_config.json`` / ``config.json``); (2) the ``pad_id=`` argument; (3) the unknown token (Llama 2);
  (4) the lowest-id special token that is not BOS, EOS or UNK and does not occur in the chat template, i.e. a
  reserved token the model never reads in a prompt nor writes (Llama 3: ``<|reserved_special_token_0|>``);
  (5) the first EOS id. Which rule gave it is kept in ``pad_source``.

Why any pad is harmless: padded positions carry mask 0. Left padding is masked out of attention as keys and
out of every loss and reward, and the sampler writes ``pad_id`` only after a row has finished (its mask is 0
there too), so the pad's embedding never reaches a kept logit and receives no gradient. A pad distinct from
the EOS ids is still preferred (rules 3-4), so that a row decoded without its mask never reads padding as
the end of a sequence.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping

NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
CONFIG_FILES = {"tokenizer_config": "tokenizer_config.json", "special_tokens_map": "special_tokens_map.json",
                "generation_config": "generation_config.json", "model_config": "config.json"}


class TokenizerError(ValueError):
  """A tokenizer or chat template that cannot be loaded or used; the message is one line naming the file."""


def one_line(text: Any) -> str:
  """``text`` with its line breaks folded into spaces (every error message of this package is one line)."""
  return " ".join(str(text).split())


def read_json(path: str) -> dict[str, Any] | None:
  """The JSON object in ``path``, or None when the file does not exist.

  Raises:
    TokenizerError: when the file is not UTF-8 JSON or holds something other than an object.
  """
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise TokenizerError(f"{path} is not valid JSON: {one_line(e)}; restore the file from the checkpoint") from e
  if not isinstance(value, dict):
    raise TokenizerError(f"{path} holds a JSON {type(value).__name__}, expected an object")
  return value


@dataclasses.dataclass(frozen=True)
class CheckpointFiles:
  """The JSON files of a checkpoint directory that describe its tokenizer (empty dicts where absent)."""
  directory: str
  tokenizer_config: Mapping[str, Any]
  special_tokens_map: Mapping[str, Any]
  generation_config: Mapping[str, Any]
  model_config: Mapping[str, Any]

  @classmethod
  def read(cls, directory: str | os.PathLike) -> "CheckpointFiles":
    directory = os.fspath(directory)
    found = {name: read_json(os.path.join(directory, file)) or {} for name, file in CONFIG_FILES.items()}
    return cls(directory=directory, **found)

  @classmethod
  def empty(cls) -> "CheckpointFiles":
    return cls(directory="", tokenizer_config={}, special_tokens_map={}, generation_config={}, model_config={})


def token_string(value: Any) -> str | None:
  """A named token's text: the string itself, or the ``content`` of an ``AddedToken`` dict; None if unset."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, Mapping) and isinstance(value.get("content"), str):
    return value["content"]
  raise TokenizerError(f"a special token must be a string or {{'content': ...}}, got {value!r}")


def named_tokens(files: CheckpointFiles) -> dict[str, str]:
  """``{"bos_token": "<s>", ...}`` as the files name them (``tokenizer_config.json`` over
  ``special_tokens_map.json``); these are the variables a chat template sees."""
  out = {}
  for name in NAMED_TOKENS:
    source = files.tokenizer_config if name in files.tokenizer_config else files.special_tokens_map
    text = token_string(source.get(name))
    if text is not None:
      out[name] = text
  return out


def added_tokens(files: CheckpointFiles) -> dict[int, tuple[str, bool]]:
  """``added_tokens_decoder`` of ``tokenizer_config.json`` as ``{id: (content, special)}``."""
  out = {}
  for key, value in (files.tokenizer_config.get("added_tokens_decoder") or {}).items():
    out[int(key)] = (token_string(value), bool(value.get("special", False)) if isinstance(value, Mapping) else False)
  return out


def config_ids(files: CheckpointFiles, key: str) -> list[int]:
  """Every id under ``key`` (an int or a list) in ``generation_config.json``, then ``config.json``."""
  ids = []
  for source in (files.generation_config, files.model_config):
    value = source.get(key)
    for i in value if isinstance(value, list) else [value]:
      if isinstance(i, int) and i not in ids:
        ids.append(i)
  return ids


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  """Resolved special ids (see module docstring).

  Attributes:
    bos_id, unk_id: ids or None.
    eos_ids: every id that ends a sequence, the tokenizer's own EOS first.
    pad_id: the id written into padded positions.
    pad_source: the rule that gave ``pad_id``: files | argument | unk | reserved | eos.
    names: the named token strings of the files (chat template variables).
  """
  bos_id: int | None
  eos_ids: tuple[int, ...]
  pad_id: int
  pad_source: str
  unk_id: int | None
  names: Mapping[str, str]


def _id_of(name: str, text: str | None, to_id: Callable[[str], int | None], where: str) -> int | None:
  if text is None:
    return None
  i = to_id(text)
  if i is None:
    raise TokenizerError(f"{where}: {name} {text!r} is not in the vocabulary; the tokenizer files do not match")
  return i


def resolve(files: CheckpointFiles, *, to_id: Callable[[str], int | None], vocab_size: int,
            model_ids: Mapping[str, int | None], special_ids: Mapping[int, str] = {}, template_text: str = "",
            pad_id: int | None = None, where: str = "") -> SpecialTokens:
  """Special ids from the files, falling back to the tokenizer model's own (``model_ids``: bos/eos/pad/unk).

  Args:
    files: the checkpoint's JSON files.
    to_id: token text -> id (None when not in the vocabulary).
    vocab_size: number of ids (a requested ``pad_id`` must be below it).
    model_ids: ``{"bos", "eos", "pad", "unk"}`` ids the tokenizer model itself declares (None if absent).
    special_ids: ``{id: text}`` of the tokenizer's special tokens (candidates for a reserved pad).
    template_text: the chat template sources (tokens they mention are never picked as pad).
    pad_id: a requested pad id (rule 2); conflicts with a pad of the checkpoint raise.
    where: file or directory named in errors.
  """
  names = named_tokens(files)
  ids = {}
  for k in ("bos", "eos", "pad", "unk"):
    from_files = _id_of(k + "_token", names.get(k + "_token"), to_id, where)
    ids[k] = from_files if from_files is not None else model_ids.get(k)
  eos_ids = [ids["eos"]] if ids["eos"] is not None else []
  eos_ids += [i for i in config_ids(files, "eos_token_id") if i not in eos_ids]
  if not eos_ids:
    raise TokenizerError(f"{where}: no EOS token in the tokenizer files, generation_config.json or config.json")
  pad, source = _pick_pad(ids, eos_ids, files, special_ids, template_text, pad_id, vocab_size, where)
  return SpecialTokens(bos_id=ids["bos"], eos_ids=tuple(eos_ids), pad_id=pad, pad_source=source,
                       unk_id=ids["unk"], names=names)


def _pick_pad(ids, eos_ids, files, special_ids, template_text, requested, vocab_size, where) -> tuple[int, str]:
  """The pad rule of the module docstring; returns ``(pad_id, rule)``."""
  own = ids["pad"]
  if own is None:
    own = next(iter(config_ids(files, "pad_token_id")), None)
  if own is not None:
    if requested is not None and requested != own:
      raise TokenizerError(f"{where}: pad_id={requested} conflicts with the model's own pad id {own}")
    return own, "files"
  if requested is not None:
    if not 0 <= requested < vocab_size:
      raise TokenizerError(f"{where}: pad_id={requested} is outside the vocabulary [0, {vocab_size})")
    return int(requested), "argument"
  if ids["unk"] is not None and ids["unk"] not in eos_ids:
    return ids["unk"], "unk"
  taken = {ids["bos"], ids["unk"], *eos_ids}
  for i, text in sorted(special_ids.items()):
    if i not in taken and text not in template_text:
      return i, "reserved"
  return eos_ids[0], "eos"
