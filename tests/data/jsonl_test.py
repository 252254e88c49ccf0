"""Strict JSONL reading: record order, line numbers, and errors that name file, line and field."""
import gzip
import json

import pytest

from rlj.data import jsonl


def _write(path, lines):
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return path


def test_reads_records_with_line_numbers(tmp_path):
  rows = [{"prompt": f"p{i}", "answer": f"a{i}"} for i in range(5)]
  path = _write(tmp_path / "x.jsonl", [json.dumps(r) for r in rows])
  got = list(jsonl.read_jsonl(path, fields=("prompt", "answer")))
  assert [n for n, _ in got] == [1, 2, 3, 4, 5]
  assert [r for _, r in got] == rows


def test_reads_gzip(tmp_path):
  path = tmp_path / "x.jsonl.gz"
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write('{"a": "é"}\n{"a": "b"}\n')
  assert [r["a"] for _, r in jsonl.read_jsonl(path, fields=("a",))] == ["é", "b"]


@pytest.mark.parametrize("bad_line, reason", [
    ('{"prompt": "x", "answer": ', "malformed JSON"),
    ('["prompt", "answer"]', "expected a JSON object"),
    ("", "blank line"),
    ('{"prompt": "x"}', "missing field 'answer'"),
    ('{"prompt": "x", "answer": 3}', "field 'answer' must be a string"),
])
def test_bad_line_names_file_line_and_reason(tmp_path, bad_line, reason):
  lines = [json.dumps({"prompt": str(i), "answer": str(i)}) for i in range(6)]
  lines[3] = bad_line
  path = _write(tmp_path / "data.jsonl", lines)
  with pytest.raises(jsonl.JsonlError) as e:
    list(jsonl.read_jsonl(path, fields=("prompt", "answer")))
  assert str(e.value).startswith(f"{path}:4: ")
  assert reason in str(e.value)


def test_bad_utf8_names_line(tmp_path):
  path = tmp_path / "x.jsonl"
  path.write_bytes(b'{"a": "ok"}\n{"a": "\xff"}\n')
  with pytest.raises(jsonl.JsonlError, match=r"x\.jsonl:2: not valid UTF-8"):
    list(jsonl.read_jsonl(path))
