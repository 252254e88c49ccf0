"""tfds array_record builders: record counts and contents against the raw files, atomic failed builds."""
import gzip
import json
import os

import pytest

from rlj.data import jsonl, tfds_builders


def _raw(path):
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _snapshot(root):
  """Every path under root, with file contents, for 'nothing changed' checks."""
  out = {}
  for dirpath, _, files in os.walk(root):
    out[os.path.relpath(dirpath, root)] = None
    for name in files:
      with open(os.path.join(dirpath, name), "rb") as f:
        out[os.path.relpath(os.path.join(dirpath, name), root)] = f.read()
  return out


def test_gsm8k_counts_and_every_row(built_data_dir, gsm8k_dir):
  for split, count in (("train", 7473), ("test", 1319)):
    ds = tfds_builders.data_source("prompt_answer", "gsm8k", data_dir=built_data_dir, split=split)
    raw = _raw(gsm8k_dir / f"{split}.jsonl")
    assert len(ds) == len(raw) == count
    for i, row in enumerate(raw):  # file order is kept, index = line number - 1
      rec = ds[i]
      assert rec["index"] == i
      assert rec["prompt"].decode() == row["question"]
      assert rec["answer"].decode() == row["answer"]
  entry, = tfds_builders.built_entries("prompt_answer", "gsm8k", data_dir=built_data_dir)
  digest = tfds_builders.source_fingerprint("prompt_answer", "gsm8k", gsm8k_dir)["digest"]
  assert entry == "gsm8k-" + digest[:16]  # keyed by the source files' fingerprint
  files = os.listdir(built_data_dir / "rlj_prompt_answer" / entry / "1.0.0")
  assert sorted(f for f in files if ".array_record-" in f) == [
      "rlj_prompt_answer-test.array_record-00000-of-00001", "rlj_prompt_answer-train.array_record-00000-of-00001"]


def test_gsm8k_spot_rows(built_data_dir):
  ds = tfds_builders.data_source("prompt_answer", "gsm8k", data_dir=built_data_dir, split="train")
  assert ds[0]["prompt"].decode().startswith("Natalia sold clips to 48 of her friends in April")
  assert ds[0]["answer"].decode().endswith("72 clips altogether in April and May.\n#### 72")
  assert ds[1]["answer"].decode().endswith("#### 10")


def test_hh_rlhf_counts_and_split(built_data_dir, hh_dir):
  ds = tfds_builders.data_source("preference", "hh_rlhf", data_dir=built_data_dir, split="test")
  raw = _raw(hh_dir / "test.jsonl.gz")
  assert len(ds) == len(raw) == 2312
  marker = "\n\nAssistant:"
  own_last = 0
  for i, row in enumerate(raw):
    rec = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in ds[i].items()}
    assert rec["index"] == i
    assert rec["prompt"].endswith(marker)
    assert rec["prompt"] + rec["chosen"] == row["chosen"]
    assert rec["prompt"] + rec["rejected"] == row["rejected"]
    # The split is each transcript's own last assistant turn unless a response embeds a marker.
    if marker not in rec["chosen"] and marker not in rec["rejected"]:
      own_last += 1
  assert own_last == 2312 - 5
  first = ds[0]
  assert first["prompt"].decode().endswith("pens\n\nAssistant:")
  assert first["chosen"].decode().startswith(" No, sorry!  All of these involve a pen")
  assert first["rejected"].decode().startswith(" There are lots of funny things you can do with pens")


def test_split_transcripts_uses_last_shared_turn():
  chosen = "\n\nHuman: hi\n\nAssistant: a\n\nHuman: more\n\nAssistant: yes\n\nAssistant: again"
  rejected = "\n\nHuman: hi\n\nAssistant: a\n\nHuman: more\n\nAssistant: no"
  prompt, c, r = tfds_builders.split_transcripts(chosen, rejected)
  assert prompt == "\n\nHuman: hi\n\nAssistant: a\n\nHuman: more\n\nAssistant:"
  assert (c, r) == (" yes\n\nAssistant: again", " no")
  with pytest.raises(ValueError, match="x.jsonl:3: chosen and rejected share no"):
    tfds_builders.split_transcripts("Human: a", "Human: b", where="x.jsonl:3")


def test_generic_layouts_and_custom_config(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  (src / "train.jsonl").write_text(
      "".join(json.dumps({"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"}) + "\n" for i in range(3)))
  with gzip.open(src / "validation.jsonl.gz", "wt") as f:
    f.write(json.dumps({"prompt": "vp", "chosen": "vc", "rejected": "vr"}) + "\n")
  data_dir = tmp_path / "tfds"
  builder = tfds_builders.build("preference", "generic", source_dir=src, data_dir=data_dir)
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 3, "validation": 1}
  ds = tfds_builders.data_source("preference", "generic", data_dir=data_dir, split="train")
  assert ds[2] == {"prompt": b"p2", "chosen": b"c2", "rejected": b"r2", "index": 2}

  (src2 := tmp_path / "src2").mkdir()
  (src2 / "test.jsonl").write_text(json.dumps({"q": "2+2?", "a": "#### 4"}) + "\n")
  config = tfds_builders.JsonlConfig(name="mine", fields={"prompt": "q", "answer": "a"})
  tfds_builders.build("prompt_answer", config, source_dir=src2, data_dir=data_dir)
  ds = tfds_builders.data_source("prompt_answer", config, data_dir=data_dir, split="test")
  assert ds[0] == {"prompt": b"2+2?", "answer": b"#### 4", "index": 0}
  with pytest.raises(FileNotFoundError, match="no built dataset"):
    tfds_builders.data_source("prompt_answer", "generic", data_dir=data_dir, split="test")


@pytest.mark.parametrize("bad_line, message", [
    ('{"question": "x", "answer": ', r"train\.jsonl:4000:29: malformed JSON"),
    ('{"question": "x"}', r"train\.jsonl:4000: missing field 'answer'"),
])
def test_corrupted_jsonl_names_file_and_line_and_writes_nothing(tmp_path, gsm8k_dir, bad_line, message):
  src = tmp_path / "src"
  src.mkdir()
  (src / "test.jsonl").write_bytes((gsm8k_dir / "test.jsonl").read_bytes())  # a good split, built first
  lines = (gsm8k_dir / "train.jsonl").read_text(encoding="utf-8").splitlines()
  lines[3999] = bad_line
  (src / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
  data_dir = tmp_path / "tfds"
  # A data dir that already holds another dataset must come out unchanged, byte for byte.
  other = tmp_path / "other_src"
  other.mkdir()
  (other / "test.jsonl").write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n")
  tfds_builders.build("prompt_answer", "generic", source_dir=other, data_dir=data_dir)
  before = _snapshot(data_dir)
  with pytest.raises(jsonl.JsonlError, match=message) as e:
    tfds_builders.build("prompt_answer", "gsm8k", source_dir=src, data_dir=data_dir)
  assert str(src / "train.jsonl") in str(e.value)
  assert _snapshot(data_dir) == before
  # And into a fresh data dir: nothing at all is left behind.
  fresh = tmp_path / "fresh"
  with pytest.raises(jsonl.JsonlError, match=message):
    tfds_builders.build("prompt_answer", "gsm8k", source_dir=src, data_dir=fresh)
  assert not fresh.exists()
  # Once fixed, the same build succeeds in the same data dir.
  lines[3999] = json.dumps({"question": "fixed", "answer": "#### 1"})
  (src / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
  builder = tfds_builders.build("prompt_answer", "gsm8k", source_dir=src, data_dir=data_dir)
  assert builder.info.splits["train"].num_examples == 7473
  ds = tfds_builders.data_source("prompt_answer", "gsm8k", data_dir=data_dir, split="train")
  assert ds[3999]["prompt"] == b"fixed"


def test_unknown_kind_and_missing_source(tmp_path):
  with pytest.raises(ValueError, match="unknown dataset kind 'qa'"):
    tfds_builders.build("qa", "generic", source_dir=tmp_path, data_dir=tmp_path / "d")
  with pytest.raises(ValueError, match="no <split>.jsonl"):
    tfds_builders.build("prompt_answer", "generic", source_dir=tmp_path, data_dir=tmp_path / "d")
  assert not (tmp_path / "d").exists()


def test_an_edited_source_builds_a_new_entry(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  rows = [{"prompt": f"p{i}", "answer": f"a{i}"} for i in range(5)]
  (src / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  data_dir = tmp_path / "tfds"
  first = tfds_builders.build("prompt_answer", "generic", source_dir=src, data_dir=data_dir)
  assert first.info.splits["train"].num_examples == 5
  again = tfds_builders.build("prompt_answer", "generic", source_dir=src, data_dir=data_dir)  # reused as is
  assert again.data_path == first.data_path
  (src / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))   # edited in place
  edited = tfds_builders.build("prompt_answer", "generic", source_dir=src, data_dir=data_dir)
  assert edited.info.splits["train"].num_examples == 2
  assert len(tfds_builders.data_source("prompt_answer", "generic", data_dir=data_dir, split="train",
                                       source_dir=src)) == 2
  assert len(tfds_builders.built_entries("prompt_answer", "generic", data_dir=data_dir)) == 2
  with pytest.raises(FileNotFoundError, match="several"):  # which one is meant needs the source
    tfds_builders.data_source("prompt_answer", "generic", data_dir=data_dir, split="train")
  # A copy of the same files elsewhere is the same entry; other options (another config) are another.
  copy = tmp_path / "copy"
  copy.mkdir()
  (copy / "train.jsonl").write_bytes((src / "train.jsonl").read_bytes())
  assert tfds_builders.build("prompt_answer", "generic", source_dir=copy, data_dir=data_dir).data_path == \
      edited.data_path
  a = tfds_builders.source_fingerprint("prompt_answer", "generic", src)
  b = tfds_builders.source_fingerprint("prompt_answer", "messages", src)
  assert a["files"] == b["files"] and a["digest"] != b["digest"]


def test_rubric_rows_reach_the_prompt_batches(tmp_path):
  """data.source=rubric: each row's items (strings or weighted objects) are stored as JSON and carried, per
  prompt, into the RL prompt batches (``rubric`` [B]); bad rows stop in one line naming file:line."""
  from rlj.data import encoding
  src = tmp_path / "src"
  src.mkdir()
  rows = [{"prompt": "Name a prime.", "rubric": ["Is it a number?", {"item": "Is it prime?", "weight": 3}]},
          {"prompt": "Say hi.", "answer": "hi", "rubric": [{"item": "Is it a greeting?"}]}]
  (src / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  tfds_builders.build("prompt_answer", "rubric", source_dir=src, data_dir=tmp_path / "tfds")
  ds = tfds_builders.data_source("prompt_answer", "rubric", data_dir=tmp_path / "tfds", split="train")
  assert json.loads(ds[0]["rubric"]) == [{"item": "Is it a number?", "weight": 1.0},
                                         {"item": "Is it prime?", "weight": 3.0}]
  assert ds[1]["answer"] == b"hi" and ds[0]["answer"] == b""

  class Tok:
    bos_id, pad_id = 1, 0
    def encode(self, s, add_bos=False):
      return [1] * add_bos + [ord(c) % 50 + 2 for c in s]
  enc = encoding.PromptEncoder(Tok(), 64)
  batch = encoding.collate_prompts([enc({**ds[i], "index": i}) for i in range(2)], batch_size=3, buckets=(64,),
                                   pad_id=0)
  assert [json.loads(r)[0]["item"] for r in batch["rubric"][:2]] == ["Is it a number?", "Is it a greeting?"]
  assert "rubric" not in encoding.collate_prompts([enc({"prompt": "x", "answer": "y", "index": 0})], batch_size=1,
                                                  buckets=(64,), pad_id=0)
  for bad, match in [({"prompt": "p"}, "field 'rubric' must be a non-empty list"),
                     ({"prompt": "p", "rubric": [7]}, r"rubric\[0\] must be a string or an object.*a JSON number"),
                     ({"prompt": "p", "rubric": [{"item": "q", "weight": -1}]}, r"rubric\[0\]\.weight must be"),
                     ({"prompt": "p", "rubric": [{"item": "q", "weight": 0}]}, "the rubric.s weights are all 0"),
                     ({"prompt": "p", "rubric": [{"text": "q"}]}, r"rubric\[0\] .*got keys \['text'\]"),
                     ({"prompt": "p", "answer": 3, "rubric": ["q"]}, "'answer' must be a string")]:
    with pytest.raises(jsonl.JsonlError, match=r"^f\.jsonl:2: .*" + match) as e:
      jsonl.rubric_record(bad, where="f.jsonl:2")
    assert "\n" not in str(e.value)
