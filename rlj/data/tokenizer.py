"""SentencePiece tokenizer with explicit special ids: train a small one in-process, or load a ``.model`` file.

Special tokens are never guessed from strings: ``bos_id``, ``eos_id``, ``pad_id`` and ``unk_id`` come from
the model proto (the ``.model`` format Gemma and Llama-2 ship), and ``pad_id`` is resolved once:

1. the model's own pad id when it has one (Gemma: pad 0, eos 1, bos 2);
2. else the ``pad_id=`` argument;
3. else the unknown-token id (Llama-2 has no pad; unk 0 is distinct from eos 2).

Padded positions are always described by a mask as well, so the pad value never carries meaning; it is
kept distinct from ``eos_id`` so that a stray pad is never read as the end of a sequence.

Models trained here use pad 0, unk 1, bos 2, eos 3, digits split into single tokens (exact arithmetic
answers), byte fallback (no unknown characters), and identity normalisation, so
``decode(encode(text)) == text`` for any text. Training is deterministic (one thread, no sampling of the
input sentences): the same corpus and options give byte-identical models.
"""
from __future__ import annotations

import io
import os
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

TRAINED_IDS = {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3}


class Tokenizer:
  """A SentencePiece model plus resolved special-token ids; picklable (for grain worker processes)."""

  def __init__(self, model_proto: bytes, *, pad_id: int | None = None):
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor()
    self._sp.LoadFromSerializedProto(self._proto)
    self._requested_pad_id = pad_id
    self.vocab_size = int(self._sp.GetPieceSize())
    self.bos_id = int(self._sp.bos_id())
    self.eos_id = int(self._sp.eos_id())
    self.unk_id = int(self._sp.unk_id())
    self.pad_id = _resolve_pad_id(int(self._sp.pad_id()), pad_id, self.unk_id, self.vocab_size)

  @classmethod
  def from_file(cls, path: str | os.PathLike, *, pad_id: int | None = None) -> "Tokenizer":
    """Loads a SentencePiece ``.model`` file."""
    with open(path, "rb") as f:
      return cls(f.read(), pad_id=pad_id)

  @property
  def model_proto(self) -> bytes:
    """The serialized model (what ``save`` writes)."""
    return self._proto

  def save(self, path: str | os.PathLike) -> None:
    with open(path, "wb") as f:
      f.write(self._proto)

  def __getstate__(self):
    return {"model_proto": self._proto, "pad_id": self._requested_pad_id}

  def __setstate__(self, state):
    self.__init__(state["model_proto"], pad_id=state["pad_id"])

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Token ids of ``text``, with BOS / EOS added only when asked (and when the model has them)."""
    ids = list(self._sp.EncodeAsIds(text))
    if add_bos:
      ids.insert(0, _require(self.bos_id, "bos"))
    if add_eos:
      ids.append(_require(self.eos_id, "eos"))
    return ids

  def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
    return [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]

  def decode(self, ids: Iterable[int], *, stop_at_eos: bool = True) -> str:
    """Text of ``ids``; BOS and PAD are dropped, and decoding stops at the first EOS when asked."""
    out = []
    for i in ids:
      i = int(i)
      if stop_at_eos and i == self.eos_id:
        break
      if i not in (self.bos_id, self.pad_id, self.eos_id):
        out.append(i)
    return self._sp.DecodeIds(out)

  def decode_batch(self, tokens, mask=None, *, stop_at_eos: bool = True) -> list[str]:
    """Decodes each row of ``tokens`` [B, T] (array or list of lists), keeping positions where ``mask`` [B, T]
    is nonzero when given."""
    if mask is None:
      return [self.decode(row, stop_at_eos=stop_at_eos) for row in tokens]
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    if tokens.shape != mask.shape:
      raise ValueError(f"tokens {tokens.shape} and mask {mask.shape} differ in shape")
    return [self.decode(row[m != 0], stop_at_eos=stop_at_eos) for row, m in zip(tokens, mask)]

  def id_to_piece(self, i: int) -> str:
    return self._sp.IdToPiece(int(i))


def _require(token_id: int, name: str) -> int:
  if token_id < 0:
    raise ValueError(f"this tokenizer has no {name} token")
  return token_id


def _resolve_pad_id(model_pad: int, requested: int | None, unk_id: int, vocab_size: int) -> int:
  """Pad id by priority: the model's, the requested one, then unk (see module docstring)."""
  if model_pad >= 0:
    if requested is not None and requested != model_pad:
      raise ValueError(f"pad_id={requested} conflicts with the model's own pad id {model_pad}")
    return model_pad
  if requested is not None:
    if not 0 <= requested < vocab_size:
      raise ValueError(f"pad_id={requested} is outside the vocabulary [0, {vocab_size})")
    return int(requested)
  if unk_id >= 0:
    return unk_id
  raise ValueError("the model has neither a pad nor an unk token; pass pad_id=")


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
