"""Checkpoint tokenizers (tokenizer.json and tokenizer.model) against transformers on the same files.

The three tiny checkpoints (tiny_checkpoints.py) are built once per session; transformers is the reference only.
"""
import json
import os
import pickle
import shutil

import numpy as np
import pytest

import tiny_checkpoints
from rlj.data import encoding, prompts, special_tokens, tokenizer

transformers = pytest.importorskip("transformers")
FAMILIES = ("llama3", "qwen", "gemma")
TEXTS = ["Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "  two  spaces\tand tab ",
         "héllo wörld — 中文 ✓", "Human: hi\n\nAssistant: hello", ""]


@pytest.fixture(scope="module")
def loaded(checkpoint_dirs):
  """``{family: (ours, transformers' AutoTokenizer)}``."""
  return {name: (tokenizer.load(d), transformers.AutoTokenizer.from_pretrained(d))
          for name, d in checkpoint_dirs.items()}


@pytest.fixture(scope="module")
def questions(gsm8k_dir):
  return tiny_checkpoints.read_questions(gsm8k_dir, "test", 200)


def _ids(out):
  """transformers' apply_chat_template(tokenize=True) returns a list or a BatchEncoding, by version."""
  return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


def _generation_eos(directory):
  with open(os.path.join(directory, "generation_config.json")) as f:
    eos = json.load(f)["eos_token_id"]
  return eos if isinstance(eos, list) else [eos]


@pytest.mark.parametrize("family", FAMILIES)
def test_special_ids_match_transformers_and_files(loaded, checkpoint_dirs, family):
  ours, ref = loaded[family]
  assert ours.kind == ("sentencepiece" if family == "gemma" else "hf")
  assert ours.bos_id == ref.bos_token_id and ours.eos_id == ref.eos_token_id
  assert set(ours.eos_ids) == {ref.eos_token_id, *_generation_eos(checkpoint_dirs[family])}
  assert ours.vocab_size == len(ref)
  assert ours.add_bos_default == (ref("x")["input_ids"][:1] == [ref.bos_token_id])
  if ref.pad_token_id is not None:
    assert (ours.pad_id, ours.pad_source) == (ref.pad_token_id, "files")
  else:  # Llama 3 names no pad: the first special token that is neither BOS, an EOS, nor in the chat template
    assert ours.pad_source == "reserved"
    assert ours.id_to_piece(ours.pad_id) == "<|reserved_special_token_0|>"
    assert ours.pad_id not in ours.eos_ids
  with open(os.path.join(checkpoint_dirs[family], "config.json")) as f:
    assert json.load(f)["vocab_size"] > ours.vocab_size  # a larger embedding is normal


def test_expected_layouts(loaded):
  llama, qwen, gemma = (loaded[f][0] for f in FAMILIES)
  assert llama.add_bos_default and llama.chat_template.adds_bos and len(llama.eos_ids) == 3
  assert qwen.bos_id is None and not qwen.add_bos_default and not qwen.chat_template.adds_bos
  assert qwen.pad_id in qwen.eos_ids  # Qwen's own pad is <|endoftext|>, also an EOS in generation_config
  assert (gemma.pad_id, gemma.eos_id, gemma.bos_id, gemma.unk_id) == (0, 1, 2, 3)
  assert gemma.id_to_piece(gemma.eos_ids[1]) == "<end_of_turn>" and gemma.chat_template.adds_bos


@pytest.mark.parametrize("family", FAMILIES)
def test_gsm8k_chat_prompts_match_transformers(loaded, questions, family):
  """Rendered text byte-identical and token ids identical over the first 200 GSM8K test questions."""
  ours, ref = loaded[family]
  systems = [None] if family == "gemma" else [None, "Solve the problem.\nEnd with '#### <number>'."]
  for system in systems:
    fmt = prompts.from_tokenizer(ours, format="chat", system_prompt=system or "")
    for q in questions:
      messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
      text = fmt.render({"prompt": q})
      assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
      assert ours.encode(text) == _ids(ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_gsm8k_plain_prompts_match_transformers(loaded, questions, family):
  ours, ref = loaded[family]
  fmt = prompts.from_tokenizer(ours, format="plain")
  for q in questions:
    assert ours.encode(fmt.render({"prompt": q}), add_bos=fmt.add_bos(ours)) == ref(q)["input_ids"]
  assert ours.encode_batch(questions[:5], add_bos=fmt.add_bos(ours)) == [ref(q)["input_ids"] for q in questions[:5]]


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_encoder_with_chat_format(loaded, questions, family):
  ours, ref = loaded[family]
  fmt = prompts.from_tokenizer(ours, format="chat")
  enc = encoding.PromptEncoder(ours, 512, prompt_format=fmt, add_bos=fmt.add_bos(ours))
  e = enc({"prompt": questions[0].encode(), "answer": b"18", "index": 0})
  want = _ids(ref.apply_chat_template([{"role": "user", "content": questions[0]}], add_generation_prompt=True))
  assert e["tokens"].tolist() == want and not e["truncated"]
  short = encoding.PromptEncoder(ours, 8, prompt_format=fmt, add_bos=False)({"prompt": questions[0], "answer": "",
                                                                             "index": 0})
  # Truncation keeps the template's BOS first (and the end of the prompt).
  assert short["tokens"].tolist() == (want[:1] + want[-7:] if ours.chat_template.adds_bos else want[-8:])
  with pytest.raises(ValueError, match="add_bos=True with a 'chat' prompt format"):  # would double the BOS
    encoding.PromptEncoder(ours, 64, prompt_format=fmt, add_bos=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_special_strings_in_text_and_decode(loaded, family):
  ours, ref = loaded[family]
  names = sorted(set(ours.special_tokens.values()))
  for text in TEXTS + [f"a{names[0]}b {names[-1]}c", "".join(names)]:
    ids = ours.encode(text)
    assert ids == ref(text, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids, stop_at_eos=False) == ref.decode(
        [i for i in ids if i not in (ours.bos_id, ours.pad_id, *ours.eos_ids)], skip_special_tokens=False,
        clean_up_tokenization_spaces=False)
  for text in TEXTS:
    assert ours.decode(ours.encode(text)) == text


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_stops_at_every_eos(loaded, family):
  ours, _ = loaded[family]
  ids = ours.encode("The answer is 4.")
  for eos in ours.eos_ids:
    row = [ours.pad_id] * 2 + ([ours.bos_id] if ours.bos_id is not None else []) + ids + [eos] + ours.encode("junk")
    mask = [0, 0] + [1] * (len(row) - 2)
    assert ours.decode_batch(np.array([row]), np.array([mask])) == ["The answer is 4."]


@pytest.mark.parametrize("family", FAMILIES)
def test_pickle_and_save_round_trip(loaded, checkpoint_dirs, tmp_path, family):
  ours, _ = loaded[family]
  messages = [{"role": "user", "content": "What is 7 * 8?"}]
  for again in (pickle.loads(pickle.dumps(ours)), _saved(ours, tmp_path / family)):
    assert type(again) is type(ours)
    assert [again.encode(t) for t in TEXTS] == [ours.encode(t) for t in TEXTS]
    assert (again.bos_id, again.eos_ids, again.pad_id, again.vocab_size, again.add_bos_default) == (
        ours.bos_id, ours.eos_ids, ours.pad_id, ours.vocab_size, ours.add_bos_default)
    assert again.chat_template.render(messages) == ours.chat_template.render(messages)


def _saved(tok, directory):
  tok.save_pretrained(directory)
  return tokenizer.load(directory)


def test_load_by_file_and_kind(checkpoint_dirs):
  llama, gemma = checkpoint_dirs["llama3"], checkpoint_dirs["gemma"]
  by_dir = tokenizer.load(llama)
  for tok in (tokenizer.load(os.path.join(llama, "tokenizer.json")), tokenizer.load(llama, kind="hf")):
    assert tok.kind == "hf" and tok.encode(TEXTS[0]) == by_dir.encode(TEXTS[0]) and tok.eos_ids == by_dir.eos_ids
  for tok in (tokenizer.load(os.path.join(gemma, "tokenizer.model")), tokenizer.load(gemma, kind="sentencepiece")):
    assert tok.kind == "sentencepiece" and tok.eos_ids == (1, 5) and tok.chat_template is not None
  bare = tokenizer.Tokenizer.from_file(os.path.join(gemma, "tokenizer.model"))  # the model proto alone
  assert (bare.pad_id, bare.eos_ids, bare.bos_id) == (0, (1,), 2) and bare.chat_template is None


def test_chat_template_forms_in_tokenizer_config(checkpoint_dirs, tmp_path):
  """A template inline in tokenizer_config.json, the list-of-named form, and an AddedToken-dict bos_token."""
  src = checkpoint_dirs["llama3"]
  messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
  with open(os.path.join(src, "chat_template.jinja")) as f:
    template = f.read()
  for form in ("string", "named"):
    d = tmp_path / form
    shutil.copytree(src, d)
    os.remove(d / "chat_template.jinja")
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["bos_token"] = {"__type": "AddedToken", "content": "<|begin_of_text|>", "special": True}
    config["chat_template"] = template if form == "string" else [
        {"name": "default", "template": template}, {"name": "plain", "template": "{{ messages[0]['content'] }}"}]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    ours, ref = tokenizer.load(d), transformers.AutoTokenizer.from_pretrained(d)
    assert ours.chat_template.render(messages) == ref.apply_chat_template(messages, tokenize=False,
                                                                          add_generation_prompt=True)
    assert ours.bos_id == ref.bos_token_id
  assert tokenizer.load(d, chat_template="plain").chat_template.render(messages) == "S"
  assert tokenizer.load(d).chat_template_names == ("default", "plain")


def _one_line_error(match, fn, *args, **kwargs):
  with pytest.raises(tokenizer.TokenizerError, match=match) as e:
    fn(*args, **kwargs)
  assert "\n" not in str(e.value)
  return str(e.value)


def test_load_errors_are_one_line_and_name_the_fix(checkpoint_dirs, tmp_path):
  llama, gemma = checkpoint_dirs["llama3"], checkpoint_dirs["gemma"]
  _one_line_error("^no such file or folder: .*missing; pass a checkpoint folder", tokenizer.load, tmp_path / "missing")
  _one_line_error("^no such file or folder: .*missing.model", tokenizer.load, tmp_path / "missing.model")
  _one_line_error("^no such file: .*missing.model", tokenizer.Tokenizer.from_file, tmp_path / "missing.model")
  (tmp_path / "empty").mkdir()
  _one_line_error("empty has no tokenizer.json or tokenizer.model; pass the checkpoint folder", tokenizer.load,
                  tmp_path / "empty")
  _one_line_error(r"gemma has no tokenizer\.json \(tokenizer kind 'hf'\); it has tokenizer\.model: use tokenizer "
                  r"kind 'auto'", tokenizer.load, gemma, kind="hf")
  _one_line_error(r"llama3 has no tokenizer\.model \(tokenizer kind 'sentencepiece'\); it has tokenizer\.json",
                  tokenizer.load, llama, kind="sentencepiece")
  _one_line_error("unknown tokenizer kind 'tiktoken'", tokenizer.load, llama, kind="tiktoken")
  bad = tmp_path / "bad"
  shutil.copytree(llama, bad)
  (bad / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", ')
  msg = _one_line_error("does not parse as a Hugging Face tokenizer.json", tokenizer.load, bad)
  assert str(bad / "tokenizer.json") in msg and "EOF while parsing" in msg
  (bad / "tokenizer.json").write_text("[]")
  _one_line_error("does not parse as a Hugging Face tokenizer.json", tokenizer.load, bad)
  (tmp_path / "x.model").write_bytes(b"not a model")
  _one_line_error("is not a sentencepiece model", tokenizer.load, tmp_path / "x.model")
  shutil.copy(os.path.join(llama, "tokenizer.json"), bad / "tokenizer.json")
  (bad / "tokenizer_config.json").write_text('{"bos_token": ')
  _one_line_error(r"tokenizer_config\.json is not valid JSON", tokenizer.load, bad)
  (bad / "tokenizer_config.json").write_text('{"eos_token": "<|no_such_token|>"}')
  tok = tokenizer.load(bad)  # transformers adds a named token the vocabulary lacks; so do we
  assert tok.id_to_piece(tok.eos_id) == "<|no_such_token|>" and tok.vocab_size == tok.eos_id + 1


def test_pad_rules():
  files = special_tokens.CheckpointFiles.empty()
  vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "<r0>": 3, "<r1>": 4, "a": 5}
  resolve = lambda **kw: special_tokens.resolve(  # noqa: E731
      files, to_id=vocab.get, vocab_size=6, special_ids={0: "<s>", 1: "</s>", 3: "<r0>", 4: "<r1>"},
      **kw)
  assert resolve(model_ids={"eos": 1, "unk": 2}).pad_id == 2  # unk (Llama 2)
  picked = resolve(model_ids={"bos": 0, "eos": 1}, template_text="{{ '<r0>' }}")
  assert (picked.pad_id, picked.pad_source) == (4, "reserved")  # <r0> appears in the template
  assert resolve(model_ids={"eos": 1}, pad_id=5).pad_source == "argument"
  only_eos = special_tokens.resolve(files, to_id=vocab.get, vocab_size=6, model_ids={"eos": 1})
  assert (only_eos.pad_id, only_eos.pad_source) == (1, "eos")
  with pytest.raises(tokenizer.TokenizerError, match="conflicts with the model's own pad id 3"):
    resolve(model_ids={"eos": 1, "pad": 3}, pad_id=4)
  with pytest.raises(tokenizer.TokenizerError, match="no EOS token"):
    resolve(model_ids={})


def test_sentencepiece_tokens_added_past_the_model(checkpoint_dirs, tmp_path):
  """added_tokens_decoder may list ids past the .model's pieces; they encode, decode and count in vocab_size."""
  d = tmp_path / "gemma_plus"
  shutil.copytree(checkpoint_dirs["gemma"], d)
  config = json.loads((d / "tokenizer_config.json").read_text())
  first_new = tokenizer.load(d).vocab_size
  config["added_tokens_decoder"][str(first_new)] = {"content": "<tool_call>", "special": True, "lstrip": False,
                                                    "rstrip": False, "normalized": False, "single_word": False}
  (d / "tokenizer_config.json").write_text(json.dumps(config))
  ours, ref = tokenizer.load(d), transformers.AutoTokenizer.from_pretrained(d)
  text = "Call<tool_call>{\"x\": 1}<end_of_turn>"
  ids = ours.encode(text)
  assert first_new in ids and ids == ref(text, add_special_tokens=False)["input_ids"]
  assert ours.vocab_size == first_new + 1 == len(ref)
  assert ours.decode(ids) == "Call<tool_call>{\"x\": 1}"  # stops at <end_of_turn>, an EOS id of this checkpoint
