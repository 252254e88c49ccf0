"""Tokenizers as checkpoints ship them: one interface over SentencePiece ``.model`` and Hugging Face ``tokenizer.json``.

``load(path, kind="auto")`` reads a checkpoint directory (``tokenizer.json`` with the ``tokenizers`` library, else
``tokenizer.model`` with sentencepiece) or one of those files, plus the JSON files beside it, which name the special
tokens (see ``special_tokens``) and the chat template (see ``chat``). ``train`` makes a small SentencePiece model in
process. Both back ends share these attributes and methods (``TokenizerBase``):

- ``vocab_size`` (every id the tokenizer can produce is below it; a model's embedding may be larger: Qwen2.5 embeds
  151,936 rows for 151,665 tokens), ``bos_id``, ``eos_id`` (the tokenizer's own EOS), ``eos_ids`` (every id that
  ends a completion: ``generation_config.json`` lists three for Llama 3.1), ``pad_id`` and ``pad_source``,
  ``unk_id`` (None where a token does not exist), ``special_tokens`` (the named token strings of the files),
  ``add_bos_default`` / ``add_eos_default`` (what the checkpoint's tokenizer adds to a plain text),
  ``chat_template`` (a ``chat.ChatTemplate`` or None);
- ``encode(text, add_bos=False, add_eos=False)``: special-token strings inside ``text`` become their ids, as in
  transformers' ``tokenizer(text, add_special_tokens=False)``; ``encode_batch``; ``decode`` / ``decode_batch``
  (BOS and PAD dropped, stop at the first of ``eos_ids``); ``id_to_piece``, ``token_to_id``; pickling (grain
  worker processes) and ``save_pretrained``.

Models trained here use pad 0, unk 1, bos 2, eos 3, digits split into single tokens (exact arithmetic answers),
byte fallback (no unknown characters), and identity normalisation, so ``decode(encode(text)) == text`` for any
text. Training is deterministic (one thread, no sampling of the input sentences).

Warning:
  Decoding is exact (no ``clean_up_tokenization_spaces``), so ``decode`` can differ from transformers' ``decode`` for
  checkpoints whose config turns that clean-up on (Llama 3): " ." stays " .". For SentencePiece models with
  ``add_dummy_prefix`` (Llama 2), text after a special-token string gets its own dummy prefix.
"""
from __future__ import annotations

import io
import json
import os
import re
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from rlj.data.special_tokens import (CheckpointFiles, SpecialTokens, TokenizerError, added_tokens, one_line,
                                     resolve)

TRAINED_IDS = {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3}
KINDS = ("auto", "hf", "sentencepiece")
HF_FILE, SP_FILE = "tokenizer.json", "tokenizer.model"

__all__ = ["TokenizerError", "TokenizerBase", "Tokenizer", "load", "train", "KINDS"]


class TokenizerBase:
  """What both back ends share: special ids and the encode / decode conventions (see module docstring)."""
  kind = ""
  chat_template = None  # a chat.ChatTemplate, set by ``load``
  chat_template_names: tuple[str, ...] = ()  # every template the checkpoint has

  def _set_special(self, special: SpecialTokens, vocab_size: int, add_bos: bool, add_eos: bool) -> None:
    self.vocab_size = int(vocab_size)
    self.bos_id, self.unk_id, self.pad_id = special.bos_id, special.unk_id, special.pad_id
    self.eos_ids = tuple(special.eos_ids)
    self.eos_id = self.eos_ids[0]
    self.pad_source = special.pad_source
    self.special_tokens = dict(special.names)
    self.add_bos_default = bool(add_bos and self.bos_id is not None)
    self.add_eos_default = bool(add_eos)

  def _encode_text(self, text: str) -> list[int]:
    raise NotImplementedError

  def _decode_ids(self, ids: list[int]) -> str:
    raise NotImplementedError

  def id_to_piece(self, i: int) -> str:
    raise NotImplementedError

  def token_to_id(self, text: str) -> int | None:
    raise NotImplementedError

  def single_token(self, text: str) -> tuple[int | None, list[int]]:
    """``(id, [id])`` when ``text`` is one token (a named token of the vocabulary, or one encoded piece), else
    ``(None, its ids)``: stop tokens and judge verdicts must be single tokens."""
    tid = self.token_to_id(text)
    if tid is not None:
      return int(tid), [int(tid)]
    ids = self.encode(text)
    return (int(ids[0]) if len(ids) == 1 else None), ids

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Token ids of ``text``, with BOS / EOS added only when asked (and when the model has them)."""
    ids = self._encode_text(text)
    if add_bos:
      ids.insert(0, _require(self.bos_id, "bos"))
    if add_eos:
      ids.append(self.eos_id)
    return ids

  def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
    return [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]

  def decode(self, ids: Iterable[int], *, stop_at_eos: bool = True) -> str:
    """Text of ``ids``: BOS and PAD are dropped, EOS ids too, and decoding stops at the first of ``eos_ids`` when
    asked. Other special tokens (turn markers) are kept as their text. Ids past the vocabulary (a model whose
    embedding is padded beyond the tokenizer, as many checkpoints' are, can sample them) have no text and are
    dropped."""
    out, drop = [], {self.bos_id, self.pad_id, *self.eos_ids}
    for i in ids:
      i = int(i)
      if stop_at_eos and i in self.eos_ids:
        break
      if i not in drop and 0 <= i < self.vocab_size:
        out.append(i)
    return self._decode_ids(out)

  def decode_batch(self, tokens, mask=None, *, stop_at_eos: bool = True) -> list[str]:
    """Decodes each row of ``tokens`` [B, T] (array or list of lists), keeping positions where ``mask`` [B, T]
    is nonzero when given."""
    if mask is None:
      return [self.decode(row, stop_at_eos=stop_at_eos) for row in tokens]
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    if tokens.shape != mask.shape:
      raise ValueError(f"tokens {tokens.shape} and mask {mask.shape} differ in shape")
    return [self.decode(row[m != 0], stop_at_eos=stop_at_eos) for row, m in zip(tokens, mask)]


def _require(token_id: int | None, name: str) -> int:
  if token_id is None:
    raise TokenizerError(f"this tokenizer has no {name} token")
  return token_id


class Tokenizer(TokenizerBase):
  """A SentencePiece model plus resolved special ids; picklable (for grain worker processes).

  ``files`` (a checkpoint's JSON files) name the special tokens and may add tokens past the model's pieces
  (``added_tokens_decoder``); without them the ids come from the model proto (Gemma: pad 0, eos 1, bos 2; Llama 2:
  unk 0, bos 1, eos 2, no pad, so pad falls back to unk, see ``special_tokens``).
  """
  kind = "sentencepiece"

  def __init__(self, model_proto: bytes, *, pad_id: int | None = None, files: CheckpointFiles | None = None,
               template_text: str = "", where: str = "<sentencepiece model>"):
    self._proto, self._requested_pad_id = bytes(model_proto), pad_id
    self._files, self._template_text, self._where = files or CheckpointFiles.empty(), template_text, where
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(self._proto)
    except RuntimeError as e:
      raise TokenizerError(f"{where} is not a sentencepiece model ({one_line(e)}); pass the checkpoint's "
                           f"tokenizer.model") from e
    pieces, added = int(self._sp.GetPieceSize()), added_tokens(self._files)
    self._extra = {text: i for i, (text, _) in added.items() if i >= pieces}  # tokens past the model's pieces
    self._extra_by_id = {i: text for text, i in self._extra.items()}
    vocab_size = max([pieces - 1, *self._extra_by_id]) + 1
    own = {k: int(getattr(self._sp, k + "_id")()) for k in ("bos", "eos", "pad", "unk")}
    control = {i: self._sp.IdToPiece(i) for i in range(pieces) if self._sp.IsControl(i) or self._sp.IsUnknown(i)}
    special_ids = {**control, **{i: text for i, (text, special) in added.items() if special}}
    special = resolve(self._files, to_id=self.token_to_id, vocab_size=vocab_size,
                      model_ids={k: (v if v >= 0 else None) for k, v in own.items()}, special_ids=special_ids,
                      template_text=template_text, pad_id=pad_id, where=where)
    config = self._files.tokenizer_config
    self._set_special(special, vocab_size, add_bos=config.get("add_bos_token", True),
                      add_eos=config.get("add_eos_token", False))
    # Control and unknown pieces decode as their text (sentencepiece would drop them / write " ⁇ "), as in
    # transformers; they and the added tokens are the strings the sentencepiece library would not match in text.
    self._literal = {**control, **self._extra_by_id}
    strings = set(control.values()) | {text for text, _ in added.values()}
    split = not config.get("split_special_tokens", False) and strings
    self._special_re = re.compile("|".join(map(re.escape, sorted(strings, key=len, reverse=True)))) if split else None

  @classmethod
  def from_file(cls, path: str | os.PathLike, *, pad_id: int | None = None) -> "Tokenizer":
    """Loads a SentencePiece ``.model`` file alone (no checkpoint JSON files; see ``load`` for those)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise TokenizerError(f"no such file: {path}; pass a tokenizer.model file or a checkpoint folder")
    with open(path, "rb") as f:
      return cls(f.read(), pad_id=pad_id, where=path)

  @property
  def model_proto(self) -> bytes:
    """The serialized model (what ``save`` writes)."""
    return self._proto

  def save(self, path: str | os.PathLike) -> None:
    with open(path, "wb") as f:
      f.write(self._proto)

  def save_pretrained(self, directory: str | os.PathLike) -> None:
    """Writes ``tokenizer.model`` and the tokenizer's JSON files, so that ``load(directory)`` rebuilds it."""
    os.makedirs(directory, exist_ok=True)
    self.save(os.path.join(directory, SP_FILE))
    _save_configs(self, directory)

  def __getstate__(self):
    return {"model_proto": self._proto, "pad_id": self._requested_pad_id, "files": self._files,
            "template_text": self._template_text, "where": self._where, "chat_template": self.chat_template,
            "chat_template_names": self.chat_template_names}

  def __setstate__(self, state):
    self.__init__(state["model_proto"], pad_id=state["pad_id"], files=state.get("files"),
                  template_text=state.get("template_text", ""), where=state.get("where", "<sentencepiece model>"))
    self.chat_template = state.get("chat_template")
    self.chat_template_names = state.get("chat_template_names", ())

  def token_to_id(self, text: str) -> int | None:
    if text in self._extra:
      return self._extra[text]
    i = int(self._sp.PieceToId(text))
    return i if self._sp.IdToPiece(i) == text else None

  def id_to_piece(self, i: int) -> str:
    i = int(i)
    return self._extra_by_id[i] if i in self._extra_by_id else self._sp.IdToPiece(i)

  def _encode_text(self, text: str) -> list[int]:
    if self._special_re is None:
      return list(self._sp.EncodeAsIds(text))
    ids, start = [], 0
    for m in self._special_re.finditer(text):
      ids += self._sp.EncodeAsIds(text[start:m.start()]) if m.start() > start else []
      ids.append(self.token_to_id(m.group()))
      start = m.end()
    return ids + (list(self._sp.EncodeAsIds(text[start:])) if start < len(text) else [])

  def _decode_ids(self, ids: list[int]) -> str:
    parts, run = [], []
    for i in ids:
      if i in self._literal:
        parts += [self._sp.DecodeIds(run), self._literal[i]]
        run = []
      else:
        run.append(i)
    return "".join(parts) + self._sp.DecodeIds(run)


def _save_configs(tok: TokenizerBase, directory) -> None:
  """Writes the tokenizer JSON files a back end was loaded with, its chat template, and a
  ``generation_config.json`` holding every EOS id (when there are several, or the checkpoint had that file)."""
  files = tok._files
  config = dict(files.tokenizer_config)
  if tok.chat_template is not None:
    config["chat_template"] = tok.chat_template.source
  generation = dict(files.generation_config)
  if generation or len(tok.eos_ids) > 1:
    generation["eos_token_id"] = list(tok.eos_ids)
  for name, value in (("tokenizer_config.json", config), ("special_tokens_map.json", files.special_tokens_map),
                      ("generation_config.json", generation)):
    if value:
      with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, indent=2)


def load(path: str | os.PathLike, kind: str = "auto", *, pad_id: int | None = None,
         chat_template: str | None = None) -> TokenizerBase:
  """Loads a checkpoint's tokenizer with its special tokens and chat template.

  Args:
    path: a checkpoint directory, or its ``tokenizer.json`` / ``.model`` file (JSON files beside it are read too).
    kind: "auto" (a directory: ``tokenizer.json`` if present, else ``tokenizer.model``; a file: by its name) |
      "hf" (``tokenizer.json`` with the ``tokenizers`` library) | "sentencepiece".
    pad_id: pad id for a checkpoint that names none (see ``special_tokens``).
    chat_template: name of one of several named chat templates (None: "default").

  Raises:
    TokenizerError: one line naming the path and the fix (missing file, unparsable file, unknown kind, ...).
  """
  from rlj.data import chat  # jinja2 only when a checkpoint is loaded
  path = os.fspath(path)
  if kind not in KINDS:
    raise TokenizerError(f"unknown tokenizer kind {kind!r}; choose one of {KINDS}")
  if not os.path.exists(path):
    raise TokenizerError(f"no such file or folder: {path}; pass a checkpoint folder or its tokenizer.json / "
                         f"tokenizer.model file")
  file, kind = _tokenizer_file(path, kind)
  directory = os.path.dirname(file)
  files = CheckpointFiles.read(directory)
  templates = chat.find_templates(directory, files.tokenizer_config)
  template_text = "".join(templates.values())
  if kind == "hf":
    from rlj.data.hf_tokenizer import HFTokenizer
    tok = HFTokenizer.from_file(file, files=files, template_text=template_text, pad_id=pad_id)
  else:
    with open(file, "rb") as f:
      tok = Tokenizer(f.read(), pad_id=pad_id, files=files, template_text=template_text, where=file)
  tok.chat_template = chat.pick_template(templates, tok.special_tokens, name=chat_template, where=directory)
  tok.chat_template_names = tuple(sorted(templates))
  return tok


def _tokenizer_file(path: str, kind: str) -> tuple[str, str]:
  """``(file, kind)`` for a path and a requested kind (see ``load``)."""
  if os.path.isdir(path):
    hf, sp = os.path.join(path, HF_FILE), os.path.join(path, SP_FILE)
    if kind == "auto":
      if not (os.path.isfile(hf) or os.path.isfile(sp)):
        raise TokenizerError(f"the folder {path} has no {HF_FILE} or {SP_FILE}; pass the checkpoint folder the "
                             f"tokenizer came with, or the tokenizer file itself")
      kind = "hf" if os.path.isfile(hf) else "sentencepiece"
    file = hf if kind == "hf" else sp
    if not os.path.isfile(file):
      other = SP_FILE if kind == "hf" else HF_FILE
      has_other = os.path.isfile(os.path.join(path, other))
      raise TokenizerError(f"the folder {path} has no {os.path.basename(file)} (tokenizer kind {kind!r})"
                           + (f"; it has {other}: use tokenizer kind 'auto'" if has_other else
                              f" and no {other}; pass the checkpoint folder the tokenizer came with"))
    return file, kind
  if kind == "auto":
    kind = "hf" if path.endswith(".json") else "sentencepiece"
  return path, kind


def train(corpus: Iterable[str], *, vocab_size: int, model_type: str = "bpe", byte_fallback: bool = True,
          max_sentence_length: int = 16384, extra_options: dict | None = None) -> Tokenizer:
  """Trains a SentencePiece model in memory from an iterable of texts (deterministic).

  Args:
    corpus: training texts (each one a "sentence"; newlines inside are kept as characters).
    vocab_size: number of pieces including the 4 special tokens (and 256 byte pieces with byte_fallback).
    model_type: "bpe" | "unigram" | "char" | "word".
    byte_fallback: encode characters outside the vocabulary as UTF-8 byte pieces instead of unk.
    max_sentence_length: longest training text in bytes (longer ones are skipped by sentencepiece).
    extra_options: more sentencepiece trainer flags, overriding the defaults here.

  Returns:
    The trained ``Tokenizer`` (pad 0, unk 1, bos 2, eos 3).
  """
  texts = [t for t in corpus if t]
  if not texts:
    raise ValueError("cannot train a tokenizer on an empty corpus")
  options = dict(
      model_type=model_type, vocab_size=vocab_size, byte_fallback=byte_fallback, split_digits=True,
      character_coverage=1.0, normalization_rule_name="identity", add_dummy_prefix=False,
      remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, user_defined_symbols=["\n"],
      num_threads=1, shuffle_input_sentence=False, input_sentence_size=0, max_sentence_length=max_sentence_length,
      hard_vocab_limit=False, minloglevel=2, **TRAINED_IDS)
  options.update(extra_options or {})
  buf = io.BytesIO()
  spm.SentencePieceTrainer.Train(sentence_iterator=iter(texts), model_writer=buf, **options)
  return Tokenizer(buf.getvalue())
