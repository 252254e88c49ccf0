"""Tokenisation, truncation and left-padding of records (numpy, against slow reference loops)."""
import numpy as np
import pytest

from rlj.data import encoding


def _left_pad_reference(seqs, length, pad):
  tokens, mask = [], []
  for s in seqs:
    tokens.append([pad] * (length - len(s)) + list(s))
    mask.append([0] * (length - len(s)) + [1] * len(s))
  return np.array(tokens), np.array(mask)


def test_left_pad_matches_reference():
  rng = np.random.default_rng(0)
  seqs = [rng.integers(4, 30, size=n).tolist() for n in (0, 1, 5, 8)]
  tokens, mask = encoding.left_pad(seqs, 8, pad_id=0)
  ref_tokens, ref_mask = _left_pad_reference(seqs, 8, 0)
  np.testing.assert_array_equal(tokens, ref_tokens)
  np.testing.assert_array_equal(mask, ref_mask)
  assert tokens.dtype == mask.dtype == np.int32
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # the documented RoPE positions
  np.testing.assert_array_equal(positions[2, -5:], np.arange(5))


def test_fit_keeps_the_end_and_the_first_token():
  ids = list(range(10))
  assert encoding.fit(ids, 4, keep_first=True) == [0, 7, 8, 9]
  assert encoding.fit(ids, 4, keep_first=False) == [6, 7, 8, 9]
  assert encoding.fit(ids, 10, keep_first=True) == ids
  assert encoding.pick_bucket(5, (8, 4, 16)) == 8 and encoding.pick_bucket(8, (4, 8)) == 8
  with pytest.raises(ValueError, match="exceeds the (longest|largest) bucket 8"):
    encoding.pick_bucket(9, (4, 8))


def test_prompt_encoder_truncate_and_drop(tok):
  record = {"prompt": b"Start with 5. Add 3.", "answer": b"5 + 3 = 8\n#### 8", "index": 7}
  full = tok.encode("Q: Start with 5. Add 3.\nA:", add_bos=True)
  enc = encoding.PromptEncoder(tok, len(full), template="Q: {prompt}\nA:")
  e = enc(record)
  assert e["tokens"].tolist() == full and not e["truncated"] and not e["too_long"]
  assert e["answer"] == "5 + 3 = 8\n#### 8" and e["index"] == 7
  short = encoding.PromptEncoder(tok, 6, template="Q: {prompt}\nA:")(record)
  assert short["tokens"].tolist() == [tok.bos_id] + full[-5:] and short["truncated"] and short["too_long"]
  dropped = encoding.PromptEncoder(tok, 6, template="Q: {prompt}\nA:", overflow="drop")(record)
  assert dropped["too_long"] and not dropped["truncated"]
  with pytest.raises(ValueError, match="unknown overflow 'cut'"):
    encoding.PromptEncoder(tok, 6, overflow="cut")


def test_collate_prompts_buckets_and_filler(tok):
  enc = encoding.PromptEncoder(tok, 32)
  elements = [enc({"prompt": p, "answer": "a", "index": i}) for i, p in enumerate(["1 + 1", "22 * 33 - 4"])]
  batch = encoding.collate_prompts(elements, batch_size=3, buckets=(4, 16, 32), pad_id=tok.pad_id)
  longest = max(len(e["tokens"]) for e in elements)
  assert 4 < longest <= 16 and batch["prompt_tokens"].shape == (3, 16)
  assert batch["valid"].tolist() == [True, True, False] and batch["index"].tolist() == [0, 1, -1]
  assert batch["prompt_mask"][2].sum() == 0
  assert tok.decode_batch(batch["prompt_tokens"], batch["prompt_mask"]) == ["1 + 1", "22 * 33 - 4", ""]


def test_preference_encoder_loss_mask_covers_response(tok):
  record = {"prompt": "Name a number close to 10.", "chosen": " 9.", "rejected": " 40.", "index": 3}
  e = encoding.PreferenceEncoder(tok, 64)(record)
  batch = encoding.collate_preferences([e], batch_size=2, buckets=(16, 64), pad_id=tok.pad_id)
  assert batch["chosen_tokens"].shape == batch["rejected_tokens"].shape == (2, 16)
  for name in ("chosen", "rejected"):
    tokens, mask, loss = (batch[f"{name}_{k}"][0] for k in ("tokens", "mask", "loss_mask"))
    assert tokens[-1] == tok.eos_id and tokens[mask.argmax()] == tok.bos_id
    assert np.all(loss <= mask)
    assert tok.decode(tokens[loss == 1]) == record[name]
    assert tok.decode(tokens[(mask == 1) & (loss == 0)]) == record["prompt"]
  truncated = encoding.PreferenceEncoder(tok, 6)(record)
  assert truncated["truncated"] and len(truncated["chosen_tokens"]) == 6
  assert truncated["chosen_loss"].tolist()[-3:] == [1, 1, 1] and truncated["chosen_tokens"][0] == tok.bos_id
