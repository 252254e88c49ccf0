"""Bring your own checkpoint, end to end: a tiny Hugging Face Llama folder (Llama-3-style tokenizer of
tests/data/tiny_checkpoints.py, chat template, three EOS ids) -> GRPO run (2 SFT + 2 RL steps, chat prompts on a
GSM8K-style JSONL) -> ``launch.export`` -> transformers loads the folder, its logits equal rlj's, ``generate`` runs.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import grpo_tpu
from launch import export, make_tiny_checkpoint, train

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "data"))
import tiny_checkpoints  # noqa: E402  (tests/data)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.usefixtures("fast_compile")


def _gsm8k_like(directory, rng):
  """train.jsonl / test.jsonl with GSM8K's layout (question, answer ending in ``#### N``)."""
  os.makedirs(directory)
  rows = {}
  for split, n in (("train", 48), ("test", 16)):
    rows[split] = []
    for _ in range(n):
      a, b = (int(x) for x in rng.integers(1, 50, size=2))
      rows[split].append({"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
                          "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"})
    with open(os.path.join(directory, f"{split}.jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows[split])
  return [r[k] for r in rows["train"] for k in ("question", "answer")]


def tiny_llama(root):
  """``root``/gsm8k (GSM8K-style JSONL) and ``root``/tiny-llama (a 2-layer Llama folder with a tokenizer trained on
  it); returns the checkpoint folder."""
  corpus = _gsm8k_like(str(root / "gsm8k"), np.random.default_rng(0))
  ckpt = tiny_checkpoints.llama3(str(root / "tiny-llama"), corpus * 4)
  make_tiny_checkpoint.write_model(ckpt, 768, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
                                   mlp_dim=64)
  return ckpt


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(hf checkpoint dir, run workdir, exported dir) of a 2 SFT + 2 RL step GRPO run from the checkpoint."""
  root = tmp_path_factory.mktemp("byoc")
  ckpt = tiny_llama(root)
  c = grpo_tpu.get_config(f"runlocal,hf={ckpt}")
  c.data.source_dir = str(root / "gsm8k")
  c.data.buckets = (128,)
  c.sampler.max_new_tokens = 8
  c.sampler.stop_tokens = ("<|eom_id|>",)       # already an EOS id of the checkpoint: resolves, adds nothing
  c.sft.steps, c.sft.batch_prompts = 2, 8
  c.train.total_steps, c.train.batch_prompts, c.train.eval_every = 2, 2, 2
  c.train.num_minibatches = 2
  c.eval.num_prompts = c.eval.batch_prompts = 8
  workdir = str(root / "run")
  cwd, here = os.getcwd(), root / "cwd"
  here.mkdir()
  os.chdir(here)  # a job writes under its workdir only (the built dataset too), never the current directory
  try:
    history = train.run(c, workdir)
  finally:
    os.chdir(cwd)
  assert not os.listdir(here)
  assert os.listdir(os.path.join(workdir, "tfds", "rlj_prompt_answer"))
  assert [h["step"] for h in history] == [0, 1, 2]
  out = export.export(workdir, out=str(root / "exported"), max_shard_bytes=60_000)
  return ckpt, workdir, out


def test_exported_folder_loads_in_transformers_with_equal_logits(run):
  ckpt, workdir, out = run
  from models import hf
  from models.transformer import Transformer
  from rlj.data import tokenizer as tok_lib

  # the layout: sharded safetensors with an index, the run's tokenizer files, every EOS id
  names = set(os.listdir(out))
  assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
          "generation_config.json"} <= names
  with open(os.path.join(ckpt, "generation_config.json")) as f:
    shipped = json.load(f)
  with open(os.path.join(out, "generation_config.json")) as f:
    gen = json.load(f)
  assert sorted(gen["eos_token_id"]) == sorted(shipped["eos_token_id"]) and len(gen["eos_token_id"]) == 3
  assert gen["bos_token_id"] == shipped["bos_token_id"]

  # rlj's policy: the RL checkpoint's params (trained: not the initial weights)
  step, meta = export.read_meta(os.path.join(workdir, "checkpoints"), None)
  assert step == 2 and meta["job"] == "rl"
  mc = export.model_config_of(meta, workdir)
  params = export.restore_policy(os.path.join(workdir, "checkpoints"), mc, step)
  _, initial = hf.load_hf_checkpoint(ckpt)
  assert not np.allclose(np.asarray(params["embedder"]["embedding"]), np.asarray(initial["embedder"]["embedding"]))

  tok = tok_lib.load(out)
  text = tok.chat_template.render([{"role": "user", "content": "Tom has 3 apples and buys 4 more."}])
  ids = tok.encode(text)
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert hf_tok.apply_chat_template([{"role": "user", "content": "Tom has 3 apples and buys 4 more."}],
                                    tokenize=False, add_generation_prompt=True) == text
  assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids

  tokens = np.asarray([ids], np.int32)
  positions = np.arange(len(ids), dtype=np.int32)[None]
  ours = np.asarray(Transformer(mc).apply({"params": params}, tokens, positions, np.ones_like(tokens))[0])
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)

  generated = model.generate(torch.tensor(tokens, dtype=torch.long), max_new_tokens=4, do_sample=False,
                             attention_mask=torch.ones_like(torch.tensor(tokens)))
  assert generated.shape[1] > tokens.shape[1]


def test_checkpoint_meta_records_model_config_and_tokenizer(run):
  _, workdir, _ = run
  for sub in ("checkpoints", os.path.join("sft", "checkpoints")):
    _, meta = export.read_meta(os.path.join(workdir, sub), None)
    assert meta["model_config"]["vocab_size"] == 768 and meta["tokenizer_dir"] == "tokenizer"
  assert os.path.isfile(os.path.join(workdir, "tokenizer", "tokenizer.json"))


def _export_cli(*args):
  proc = subprocess.run([sys.executable, "-m", "launch.export", *args], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ), timeout=120)
  return proc.returncode, (proc.stdout + proc.stderr).strip()


def test_export_errors_are_one_line(run, tmp_path):
  _, workdir, _ = run
  rc, out = _export_cli("--workdir", workdir, "--step", "7")
  assert rc != 0 and out.splitlines()[-1].startswith("launch.export --step: no checkpoint at step 7 in "), out
  with pytest.raises(SystemExit, match=r"^launch.export --workdir: .*nowhere' does not exist"):
    export.export(str(tmp_path / "nowhere"))
  with pytest.raises(SystemExit, match=r"^launch.export --workdir: .* is not an rlj run"):
    export.export(str(tmp_path))
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(SystemExit, match=r"^launch.export --workdir: .* holds no checkpoint yet"):
    export.export(str(tmp_path))
