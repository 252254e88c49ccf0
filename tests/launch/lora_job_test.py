"""LoRA GRPO on a Hugging Face checkpoint, end to end: a tiny Llama folder -> 2 RL steps with adapters (rank 4,
KL to the base) -> the checkpoint holds adapters and their moments only, with the base's fingerprint ->
``launch.export`` merged (transformers loads it) and as a PEFT adapter (``peft`` loads it onto the transformers
base), both with logits equal to rlj's policy -> a relaunch against an edited base stops in one line."""
import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

from configs import grpo_tpu
from launch import export, train

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir, "models"))
import hf_parity  # noqa: E402  (tests/models)
from export_test import tiny_llama  # noqa: E402  (tests/launch)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("fast_compile")


def vowel_reward(prompts, completions, **_):
  """A reward that varies between random completions (the exact-match reward of a random model is all 0)."""
  del prompts
  return np.asarray([sum(ch in "aeiou" for ch in c) / (1.0 + len(c)) for c in completions], np.float32)


def _config(ckpt, data_dir, steps):
  c = grpo_tpu.get_config(f"runlocal,hf={ckpt}")
  c.data.source_dir = data_dir
  c.data.buckets = (128,)
  c.sampler.max_new_tokens = 8
  c.sft.steps = 0                       # the base is the checkpoint itself
  c.algo.kwargs.kl_coef = 0.04          # a reference pass: the base, adapters off
  c.rewards = ({"name": "vowels", "fn": f"{__name__}:vowel_reward", "weight": 1.0},)
  c.model.lora.rank, c.model.lora.alpha = 4, 8.0
  c.optim.learning_rate = 1e-2
  c.train.total_steps, c.train.batch_prompts, c.train.eval_every, c.train.ckpt_every = steps, 2, 0, 2
  c.train.num_minibatches = 2
  c.eval.num_prompts = 0
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("lora")
  ckpt = tiny_llama(root)
  workdir = str(root / "run")
  history = train.run(_config(ckpt, str(root / "gsm8k"), 2), workdir)
  return ckpt, str(root / "gsm8k"), workdir, history, root


def _rlj_policy_logits(workdir, ckpt, tokens):
  from models import hf, lora
  step, meta = export.read_meta(os.path.join(workdir, "checkpoints"), None)
  mc = export.model_config_of(meta, workdir)
  cfg = export.lora_of(meta)
  adapters = export.restore_adapters(os.path.join(workdir, "checkpoints"), mc, cfg, step)
  _, base = hf.load_hf_checkpoint(ckpt)
  positions = np.arange(tokens.shape[1], dtype=np.int32)[None]
  merged = lora.merge(base, adapters, cfg)
  return mc, hf_parity.our_logits(mc, merged, tokens, np.ones_like(tokens), positions), adapters, cfg


def test_checkpoint_holds_adapters_and_the_base_fingerprint(run):
  ckpt, _, workdir, history, _ = run
  assert [h["step"] for h in history] == [1, 2]
  assert history[0]["kl"] < 1e-6 < history[1]["kl"]    # b = 0 at the start: the policy is the base (the reference)
  from rlj import checkpoint
  ck = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  tree = ck.saved_tree(2)
  ck.close()
  leaves = jax.tree_util.tree_flatten_with_path(tree["params"])[0]
  assert {jax.tree_util.keystr(p)[-5:] for p, _ in leaves} == {"['a']", "['b']"}, leaves   # adapters only
  saved = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  _, meta = export.read_meta(os.path.join(workdir, "checkpoints"), None)
  base_params = meta["lora_base"]["num_params"]
  assert saved < base_params / 5            # no base, no reference copy: adapters, two moments, counters
  assert tree.get("ref_params") is None
  assert meta["lora_base"]["source"] == os.path.abspath(ckpt) and meta["lora"]["rank"] == 4


def test_exports_load_in_transformers_and_peft_with_equal_logits(run):
  ckpt, _, workdir, _, root = run
  tokens = np.asarray([[5, 17, 300, 42, 9, 123, 77]], np.int32)
  _, ours, _, _ = _rlj_policy_logits(workdir, ckpt, tokens)
  base = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
  with torch.no_grad():
    base_logits = base(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
  assert np.abs(ours - base_logits).max() > 1e-3          # the adapters trained

  merged_dir = export.export(workdir, out=str(root / "merged"))
  model = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    merged_logits = model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
  np.testing.assert_allclose(merged_logits, ours, atol=1e-4, rtol=1e-4)

  adapter_dir = export.export(workdir, out=str(root / "adapter"), lora="adapter")
  assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(os.listdir(adapter_dir))
  with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
    assert json.load(f)["base_model_name_or_path"] == os.path.abspath(ckpt)
  peft_model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
  with torch.no_grad():
    peft_logits = peft_model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
  np.testing.assert_allclose(peft_logits, ours, atol=1e-4, rtol=1e-4)


def test_resume_against_another_base_stops_in_one_line(run):
  ckpt, data_dir, workdir, _, root = run
  before = {p: open(os.path.join(workdir, p), "rb").read() for p in ("config.json", "inputs.json")}
  edited = hf_parity.rewrite_checkpoint(ckpt, str(root / "edited"), lambda t: t.__setitem__(
      "model.norm.weight", t["model.norm.weight"] * 1.5))
  original = str(root / "original.safetensors")
  shutil.copyfile(os.path.join(ckpt, "model.safetensors"), original)
  shutil.copyfile(os.path.join(edited, "model.safetensors"), os.path.join(ckpt, "model.safetensors"))
  try:
    with pytest.raises(SystemExit, match=r"adapters trained on the base .*tiny-llama.* \(hash [0-9a-f]{16}\) but "
                                         r"this job loads .*same tensor shapes, other values"):
      train.run(_config(ckpt, data_dir, 2), workdir)
    with pytest.raises(SystemExit, match=r"^launch.export --lora: the base at .* has changed"):
      export.export(workdir, out=str(root / "merged2"))
  finally:
    shutil.copyfile(original, os.path.join(ckpt, "model.safetensors"))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]     # nothing lost, nothing added
  assert before == {p: open(os.path.join(workdir, p), "rb").read() for p in before}
