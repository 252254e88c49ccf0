"""SentencePiece tokenizer: deterministic training, exact round trips, explicit special ids."""
import pickle

import numpy as np
import pytest

from rlj.data import synthetic, tokenizer

TEXTS = ["Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "  two  spaces\tand tab ",
         "héllo wörld — 中文 ✓", "Human: hi\n\nAssistant: hello"]


def test_training_is_deterministic(tok):
  task = synthetic.ArithmeticTask(300, seed=0, levels=(1, 2, 3, 4, 5))
  prefs = synthetic.PreferenceTask(100, seed=0)
  corpus = [task[i]["prompt"] for i in range(len(task))] + [task[i]["answer"] for i in range(len(task))]
  corpus += [prefs[i]["prompt"] + prefs[i]["chosen"] for i in range(len(prefs))]
  again = tokenizer.train(corpus, vocab_size=512)
  assert again.model_proto == tok.model_proto


def test_special_ids_and_round_trip(tok, tmp_path):
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  assert tok.vocab_size <= 512
  for text in TEXTS:  # identity normalisation + byte fallback: exact for any text
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.unk_id not in ids
  assert [tok.id_to_piece(i) for i in tok.encode("1234")] == ["1", "2", "3", "4"]  # split digits
  assert tok.encode("ab", add_bos=True, add_eos=True) == [2] + tok.encode("ab") + [3]
  path = tmp_path / "t.model"
  tok.save(path)
  loaded = tokenizer.Tokenizer.from_file(path)
  assert [loaded.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
  unpickled = pickle.loads(pickle.dumps(tok))
  assert unpickled.encode(TEXTS[0]) == tok.encode(TEXTS[0]) and unpickled.pad_id == tok.pad_id


def test_decode_drops_specials_and_stops_at_eos(tok):
  ids = tok.encode("7 + 5 = 12")
  row = [tok.pad_id, tok.pad_id, tok.bos_id] + ids + [tok.eos_id] + tok.encode(" junk")
  assert tok.decode(row) == "7 + 5 = 12"
  assert tok.decode(row, stop_at_eos=False) == "7 + 5 = 12 junk"
  tokens = np.array([[0, 0] + ids, ids[:2] + [0, 0] + ids[2:]], np.int32)
  mask = np.array([[0, 0] + [1] * len(ids), [1, 1, 0, 0] + [1] * (len(ids) - 2)], np.int32)
  assert tok.decode_batch(tokens, mask) == ["7 + 5 = 12"] * 2
  assert tok.decode_batch([ids, ids[:1]]) == ["7 + 5 = 12", "7"]


def _train_with_layout(**ids):
  corpus = [synthetic.ArithmeticTask(50)[i]["prompt"] for i in range(50)]
  return tokenizer.train(corpus, vocab_size=400, extra_options=ids)


def test_pad_resolution_for_loaded_models():
  # Llama-2 layout: unk 0, bos 1, eos 2, no pad -> pad falls back to unk (distinct from eos).
  llama = _train_with_layout(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
  assert (llama.unk_id, llama.bos_id, llama.eos_id, llama.pad_id) == (0, 1, 2, 0)
  assert tokenizer.Tokenizer(llama.model_proto, pad_id=5).pad_id == 5
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tokenizer.Tokenizer(llama.model_proto, pad_id=10**6)
  # Gemma layout: pad 0, eos 1, bos 2, unk 3 -> all read from the model.
  gemma = _train_with_layout(pad_id=0, eos_id=1, bos_id=2, unk_id=3)
  assert (gemma.pad_id, gemma.eos_id, gemma.bos_id, gemma.unk_id) == (0, 1, 2, 3)
  with pytest.raises(ValueError, match="conflicts with the model's own pad id 0"):
    tokenizer.Tokenizer(gemma.model_proto, pad_id=7)


def test_empty_corpus_raises():
  with pytest.raises(ValueError, match="empty corpus"):
    tokenizer.train(["", ""], vocab_size=300)


def test_decode_drops_ids_past_the_vocabulary(tok):
  """A model whose embedding is padded beyond the tokenizer can sample those ids; they have no text."""
  ids = tok.encode("12+7=19")
  padded = [tok.vocab_size, *ids[:2], tok.vocab_size + 5, *ids[2:], 10 ** 6]
  assert tok.decode(padded) == tok.decode(ids) == "12+7=19"
