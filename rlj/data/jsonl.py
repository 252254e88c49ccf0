"""Strict JSONL reading: every bad line is reported as ``file:line`` (``file:line:column`` for JSON syntax) with
the reason and the fix, in one line.

A JSONL file holds one JSON object per line (``.jsonl``, or gzip-compressed ``.jsonl.gz``). Reading is
strict on purpose: a dataset with a broken line is a broken dataset, and silently skipping rows changes
record counts and indices. The only tolerance is a final newline at the end of the file.
"""
from __future__ import annotations

import gzip
import json
import os
from typing import Any, Iterator, Sequence


class JsonlError(ValueError):
  """A malformed JSONL line; the message is one line that starts with ``file:line:`` (``file:line:column:`` for
  JSON syntax errors)."""


def open_binary(path: str | os.PathLike):
  """Opens a file for reading bytes, decompressing it when its name ends in ``.gz``."""
  path = os.fspath(path)
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_jsonl(path: str | os.PathLike, *, fields: Sequence[str] = ()) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yields ``(line_number, record)`` for each line of a JSONL file, 1-based line numbers.

  Args:
    path: a ``.jsonl`` or ``.jsonl.gz`` file.
    fields: names every record must carry as strings; a missing or non-string field raises.

  Raises:
    JsonlError: naming file and line for a line that is not JSON, not a JSON object, blank, not UTF-8,
      or lacks one of ``fields`` (the message names the field).
  """
  path = os.fspath(path)
  with open_binary(path) as f:
    for line_no, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise JsonlError(f"{path}:{line_no}: not valid UTF-8 ({e.reason} at byte {e.start} of the line); save the "
                         f"file as UTF-8") from e
      yield line_no, parse_line(line, path=path, line_no=line_no, fields=fields)


def parse_line(line: str, *, path: str, line_no: int, fields: Sequence[str] = ()) -> dict[str, Any]:
  """Parses one JSONL line into a dict; see ``read_jsonl`` for the checks and errors."""
  where = f"{path}:{line_no}"
  if not line.strip():
    raise JsonlError(f"{where}: blank line; remove it (JSONL needs one JSON object per line)")
  text = line.rstrip("\r\n")
  try:
    record = json.loads(text)
  except json.JSONDecodeError as e:
    end = " (the end of the line)" if e.pos >= len(text) else ""
    raise JsonlError(f"{where}:{e.colno}: malformed JSON at column {e.colno}{end}: {e.msg}; fix or remove line "
                     f"{line_no} (a JSONL file holds one JSON object per line)") from e
  if not isinstance(record, dict):
    raise JsonlError(f"{where}: expected a JSON object ({{...}}), got a JSON {_json_type(record)}")
  for name in fields:
    if name not in record:
      raise JsonlError(f"{where}: missing field {name!r} (the line has {sorted(record)})")
    if not isinstance(record[name], str):
      raise JsonlError(f"{where}: field {name!r} must be a string, got a JSON {_json_type(record[name])}")
  return record


def _json_type(value: Any) -> str:
  """The JSON name of a parsed value's type (object, array, string, number, boolean, null)."""
  names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
  return names.get(type(value), "number")


# Prompt-answer rows in three layouts ---------------------------------------------------------------------------

LAYOUTS = ("messages", "question", "prompt")


def parse_messages(value: Any, *, where: str) -> list[dict[str, str]]:
  """A row's ``messages``: a non-empty list of ``{"role": str, "content": str}`` (other keys kept)."""
  if not isinstance(value, list) or not value:
    raise JsonlError(f"{where}: field 'messages' must be a non-empty list of {{'role', 'content'}} objects")
  for i, m in enumerate(value):
    if not isinstance(m, dict):
      raise JsonlError(f"{where}: messages[{i}] must be an object with string 'role' and 'content', got a JSON "
                       f"{_json_type(m)}")
    for name in ("role", "content"):
      if not isinstance(m.get(name), str):
        got = f"a JSON {_json_type(m[name])}" if name in m else f"no {name!r} (it has {sorted(m)})"
        raise JsonlError(f"{where}: messages[{i}] must be an object with string 'role' and 'content', got {got}")
  return [dict(m) for m in value]


def split_conversation(messages: list[dict[str, str]], answer: Any, *, where: str) -> tuple[list[dict], str]:
  """``(prompt messages, answer)`` of a conversation row.

  A final assistant message is the reference answer and is removed from the prompt; an explicit ``answer`` field
  (a string) takes precedence over it. The prompt must then end with a user turn.
  """
  prompt = messages[:-1] if messages[-1]["role"] == "assistant" else list(messages)
  if answer is None:
    if len(prompt) == len(messages):
      raise JsonlError(f"{where}: no answer: add an 'answer' field or end 'messages' with an assistant turn")
    answer = messages[-1]["content"]
  if not isinstance(answer, str):
    raise JsonlError(f"{where}: field 'answer' must be a string, got {type(answer).__name__}")
  if not prompt or prompt[-1]["role"] != "user":
    raise JsonlError(f"{where}: the prompt messages must end with a user turn, got "
                     f"{[m['role'] for m in prompt]}")
  return prompt, answer


def detect_layout(record: dict[str, Any]) -> str:
  """"messages" (conversation rows), "question" (GSM8K: question/answer) or "prompt" (prompt/answer)."""
  for layout in LAYOUTS:
    if layout in record:
      return layout
  raise JsonlError(f"a prompt-answer row needs 'messages', 'question' or 'prompt' (has {sorted(record)})")


def prompt_answer_record(raw: dict[str, Any], *, where: str, layout: str | None = None) -> dict[str, str]:
  """One row as ``{"prompt", "answer"}`` plus, for a conversation, ``"messages"`` (the prompt messages as a
  JSON string, so that tfds can store it); ``prompt`` is then the last user turn (for logs and plain rewards).

  Args:
    raw: a parsed JSONL row in one of ``LAYOUTS`` (``layout=None`` detects it).
    where: ``file:line`` for errors.
  """
  layout = layout or detect_layout(raw)
  if layout != "messages":
    for name in (layout, "answer"):
      if not isinstance(raw.get(name), str):
        raise JsonlError(f"{where}: field {name!r} must be a string (has {sorted(raw)})")
    return {"prompt": raw[layout], "answer": raw["answer"]}
  prompt, answer = split_conversation(parse_messages(raw.get("messages"), where=where), raw.get("answer"),
                                      where=where)
  return {"prompt": prompt[-1]["content"], "answer": answer, "messages": json.dumps(prompt, ensure_ascii=False)}


def parse_rubric(value: Any, *, where: str) -> list[dict[str, Any]]:
  """A row's ``rubric``: a non-empty list of items, each a question string (weight 1) or ``{"item": str,
  "weight": number >= 0}``; weights not all 0. Returns ``[{"item", "weight"}]``."""
  if not isinstance(value, list) or not value:
    raise JsonlError(f"{where}: field 'rubric' must be a non-empty list of questions (strings, or objects "
                     f"{{'item': str, 'weight': number}})")
  out = []
  for i, item in enumerate(value):
    if isinstance(item, str):
      item = {"item": item}
    if not isinstance(item, dict) or not isinstance(item.get("item"), str) or set(item) - {"item", "weight"}:
      got = f"a JSON {_json_type(item)}" if not isinstance(item, dict) else f"keys {sorted(item)}"
      raise JsonlError(f"{where}: rubric[{i}] must be a string or an object {{'item': str, 'weight': number}}, "
                       f"got {got}")
    weight = item.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
      raise JsonlError(f"{where}: rubric[{i}].weight must be a number >= 0, got {weight!r}")
    out.append({"item": item["item"], "weight": float(weight)})
  if sum(x["weight"] for x in out) <= 0:
    raise JsonlError(f"{where}: the rubric's weights are all 0; give at least one item a positive weight")
  return out


def rubric_record(raw: dict[str, Any], *, where: str) -> dict[str, str]:
  """A rubric row ``{"prompt": str, "rubric": [...], "answer": str (optional)}`` as ``{"prompt", "answer",
  "rubric"}`` with the rubric as a JSON string (``parse_rubric``'s items), so that tfds can store it."""
  if not isinstance(raw.get("prompt"), str):
    raise JsonlError(f"{where}: field 'prompt' must be a string (has {sorted(raw)})")
  answer = raw.get("answer", "")
  if not isinstance(answer, str):
    raise JsonlError(f"{where}: field 'answer' must be a string when given, got a JSON {_json_type(answer)}")
  items = parse_rubric(raw.get("rubric"), where=where)
  return {"prompt": raw["prompt"], "answer": answer, "rubric": json.dumps(items, ensure_ascii=False)}


def read_rubric(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Every row of a rubric JSONL file as ``rubric_record``s with ``index`` (0-based line number)."""
  return [{**rubric_record(raw, where=f"{os.fspath(path)}:{line_no}"), "index": line_no - 1}
          for line_no, raw in read_jsonl(path)]


def read_prompt_answer(path: str | os.PathLike, *, layout: str | None = None) -> list[dict[str, Any]]:
  """Every row of a prompt-answer JSONL file as ``prompt_answer_record``s with ``index`` (0-based line number);
  the layout is detected from the first row unless given, and every row must have it."""
  records = []
  for line_no, raw in read_jsonl(path):
    where = f"{os.fspath(path)}:{line_no}"
    if layout is None:
      try:
        layout = detect_layout(raw)
      except JsonlError as e:
        raise JsonlError(f"{where}: {e}") from None
    records.append({**prompt_answer_record(raw, where=where, layout=layout), "index": line_no - 1})
  return records
