"""Chat templates as checkpoints ship them, rendered by jinja2 the way transformers renders them.

Where a checkpoint keeps its template(s) (``find_templates``), in transformers' order: ``chat_template.jinja``
(named "default") and ``additional_chat_templates/<name>.jinja``; else ``tokenizer_config.json``'s
``chat_template``, a string or a list of ``{"name", "template"}``.

How a template is rendered (``ChatTemplate.render``), matching ``apply_chat_template(messages, tokenize=False,
add_generation_prompt=...)`` byte for byte:

- environment: ``jinja2.sandbox.ImmutableSandboxedEnvironment`` (templates from the Hub are untrusted code) with
  ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension (``break`` / ``continue``) and a
  ``{% generation %}`` block (assistant-mask markers) that renders its body unchanged;
- globals: ``raise_exception(msg)`` (raises, see below), ``strftime_now(fmt)`` (local time), a ``dict`` that
  only builds dicts, a ``namespace`` that refuses names starting with "_";
- filter ``tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)``: ``json.dumps``
  without jinja's HTML escaping;
- variables: ``messages`` (plain copies; keys whose value is None dropped; a message's reasoning given as
  ``reasoning_content``, ``thinking`` or ``reasoning`` is visible under the first two names), ``tools`` (None, or
  the tools' JSON schemas given as a keyword),
  ``documents=None``, ``add_generation_prompt``, the checkpoint's named tokens (``bos_token``, ``eos_token``, ...)
  and any extra keyword (``enable_thinking``, ``date_string``), which overrides a token of the same name.

A template that fails raises ``ChatTemplateError``: one line with the template's own message and the index of the
last message it read before failing (Gemma refuses a system turn: "System role not supported (message 0)").

Warning:
  transformers also fills named tokens from a tokenizer class's defaults (``GemmaTokenizer``'s "<mask>") when the
  files do not name them; only tokens named in the files are variables here.
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Any, Mapping, Sequence

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rlj.data.special_tokens import TokenizerError, one_line

TEMPLATE_FILE, TEMPLATE_DIR = "chat_template.jinja", "additional_chat_templates"
_REASONING = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(TokenizerError):
  """A chat template that does not compile or render (one line: template, reason, message index)."""


def find_templates(directory: str, tokenizer_config: Mapping[str, Any]) -> dict[str, str]:
  """``{name: source}`` of a checkpoint's chat templates (module docstring); ``{}`` when it has none."""
  found = {}
  if os.path.isfile(os.path.join(directory, TEMPLATE_FILE)):
    found["default"] = _read(os.path.join(directory, TEMPLATE_FILE))
  extra_dir = os.path.join(directory, TEMPLATE_DIR)
  if os.path.isdir(extra_dir):
    for file in sorted(os.listdir(extra_dir)):
      if file.endswith(".jinja"):
        found[file[:-len(".jinja")]] = _read(os.path.join(extra_dir, file))
  if found:
    return found
  value = tokenizer_config.get("chat_template")
  if value is None:
    return {}
  if isinstance(value, str):
    return {"default": value}
  if isinstance(value, list) and all(isinstance(t, Mapping) and {"name", "template"} <= set(t) for t in value):
    return {t["name"]: t["template"] for t in value}
  raise ChatTemplateError(f"{os.path.join(directory, 'tokenizer_config.json')}: chat_template must be a string or a "
                          f"list of {{'name', 'template'}}, got {type(value).__name__}")


def _read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def pick_template(templates: Mapping[str, str], special_tokens: Mapping[str, str], *, name: str | None = None,
                  where: str = "") -> "ChatTemplate | None":
  """The template called ``name`` (None: "default"; None when the checkpoint has no default template).

  ``where`` is the checkpoint directory; errors name the file the template came from.
  """
  if name is not None and name not in templates:
    raise ChatTemplateError(f"{where}: no chat template named {name!r}; it has {sorted(templates) or 'none'}")
  name = name or "default"
  if name not in templates:
    return None
  return ChatTemplate(templates[name], special_tokens=special_tokens, where=_origin(where, name))


def _origin(directory: str, name: str) -> str:
  """The file a checkpoint's template ``name`` was read from (as ``find_templates`` looks for it)."""
  candidates = [os.path.join(directory, TEMPLATE_FILE)] if name == "default" else []
  candidates.append(os.path.join(directory, TEMPLATE_DIR, name + ".jinja"))
  for path in candidates:
    if os.path.isfile(path):
      return path
  config = os.path.join(directory, "tokenizer_config.json")
  return config if name == "default" else f"{config} [{name}]"


class _GenerationBlock(Extension):
  """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; here it renders its body."""
  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

  def _render_body(self, caller):
    return caller()


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
  return datetime.datetime.now().strftime(fmt)


class _DictMaker:
  """The template's ``dict``: builds plain dicts, exposes nothing else of the type."""

  def __call__(self, *args, **kwargs):
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs):
    return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
  """jinja's ``namespace`` that refuses attribute names starting with "_" (no way to CPython internals)."""

  def __init__(*args, **kwargs):  # jinja's signature: the instance comes in args[0]
    self, attrs = args[0], dict(*args[1:], **kwargs)
    for key in attrs:
      _Namespace._check(key)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _Namespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name):
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(f"a chat template may not set the namespace attribute {name!r}")


def environment() -> ImmutableSandboxedEnvironment:
  """The sandboxed jinja2 environment chat templates are compiled in (module docstring)."""
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"])
  env.filters["tojson"] = _tojson
  env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_DictMaker(),
                     namespace=_Namespace)
  return env


def plain_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Copies of ``messages`` as the template sees them: None values dropped, reasoning aliased (module docstring)."""
  out = []
  for i, message in enumerate(messages):
    if not isinstance(message, Mapping):
      raise ChatTemplateError(f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
    m = {k: _plain(v) for k, v in message.items() if v is not None}
    reasoning = next((m[k] for k in _REASONING if k in m), None)
    if reasoning is not None:
      m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
    out.append(m)
  return out


def _plain(value):
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


class _Tracked(list):
  """A message list that records which message index the template read last (to name it in errors)."""

  def __init__(self, items, seen: list[int], offset: int = 0):
    super().__init__(items)
    self._seen, self._offset = seen, offset

  def __getitem__(self, index):
    if isinstance(index, slice):
      start, _, step = index.indices(len(self))
      items = list.__getitem__(self, index)
      return _Tracked(items, self._seen, self._offset + start) if step == 1 else items
    self._seen.append(self._offset + (index if index >= 0 else len(self) + index))
    return list.__getitem__(self, index)

  def __iter__(self):
    for k in range(len(self)):
      self._seen.append(self._offset + k)
      yield list.__getitem__(self, k)


class ChatTemplate:
  """One jinja chat template with the checkpoint's named tokens; picklable (compiled again after unpickling)."""

  def __init__(self, source: str, *, special_tokens: Mapping[str, str] | None = None, where: str = "chat template"):
    self.source, self.special_tokens, self.where = source, dict(special_tokens or {}), where
    try:
      self._template = environment().from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
      raise ChatTemplateError(f"{where}: chat template does not compile: {one_line(e.message)} (template line "
                              f"{e.lineno})") from e

  def __getstate__(self):
    return {"source": self.source, "special_tokens": self.special_tokens, "where": self.where}

  def __setstate__(self, state):
    self.__init__(state["source"], special_tokens=state["special_tokens"], where=state["where"])

  def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True, **kwargs) -> str:
    """The prompt text for ``messages`` (``[{"role": ..., "content": ...}, ...]``), as transformers renders it.

    Raises:
      ChatTemplateError: the template's own message (``raise_exception``) or jinja's error, with the index of
        the last message read.
    """
    if not messages:
      raise ChatTemplateError(f"{self.where}: no messages to render")
    plain = plain_messages(messages)
    variables = {**self.special_tokens, **kwargs}
    try:
      return self._render(plain, add_generation_prompt, variables)
    except Exception as e:  # noqa: BLE001  a template can fail in any way; report it in one line
      seen: list[int] = []
      try:
        self._render(_Tracked(plain, seen), add_generation_prompt, variables)
      except Exception:  # noqa: BLE001  the same failure, now with the messages it read
        pass
      at = f" (message {seen[-1]})" if seen else ""
      raise ChatTemplateError(f"{self.where}: chat template error: {one_line(e) or type(e).__name__}{at}") from e

  def _render(self, messages, add_generation_prompt, variables) -> str:
    variables = {"tools": None, "documents": None, **variables}
    if variables["tools"] is not None:
      variables["tools"] = _plain(variables["tools"])   # the tools' JSON schemas, as plain lists and dicts
    return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)

  @property
  def adds_bos(self) -> bool:
    """Whether the rendered prompt already starts with the BOS token (Llama 3, Gemma: yes; ChatML: no)."""
    bos = self.special_tokens.get("bos_token")
    if not bos:
      return False
    try:
      return self.render([{"role": "user", "content": "x"}]).startswith(bos)
    except ChatTemplateError:
      return False
