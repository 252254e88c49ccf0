"""Tiny tokenizer checkpoints in three families' own layouts, built in-process (no downloads, ~1 s each).

- ``llama3``: byte-level BPE ``tokenizer.json`` (Llama 3 split regex) trained with ``tokenizers``, special tokens
  ``<|begin_of_text|>`` ... ``<|eot_id|>``, a post-processor that adds BOS, saved by transformers'
  ``PreTrainedTokenizerFast.save_pretrained`` with a Llama-3.1-style chat template (BOS in the template, a system
  header with a knowledge date, ``messages[1:]``, ``tojson`` tools); ``generation_config.json`` lists three EOS
  ids; no pad token.
- ``qwen``: byte-level BPE with NFC, no BOS, EOS ``<|im_end|>``, pad ``<|endoftext|>``, a ChatML template with a
  default system prompt; ``config.json`` embeds more rows than the tokenizer has.
- ``gemma``: a SentencePiece ``tokenizer.model`` (pad 0, eos 1, bos 2, unk 3, ``<start_of_turn>`` /
  ``<end_of_turn>`` user-defined, byte fallback, split digits) with a hand-written ``tokenizer_config.json`` and
  the Gemma chat template (refuses a system turn and non-alternating roles).
"""
import io
import json
import os

import sentencepiece as spm
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import trainers

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                   "<|eot_id|>", "<|python_tag|>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant', 'ipython', 'tool'] %}
        {{- raise_exception("Unknown role: " + message['role']) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a tiny test assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a tiny test assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

GEMMA_TEMPLATE = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                  "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
                  "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/"
                  "user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' "
                  "%}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
                  "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
                  "{{'<start_of_turn>model\n'}}{% endif %}")
GEMMA_SPECIALS = ["<start_of_turn>", "<end_of_turn>", "<mask>"]


def _write_json(path, value):
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2)


def _bpe(corpus, split, specials, *, nfc=False, vocab_size=700):
  tok = Tokenizer(models.BPE())
  if nfc:
    tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(corpus, trainer)
  tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
  return tok


def llama3(directory, corpus):
  """A Llama-3-style checkpoint tokenizer in ``directory`` (module docstring); returns the directory."""
  from transformers import PreTrainedTokenizerFast
  tok = _bpe(corpus, LLAMA3_SPLIT, LLAMA3_SPECIALS)
  ids = {s: tok.token_to_id(s) for s in LLAMA3_SPECIALS}
  bos = "<|begin_of_text|>"
  tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                     special_tokens=[(bos, ids[bos])])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>")
  fast.chat_template = LLAMA3_TEMPLATE
  fast.save_pretrained(directory)
  eos = [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]
  _write_json(os.path.join(directory, "generation_config.json"), {"bos_token_id": ids[bos], "eos_token_id": eos})
  _write_json(os.path.join(directory, "config.json"), {"model_type": "llama", "vocab_size": 768,
                                                       "bos_token_id": ids[bos], "eos_token_id": eos})
  return directory


def qwen(directory, corpus):
  """A Qwen2.5-style checkpoint tokenizer in ``directory`` (module docstring); returns the directory."""
  from transformers import PreTrainedTokenizerFast
  tok = _bpe(corpus, QWEN_SPLIT, QWEN_SPECIALS, nfc=True)
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  ids = {s: tok.token_to_id(s) for s in QWEN_SPECIALS}
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
  fast.chat_template = QWEN_TEMPLATE
  fast.save_pretrained(directory)
  _write_json(os.path.join(directory, "generation_config.json"), {
      "bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"],
      "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]})
  _write_json(os.path.join(directory, "config.json"), {"model_type": "qwen2", "vocab_size": 896,
                                                       "bos_token_id": ids["<|endoftext|>"],
                                                       "eos_token_id": ids["<|im_end|>"]})
  return directory


def gemma(directory, corpus):
  """A Gemma-style SentencePiece checkpoint tokenizer in ``directory`` (module docstring); returns the directory."""
  os.makedirs(directory, exist_ok=True)
  buf = io.BytesIO()
  spm.SentencePieceTrainer.Train(
      sentence_iterator=iter(corpus), model_writer=buf, model_type="bpe", vocab_size=700, byte_fallback=True,
      split_digits=True, character_coverage=1.0, normalization_rule_name="identity", add_dummy_prefix=False,
      remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, user_defined_symbols=GEMMA_SPECIALS,
      num_threads=1, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
      bos_piece="<bos>", unk_piece="<unk>", minloglevel=2, hard_vocab_limit=False, shuffle_input_sentence=False)
  with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
    f.write(buf.getvalue())
  pieces = ["<pad>", "<eos>", "<bos>", "<unk>"] + GEMMA_SPECIALS
  decoder = {str(i): {"content": p, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, p in enumerate(pieces)}
  _write_json(os.path.join(directory, "tokenizer_config.json"), {
      "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
      "added_tokens_decoder": decoder, "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
      "unk_token": "<unk>", "chat_template": GEMMA_TEMPLATE, "clean_up_tokenization_spaces": False})
  _write_json(os.path.join(directory, "generation_config.json"), {
      "bos_token_id": 2, "pad_token_id": 0, "eos_token_id": [1, pieces.index("<end_of_turn>")]})
  _write_json(os.path.join(directory, "config.json"), {"model_type": "gemma", "vocab_size": 768})
  return directory


BUILDERS = {"llama3": llama3, "qwen": qwen, "gemma": gemma}


def read_questions(gsm8k_dir, split="test", n=200):
  """The first ``n`` GSM8K questions of ``split``."""
  with open(os.path.join(gsm8k_dir, f"{split}.jsonl"), encoding="utf-8") as f:
    return [json.loads(line)["question"] for _, line in zip(range(n), f)]
