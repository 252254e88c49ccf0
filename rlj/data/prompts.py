"""Prompt text of a record: ``plain`` (a ``str.format`` template) or ``chat`` (the checkpoint's chat template).

A record is ``{"prompt": question, ...}`` (GSM8K's question, a generic prompt) or also carries ``"messages"``: a
conversation (a JSON string, as tfds stores it, or a list) of ``{"role", "content"}`` dicts ending with a user turn
(see ``jsonl.prompt_answer_record``).

- ``user_template``: a ``str.format`` template with a ``{prompt}`` (or ``{question}``) slot, applied to the
  question, and for a conversation to its last user turn; literal braces are written ``{{`` and ``}}``.
- ``system_prompt``: chat only, put first unless the conversation starts with its own system turn.
- ``chat``: messages rendered with ``add_generation_prompt=True``; the prompt's ids are then encoded without an
  added BOS (``add_bos`` returns False), as transformers' ``apply_chat_template(tokenize=True)`` does: a template
  that wants BOS writes it (Llama 3, Gemma), ChatML has none.
- ``plain``: the user template's text, encoded with the tokenizer's own BOS choice (``add_bos_default``); a
  conversation of more than one user turn or with a system turn cannot be plain and raises.

Backslash escapes: a template typed on a command line cannot hold a newline, so in ``user_template`` and
``system_prompt`` the two characters backslash-n become a newline, backslash-t a tab, and a doubled backslash one
backslash; every other backslash is kept (``\\boxed{}`` stays as typed). Write ``\\\\n`` for a literal
backslash-n.
"""
from __future__ import annotations

import dataclasses
import json
import re
import string
from typing import Any, Mapping

from rlj.data.encoding import text

FORMATS = ("plain", "chat")
SLOTS = ("prompt", "question")
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


class PromptError(ValueError):
  """A prompt format or record that cannot be rendered (one line)."""


def decode_escapes(text: str) -> str:
  """``\\n`` -> newline, ``\\t`` -> tab, ``\\\\`` -> backslash; other backslashes unchanged (module docstring)."""
  return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m.group(1)], text)


def check_user_template(template: str) -> str:
  """Returns ``template`` when its ``str.format`` slots are only ``{prompt}`` / ``{question}`` (at least one)."""
  try:
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
  except ValueError as e:
    raise PromptError(f"user_template {template!r} is not a str.format template ({e}); write literal braces as "
                      f"{{{{ and }}}}") from e
  for name in names:
    if name not in SLOTS:
      raise PromptError(f"user_template {template!r} has the slot {{{name}}}; use {{prompt}} or {{question}}, and "
                        f"write literal braces as {{{{ and }}}}")
  if not names:
    raise PromptError(f"user_template {template!r} has no {{prompt}} slot, so the question would be dropped")
  return template


def record_messages(record: Mapping[str, Any]) -> list[dict[str, Any]] | None:
  """The record's conversation (``"messages"`` as a list or a JSON string), or None when it has none."""
  value = record.get("messages")
  if value is None or (isinstance(value, (str, bytes)) and not value):
    return None
  if isinstance(value, (str, bytes)):
    value = json.loads(text(value))
  return [dict(m) for m in value]


@dataclasses.dataclass(frozen=True)
class PromptFormat:
  """How a record becomes prompt text (module docstring); picklable (grain workers).

  Attributes:
    format: "plain" | "chat".
    user_template: ``str.format`` template with a ``{prompt}`` / ``{question}`` slot (escapes decoded).
    system_prompt: chat only; "" for none (escapes decoded).
    chat_template: a ``chat.ChatTemplate`` (chat only).
    template_kwargs: extra chat template variables as ``((name, value), ...)``, e.g. ``(("enable_thinking",
      False),)``.
  """
  format: str = "plain"
  user_template: str = "{prompt}"
  system_prompt: str = ""
  chat_template: Any = None
  template_kwargs: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    if self.format not in FORMATS:
      raise PromptError(f"unknown prompt format {self.format!r}; choose one of {FORMATS}")
    object.__setattr__(self, "user_template", check_user_template(decode_escapes(self.user_template)))
    object.__setattr__(self, "system_prompt", decode_escapes(self.system_prompt or ""))
    if self.format == "chat" and self.chat_template is None:
      raise PromptError("format 'chat' needs the checkpoint's chat template, and this tokenizer has none; use "
                        "format 'plain'")
    if self.format == "plain" and self.system_prompt:
      raise PromptError("a system prompt needs format 'chat'; with format 'plain' put the text into user_template")

  def user_text(self, question: str) -> str:
    return self.user_template.format(prompt=question, question=question)

  def messages(self, record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The conversation to render: the record's own (user template on its last user turn) or a single user turn,
    with the system prompt first unless the conversation has its own system turn."""
    messages = record_messages(record)
    if messages is None:
      messages = [{"role": "user", "content": self.user_text(text(record["prompt"]))}]
    else:
      last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
      if last is None:
        raise PromptError(f"record {record.get('index', '?')}: the conversation has no user turn")
      messages[last]["content"] = self.user_text(messages[last]["content"])
    if self.system_prompt and messages[0].get("role") != "system":
      messages.insert(0, {"role": "system", "content": self.system_prompt})
    return messages

  def render(self, record: Mapping[str, Any]) -> str:
    """The prompt text of ``record``."""
    if self.format == "chat":
      return self.chat_template.render(self.messages(record), add_generation_prompt=True,
                                       **dict(self.template_kwargs))
    messages = record_messages(record)
    if messages is not None:
      if len(messages) != 1 or messages[0].get("role") != "user":
        raise PromptError(f"record {record.get('index', '?')}: format 'plain' cannot render a conversation of "
                          f"{len(messages)} messages ({[m.get('role') for m in messages]}); use format 'chat'")
      return self.user_text(messages[0]["content"])
    return self.user_text(text(record["prompt"]))

  def add_bos(self, tokenizer) -> bool:
    """Whether the encoder adds BOS to the rendered text: chat never (the template decides), plain as the
    tokenizer's checkpoint does."""
    return self.format == "plain" and bool(tokenizer.add_bos_default)


def from_tokenizer(tokenizer, *, format: str = "plain", user_template: str = "{prompt}", system_prompt: str = "",
                   template_kwargs: Mapping[str, Any] | None = None) -> PromptFormat:
  """A ``PromptFormat`` using ``tokenizer``'s chat template (``tokenizer.chat_template``) for format "chat"."""
  template = tokenizer.chat_template
  if format == "chat" and template is None:
    names = getattr(tokenizer, "chat_template_names", ())
    hint = f"it has templates {list(names)} but none named 'default'" if names else "it has none"
    raise PromptError(f"format 'chat' needs the checkpoint's chat template and {hint}; pass its name when loading "
                      f"the tokenizer, or use format 'plain'")
  return PromptFormat(format=format, user_template=user_template, system_prompt=system_prompt,
                      chat_template=template if format == "chat" else None,
                      template_kwargs=tuple(sorted((template_kwargs or {}).items())))
