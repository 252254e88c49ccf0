r"""A tiny Llama-family Hugging Face checkpoint folder, for trying rlj end to end without downloads:

  python -m launch.make_tiny_checkpoint --out runs/tiny-llama [--data ../shared/data/gsm8k]

Writes, in the layout a Hugging Face checkpoint ships:

- ``config.json`` + ``model.safetensors``: a randomly initialised 2-layer Llama (about 0.2M parameters, float32),
  written by ``models.hf.save_hf_checkpoint``;
- ``tokenizer.json``: a byte-level BPE tokenizer in Llama 3's layout (its split regex, ``<|begin_of_text|>`` added
  in front of every text, ``<|eot_id|>`` ending a turn), trained with the ``tokenizers`` library on the GSM8K
  ``train.jsonl`` of ``--data`` (without it, on synthetic arithmetic text);
- ``tokenizer_config.json`` with a Llama-3-style chat template, and ``generation_config.json`` listing two EOS
  ids (``<|end_of_text|>``, ``<|eot_id|>``).

transformers' ``AutoTokenizer`` / ``AutoModelForCausalLM`` load the folder, and so does ``launch.train``
(``--config configs/grpo_tpu.py:runlocal,hf=<out>``). The weights are random: the point is the plumbing.
"""
from __future__ import annotations

if __name__ == "__main__":   # before JAX starts: no TPU runtime probe on a host without TPUs (launch/malloc_env.py)
  from launch import malloc_env
  malloc_env.set_jax_platforms()

import json
import os

from absl import app, flags, logging

SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
         r"\s*[\r\n]+|\s+(?!\S)|\s+")
BOS, EOT, EOS = "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"
SPECIALS = [BOS, EOS, "<|start_header_id|>", "<|end_header_id|>", EOT]
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
    "'<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
MODEL = dict(num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=192, norm_eps=1e-5,
             rope_theta=500000.0)


def corpus(data_dir: str | None, n: int = 2000) -> list[str]:
  """Questions and answers of the first ``n`` rows of ``<data_dir>/train.jsonl``, else synthetic arithmetic."""
  if data_dir:
    path = os.path.join(data_dir, "train.jsonl")
    if not os.path.isfile(path):
      raise SystemExit(f"make_tiny_checkpoint --data: {path} does not exist; pass the GSM8K folder or leave --data "
                       f"out")
    with open(path, encoding="utf-8") as f:
      rows = [json.loads(line) for _, line in zip(range(n), f)]
    return [r["question"] for r in rows] + [r["answer"] for r in rows]
  from rlj.data import synthetic
  task = synthetic.ArithmeticTask(num_records=n, seed=0, levels=(1, 2, 3))
  return [task[i]["prompt"] for i in range(n)] + [task[i]["answer"] for i in range(n)]


def write_tokenizer(directory: str, texts: list[str], *, vocab_size: int = 700) -> dict[str, int]:
  """Trains and writes the tokenizer files (module docstring); returns the special tokens' ids."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(SPLIT), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
  ids = {s: tok.token_to_id(s) for s in SPECIALS}
  tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                     special_tokens=[(BOS, ids[BOS])])
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  decoder = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for s, i in ids.items()}
  _write_json(os.path.join(directory, "tokenizer_config.json"), {
      "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOT,
      "added_tokens_decoder": decoder, "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
      "model_max_length": 8192})
  _write_json(os.path.join(directory, "generation_config.json"),
              {"bos_token_id": ids[BOS], "eos_token_id": [ids[EOS], ids[EOT]]})
  return ids


def write_model(directory: str, vocab_size: int, *, seed: int = 0, **overrides) -> None:
  """A randomly initialised Llama of ``MODEL``'s shape (``overrides`` change it) as config.json + safetensors."""
  import jax
  import jax.numpy as jnp
  from models import hf
  from models.config import ModelConfig
  from models.transformer import Transformer
  mc = ModelConfig(vocab_size=vocab_size, **{**MODEL, **overrides})
  dummy = jnp.zeros((1, 8), jnp.int32)
  params = Transformer(mc).init(jax.random.key(seed), dummy, dummy, jnp.ones_like(dummy))["params"]
  hf.save_hf_checkpoint(params, mc, directory)


def make(out: str, data_dir: str | None = None) -> str:
  """Writes the whole folder (module docstring); returns ``out``."""
  ids = write_tokenizer(out, corpus(data_dir))
  vocab = -(-(max(ids.values()) + 1) // 64) * 64   # embedding rows: the tokenizer's size rounded up to 64
  write_model(out, vocab)
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  config.update(bos_token_id=ids[BOS], eos_token_id=[ids[EOS], ids[EOT]])
  _write_json(os.path.join(out, "config.json"), config)
  return out


def _write_json(path: str, value) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, ensure_ascii=False)


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  if not f["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if not f.out:
    raise SystemExit("make_tiny_checkpoint --out: required, the folder to write (e.g. runs/tiny-llama)")
  print(f"wrote {make(f.out, f.data or None)}", flush=True)


if __name__ == "__main__":
  flags.DEFINE_string("out", None, "the checkpoint folder to write")
  flags.DEFINE_string("data", "", "a GSM8K folder (train.jsonl) to train the tokenizer on; default: synthetic "
                      "arithmetic")
  app.run(main)
