"""Prompt formats (plain / chat), command-line escapes, and prompt-answer JSONL rows with ``messages``."""
import json

import pytest

from rlj.data import jsonl, prompts, tfds_builders, tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def qwen(checkpoint_dirs):
  return tokenizer.load(checkpoint_dirs["qwen"]), transformers.AutoTokenizer.from_pretrained(checkpoint_dirs["qwen"])


def test_escapes_typed_on_a_command_line_become_newlines():
  typed = r"Question: {prompt}\nThink step by step.\tEnd with '#### N'. Put it in \boxed{{}}; a literal \\n."
  assert prompts.decode_escapes(typed) == ("Question: {prompt}\nThink step by step.\tEnd with '#### N'. Put it in "
                                           "\\boxed{{}}; a literal \\n.")
  fmt = prompts.PromptFormat(user_template=typed)
  assert fmt.render({"prompt": "1+1?"}).startswith("Question: 1+1?\nThink step by step.\t")
  assert fmt.render({"prompt": "x"}).endswith("\\boxed{}; a literal \\n.")
  assert prompts.decode_escapes("real\nnewline") == "real\nnewline"


@pytest.mark.parametrize("template, match", [
    ("Q: {query}", r"has the slot \{query\}"), ("Q: {}", r"has the slot \{\}"), ("no slot", "has no {prompt} slot"),
    ("Q: {prompt", "is not a str.format template"), ("{prompt} {0}", r"has the slot \{0\}"),
])
def test_bad_user_templates(template, match):
  with pytest.raises(prompts.PromptError, match=match):
    prompts.PromptFormat(user_template=template)


def test_format_checks(qwen):
  ours, _ = qwen
  with pytest.raises(prompts.PromptError, match="unknown prompt format 'html'"):
    prompts.PromptFormat(format="html")
  with pytest.raises(prompts.PromptError, match="system prompt needs format 'chat'"):
    prompts.PromptFormat(system_prompt="Be brief.")
  bare = tokenizer.train(["1 + 1 = 2", "2 + 2 = 4"] * 20, vocab_size=300)
  with pytest.raises(prompts.PromptError, match="needs the checkpoint's chat template and it has none"):
    prompts.from_tokenizer(bare, format="chat")
  assert prompts.from_tokenizer(ours, format="chat").add_bos(ours) is False
  assert prompts.from_tokenizer(bare).add_bos(bare) is True  # plain: the tokenizer's own choice


def test_question_and_messages_records_render_alike(qwen):
  ours, ref = qwen
  fmt = prompts.from_tokenizer(ours, format="chat", user_template=r"{question}\nAnswer with '#### N'.",
                               system_prompt="You solve math.")
  want = ref.apply_chat_template(
      [{"role": "system", "content": "You solve math."},
       {"role": "user", "content": "What is 2 + 3?\nAnswer with '#### N'."}],
      tokenize=False, add_generation_prompt=True)
  conversation = [{"role": "user", "content": "What is 2 + 3?"}]
  for record in ({"prompt": "What is 2 + 3?"}, {"prompt": b"What is 2 + 3?"},
                 {"prompt": "ignored", "messages": conversation},
                 {"prompt": "ignored", "messages": json.dumps(conversation).encode()}):
    assert fmt.render(record) == want
  own_system = [{"role": "system", "content": "Terse."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2 + 3?"}]
  got = fmt.messages({"messages": own_system})
  assert got[0] == {"role": "system", "content": "Terse."} and len(got) == 4
  assert got[1]["content"] == "Hi" and got[3]["content"] == "2 + 3?\nAnswer with '#### N'."
  assert fmt.render({"messages": own_system}) == ref.apply_chat_template(got, tokenize=False,
                                                                          add_generation_prompt=True)


def test_plain_format_refuses_conversations():
  fmt = prompts.PromptFormat(user_template="Q: {prompt}\nA:")
  assert fmt.render({"messages": [{"role": "user", "content": "2 + 3?"}]}) == "Q: 2 + 3?\nA:"
  with pytest.raises(prompts.PromptError, match="format 'plain' cannot render a conversation of 3 messages"):
    fmt.render({"index": 4, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                         {"role": "user", "content": "c"}]})


def _write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  return path


def test_messages_rows(tmp_path):
  rows = [
      {"messages": [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5\n#### 5"}]},
      {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "7 - 1?"}], "answer": "#### 6"},
      {"messages": [{"role": "user", "content": "1?"}, {"role": "assistant", "content": "no"}], "answer": "#### 1"},
  ]
  records = jsonl.read_prompt_answer(_write(tmp_path / "m.jsonl", rows))
  assert [r["answer"] for r in records] == ["5\n#### 5", "#### 6", "#### 1"]  # an explicit answer wins
  assert [r["prompt"] for r in records] == ["2 + 3?", "7 - 1?", "1?"] and [r["index"] for r in records] == [0, 1, 2]
  assert json.loads(records[1]["messages"]) == rows[1]["messages"]
  assert json.loads(records[2]["messages"]) == rows[2]["messages"][:1]


@pytest.mark.parametrize("row, match", [
    ({"messages": [{"role": "user", "content": "q"}]}, "no answer: add an 'answer' field"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\] must be an object with string 'role' and 'content'"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "must end with a user turn"),
    ({"messages": [{"role": "user", "content": "q"}], "answer": 5}, "field 'answer' must be a string"),
    ({"question": "q"}, "field 'messages' must be a non-empty list"),
])
def test_bad_messages_rows_name_file_and_line(tmp_path, row, match):
  good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
  path = _write(tmp_path / "m.jsonl", [good, row])
  with pytest.raises(jsonl.JsonlError, match=match) as e:
    jsonl.read_prompt_answer(path)
  assert str(e.value).startswith(f"{path}:2: ")


def test_question_layout_reads_gsm8k(gsm8k_dir):
  records = jsonl.read_prompt_answer(gsm8k_dir / "test.jsonl")
  assert len(records) == 1319 and records[0]["prompt"].startswith("Janet’s ducks lay 16 eggs")
  assert records[0]["answer"].endswith("#### 18") and "messages" not in records[0]
  with pytest.raises(jsonl.JsonlError, match="needs 'messages', 'question' or 'prompt'"):
    jsonl.prompt_answer_record({"text": "x"}, where="f:1")


def test_tfds_messages_config_renders_like_gsm8k(tmp_path, gsm8k_dir, qwen):
  """GSM8K rewritten as conversation rows, built with the ``messages`` config, renders as the question rows do."""
  ours, _ = qwen
  source = tmp_path / "src"
  source.mkdir()
  raw = [json.loads(line) for line in (gsm8k_dir / "test.jsonl").read_text(encoding="utf-8").splitlines()[:20]]
  _write(source / "test.jsonl", [{"messages": [{"role": "user", "content": r["question"]},
                                               {"role": "assistant", "content": r["answer"]}]} for r in raw])
  tfds_builders.build("prompt_answer", "messages", source_dir=source, data_dir=tmp_path / "tfds")
  ds = tfds_builders.data_source("prompt_answer", "messages", data_dir=tmp_path / "tfds", split="test")
  fmt = prompts.from_tokenizer(ours, format="chat", system_prompt="Solve it.")
  assert len(ds) == 20
  for i, r in enumerate(raw):
    assert ds[i]["answer"].decode() == r["answer"] and ds[i]["prompt"].decode() == r["question"]
    assert fmt.render(ds[i]) == fmt.render({"prompt": r["question"]})


def test_chat_prompt_pipeline_in_worker_processes(built_data_dir, checkpoint_dirs):
  """GSM8K through grain with a tokenizer.json tokenizer and its chat template, encoded in a worker process (the
  tokenizer and prompt format are pickled): rows equal transformers' apply_chat_template ids, left-padded."""
  from rlj.data import pipeline
  ours = tokenizer.load(checkpoint_dirs["llama3"])
  ref = transformers.AutoTokenizer.from_pretrained(checkpoint_dirs["llama3"])
  ds = tfds_builders.data_source("prompt_answer", "gsm8k", data_dir=built_data_dir, split="test")
  fmt = prompts.from_tokenizer(ours, format="chat", user_template=r"{prompt}\nEnd with '#### N'.")
  cfg = pipeline.PipelineConfig(batch_size=4, buckets=(256, 512), prompt_format=fmt, add_bos=fmt.add_bos(ours),
                                shuffle=False, num_workers=1, num_threads=1)
  it = pipeline.prompt_pipeline(ds, ours, cfg, process_index=0, process_count=1)
  try:
    batch = next(it)
  finally:
    it.close()
  for row, mask, index in zip(batch["prompt_tokens"], batch["prompt_mask"], batch["index"]):
    messages = [{"role": "user", "content": ds[int(index)]["prompt"].decode() + "\nEnd with '#### N'."}]
    want = ref.apply_chat_template(messages, add_generation_prompt=True)
    want = list(want["input_ids"]) if hasattr(want, "keys") else list(want)
    assert row[mask == 1].tolist() == want and row[mask == 0].tolist() == [ours.pad_id] * int((mask == 0).sum())
