"""Shared fixtures of the data tests: the real data files, a built tfds data dir, a small tokenizer."""
import json
import pathlib

import pytest

from rlj.data import synthetic, tfds_builders, tokenizer

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"


def shared_dir(name: str) -> pathlib.Path:
  """A dataset folder of ``<repo>/../shared/data``; skips the test when it is absent."""
  path = SHARED_DATA / name
  if not path.is_dir():
    pytest.skip(f"real data {name!r} not found at <repo>/../shared/data/{name}")
  return path


@pytest.fixture(scope="session")
def gsm8k_dir():
  return shared_dir("gsm8k")


@pytest.fixture(scope="session")
def hh_dir():
  return shared_dir("hh-rlhf-harmless-base")


@pytest.fixture(scope="session")
def built_data_dir(tmp_path_factory, gsm8k_dir, hh_dir):
  """A tfds data dir holding GSM8K (train + test) and HH-RLHF harmless-base (test), built once."""
  data_dir = tmp_path_factory.mktemp("tfds")
  tfds_builders.build("prompt_answer", "gsm8k", source_dir=gsm8k_dir, data_dir=data_dir)
  tfds_builders.build("preference", "hh_rlhf", source_dir=hh_dir, data_dir=data_dir)
  return data_dir


@pytest.fixture(scope="session")
def tok():
  """A 512-piece BPE tokenizer trained on synthetic arithmetic text (deterministic)."""
  task = synthetic.ArithmeticTask(300, seed=0, levels=(1, 2, 3, 4, 5))
  prefs = synthetic.PreferenceTask(100, seed=0)
  corpus = [task[i]["prompt"] for i in range(len(task))] + [task[i]["answer"] for i in range(len(task))]
  corpus += [prefs[i]["prompt"] + prefs[i]["chosen"] for i in range(len(prefs))]
  return tokenizer.train(corpus, vocab_size=512)


@pytest.fixture(scope="session")
def checkpoint_dirs(tmp_path_factory, gsm8k_dir):
  """``{family: directory}`` of the tiny Llama 3 / Qwen / Gemma tokenizer checkpoints (tiny_checkpoints.py),
  trained once on the first 1000 GSM8K train questions and answers."""
  import tiny_checkpoints
  with open(gsm8k_dir / "train.jsonl", encoding="utf-8") as f:
    rows = [json.loads(line) for _, line in zip(range(1000), f)]
  corpus = [r["question"] for r in rows] + [r["answer"] for r in rows]
  root = tmp_path_factory.mktemp("checkpoints")
  return {name: build(str(root / name), corpus) for name, build in tiny_checkpoints.BUILDERS.items()}
