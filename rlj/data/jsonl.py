"""Strict JSONL reading: every bad line is reported as ``file:line`` with the reason.

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
  """A malformed JSONL line; the message starts with ``file:line:``."""


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
        raise JsonlError(f"{path}:{line_no}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
      yield line_no, parse_line(line, path=path, line_no=line_no, fields=fields)


def parse_line(line: str, *, path: str, line_no: int, fields: Sequence[str] = ()) -> dict[str, Any]:
  """Parses one JSONL line into a dict; see ``read_jsonl`` for the checks and errors."""
  where = f"{path}:{line_no}"
  if not line.strip():
    raise JsonlError(f"{where}: blank line (JSONL needs one JSON object per line)")
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise JsonlError(f"{where}: malformed JSON at character {e.pos + 1}: {e.msg}") from e
  if not isinstance(record, dict):
    raise JsonlError(f"{where}: expected a JSON object, got {type(record).__name__}")
  for name in fields:
    if name not in record:
      raise JsonlError(f"{where}: missing field {name!r} (has {sorted(record)})")
    if not isinstance(record[name], str):
      raise JsonlError(f"{where}: field {name!r} must be a string, got {type(record[name]).__name__}")
  return record
