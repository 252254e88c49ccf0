"""Cutting completions at stop ids and stop strings (for reward functions)."""
import numpy as np
import pytest

from rlj.data import stops, tokenizer


def _reference_cut_text(text, stop_strings):
  """Slow and obvious: the shortest prefix of text after which some stop string begins."""
  for end in range(len(text) + 1):
    if any(s and text.startswith(s, end) for s in stop_strings):
      return text[:end]
  return text


def test_cut_ids():
  assert stops.cut_ids([5, 6, 7, 2, 8, 3], {2, 3}) == [5, 6, 7]
  assert stops.cut_ids(np.array([5, 3, 2]), [2, 3], keep_stop=True) == [5, 3]
  assert stops.cut_ids([5, 6], [2]) == [5, 6] and stops.cut_ids([], [2]) == []


@pytest.mark.parametrize("text", ["The answer is 5.\n\nQuestion: next", "no stop here", "", "####5<|im_end|>x",
                                  "ab\n\nQuestion:\n\nQ"])
def test_cut_text_matches_reference(text):
  stop_strings = ["\n\nQuestion:", "<|im_end|>", "", "\n\nQ"]
  assert stops.cut_text(text, stop_strings) == _reference_cut_text(text, stop_strings)
  assert stops.cut_text("ab\n\nQuestion: x", stop_strings, keep_stop=True) == "ab\n\nQuestion:"  # longest at a position


@pytest.mark.parametrize("family", ["llama3", "qwen", "gemma"])
def test_completion_text_stops_at_every_eos_id(checkpoint_dirs, family):
  tok = tokenizer.load(checkpoint_dirs[family])
  body = tok.encode("Natalia sold 72 clips.\n#### 72")
  for eos in tok.eos_ids:
    ids = body + [eos] + tok.encode("\n\nQuestion: more")
    assert stops.completion_text(tok, ids) == "Natalia sold 72 clips.\n#### 72"
  run_on = body + tok.encode("\n\nQuestion: more")  # no stop id: the text-level stop cuts it
  assert stops.completion_text(tok, run_on, stop_strings=["\n\nQuestion:"]) == "Natalia sold 72 clips.\n#### 72"
  assert stops.completion_text(tok, run_on, stop_ids=[body[3]]) == tok.decode(body[:body.index(body[3])])
  texts = set(stops.stop_strings(tok))
  assert texts == {tok.id_to_piece(i) for i in tok.eos_ids}
  decoded_with_markers = "#### 72" + tok.id_to_piece(tok.eos_ids[-1]) + "junk"
  assert stops.cut_text(decoded_with_markers, texts) == "#### 72"


def test_completion_texts_with_mask(checkpoint_dirs):
  tok = tokenizer.load(checkpoint_dirs["gemma"])
  a, b = tok.encode("#### 3"), tok.encode("#### 12")
  end_of_turn = tok.eos_ids[1]
  width = max(len(a), len(b)) + 2
  rows = [a + [end_of_turn] + [tok.pad_id] * (width - len(a) - 1),
          b + [tok.eos_id] + [tok.pad_id] * (width - len(b) - 1)]
  mask = (np.arange(width)[None] <= np.array([len(a), len(b)])[:, None]).astype(np.int32)
  assert stops.completion_texts(tok, np.array(rows), mask) == ["#### 3", "#### 12"]
  assert stops.completion_texts(tok, rows) == ["#### 3", "#### 12"]
  with pytest.raises(ValueError, match="differ in shape"):
    stops.completion_texts(tok, np.array(rows), mask[:, :2])
