"""Hugging Face ``tokenizer.json`` back end (the ``tokenizers`` library; transformers is not needed at run time).

Encoding matches transformers' fast tokenizers: added tokens (special or not) written in the text are matched
before the model runs (unless ``tokenizer_config.json`` sets ``split_special_tokens``), and tokens that the config
names but ``tokenizer.json`` lacks are added after its vocabulary, as transformers adds them.

Whether a plain text gets a BOS / EOS (``add_bos_default`` / ``add_eos_default``): ``add_bos_token`` /
``add_eos_token`` when ``tokenizer_config.json`` sets either (transformers then rebuilds the post-processor from
them), else what ``tokenizer.json``'s post-processor adds to an empty text (Llama 3 adds ``<|begin_of_text|>``,
Qwen adds nothing).
"""
from __future__ import annotations

import os

import tokenizers

from rlj.data.special_tokens import (CheckpointFiles, TokenizerError, added_tokens, named_tokens, one_line,
                                     resolve)
from rlj.data.tokenizer import HF_FILE, TokenizerBase, _require, _save_configs


def parse(json_text: str, *, where: str) -> tokenizers.Tokenizer:
  """A ``tokenizers.Tokenizer`` from a ``tokenizer.json``'s text; a one-line ``TokenizerError`` if it does not parse."""
  try:
    return tokenizers.Tokenizer.from_str(json_text)
  except Exception as e:  # the library raises a bare Exception with the parser's reason
    raise TokenizerError(f"{where} does not parse as a Hugging Face tokenizer.json: {one_line(e)}; restore the "
                         f"file from the checkpoint") from e


class HFTokenizer(TokenizerBase):
  """A ``tokenizer.json`` plus resolved special ids (see ``special_tokens``); picklable."""
  kind = "hf"

  def __init__(self, json_text: str, *, files: CheckpointFiles | None = None, template_text: str = "",
               pad_id: int | None = None, where: str = HF_FILE):
    self._json, self._files, self._template_text = json_text, files or CheckpointFiles.empty(), template_text
    self._requested_pad_id, self._where = pad_id, where
    self._tok = parse(json_text, where=where)
    config = self._files.tokenizer_config
    self._add_missing_tokens()
    self._tok.encode_special_tokens = bool(config.get("split_special_tokens", False))
    specials = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
    vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), max(specials, default=-1) + 1)
    unk = getattr(self._tok.model, "unk_token", None)
    special = resolve(self._files, to_id=self.token_to_id, vocab_size=vocab_size,
                      model_ids={"unk": self.token_to_id(unk) if unk else None}, special_ids=specials,
                      template_text=template_text, pad_id=pad_id, where=where)
    bos, eos = self._post_processor_adds(special.bos_id, special.eos_ids[0])
    if "add_bos_token" in config or "add_eos_token" in config:
      bos, eos = bool(config.get("add_bos_token", False)), bool(config.get("add_eos_token", False))
    self._set_special(special, vocab_size, add_bos=bos, add_eos=eos)

  @classmethod
  def from_file(cls, path: str | os.PathLike, **kwargs) -> "HFTokenizer":
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise TokenizerError(f"no such file: {path}; pass a checkpoint folder or its tokenizer.json")
    try:
      with open(path, encoding="utf-8") as f:
        text = f.read()
    except UnicodeDecodeError as e:
      raise TokenizerError(f"{path} does not parse as a Hugging Face tokenizer.json: not UTF-8 text ({e.reason})")
    return cls(text, where=path, **kwargs)

  def _add_missing_tokens(self) -> None:
    """Adds the config's named and ``added_tokens_decoder`` tokens that ``tokenizer.json`` lacks (as transformers)."""
    wanted = [(text, special) for _, (text, special) in sorted(added_tokens(self._files).items())]
    wanted += [(text, True) for text in named_tokens(self._files).values()]
    for text, special in wanted:
      if self._tok.token_to_id(text) is None:
        token = tokenizers.AddedToken(text, special=special, normalized=not special)
        (self._tok.add_special_tokens if special else self._tok.add_tokens)([token])

  def _post_processor_adds(self, bos_id: int | None, eos_id: int) -> tuple[bool, bool]:
    """Whether ``tokenizer.json``'s post-processor puts BOS first / EOS last on a plain text."""
    plain = self._tok.encode("x", add_special_tokens=False).ids
    full = self._tok.encode("x", add_special_tokens=True).ids
    adds_bos = bos_id is not None and full[:1] == [bos_id] and plain[:1] != [bos_id]
    return adds_bos, full[-1:] == [eos_id] and plain[-1:] != [eos_id]

  def __getstate__(self):
    return {"json_text": self._json, "files": self._files, "template_text": self._template_text,
            "pad_id": self._requested_pad_id, "where": self._where, "chat_template": self.chat_template,
            "chat_template_names": self.chat_template_names}

  def __setstate__(self, state):
    self.__init__(state["json_text"], files=state["files"], template_text=state["template_text"],
                  pad_id=state["pad_id"], where=state["where"])
    self.chat_template, self.chat_template_names = state["chat_template"], state["chat_template_names"]

  def save_pretrained(self, directory: str | os.PathLike) -> None:
    """Writes ``tokenizer.json`` and the tokenizer's JSON files, so that ``load(directory)`` rebuilds it."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, HF_FILE), "w", encoding="utf-8") as f:
      f.write(self._json)
    _save_configs(self, directory)

  def token_to_id(self, text: str) -> int | None:
    return self._tok.token_to_id(text)

  def id_to_piece(self, i: int) -> str:
    return self._tok.id_to_token(int(i))

  def _encode_text(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def encode_batch(self, texts, *, add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
    """Like ``encode`` for each text, in one call to the library (which may use several threads)."""
    head = [_require(self.bos_id, "bos")] if add_bos else []
    tail = [self.eos_id] if add_eos else []
    return [head + list(e.ids) + tail for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def _decode_ids(self, ids: list[int]) -> str:
    return self._tok.decode(ids, skip_special_tokens=False)
