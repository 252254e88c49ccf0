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
  column = f"{len(bad_line) + 1}:" if reason == "malformed JSON" else ""   # a syntax error adds its column
  assert str(e.value).startswith(f"{path}:4:{column} ")
  assert reason in str(e.value) and "\n" not in str(e.value)


def test_bad_utf8_names_line(tmp_path):
  path = tmp_path / "x.jsonl"
  path.write_bytes(b'{"a": "ok"}\n{"a": "\xff"}\n')
  with pytest.raises(jsonl.JsonlError, match=r"x\.jsonl:2: not valid UTF-8"):
    list(jsonl.read_jsonl(path))


@pytest.mark.parametrize("line, column, reason", [
    ('{"prompt": "x" "answer": "y"}', 16, "Expecting ',' delimiter"),
    ('{"prompt": "x", "answer": "y"} trailing', 32, "Extra data"),
    ('{"prompt": "x", answer: "y"}', 17, "Expecting property name enclosed in double quotes"),
])
def test_json_syntax_error_names_line_column_reason_and_fix(tmp_path, line, column, reason):
  """path:line:column (1-based: the character where the JSON goes wrong), its reason in full, and what to do."""
  assert line[column - 1] == {16: '"', 32: "t", 17: "a"}[column]    # the column points at the offending character
  path = _write(tmp_path / "train.jsonl", ['{"prompt": "a", "answer": "b"}', line])
  with pytest.raises(jsonl.JsonlError) as e:
    list(jsonl.read_jsonl(path))
  assert str(e.value) == (f"{path}:2:{column}: malformed JSON at column {column}: {reason}; fix or remove line 2 "
                          f"(a JSONL file holds one JSON object per line)")


def test_bad_message_rows_say_what_is_wrong_without_cutting_the_row(tmp_path):
  long_text = "word " * 100
  with pytest.raises(jsonl.JsonlError) as e:
    jsonl.parse_messages([{"role": "user", "text": long_text}], where="f.jsonl:3")
  assert str(e.value) == ("f.jsonl:3: messages[0] must be an object with string 'role' and 'content', got no "
                          "'content' (it has ['role', 'text'])")
