"""Config -> data: prompt formats, the generated tasks and tfds sources, and the prompt pipelines of RL / SFT jobs
(re-exported by ``launch.builders``)."""
from __future__ import annotations

import os


def user_text(config, question: str) -> str:
  """``data.user_template`` applied to ``question`` (escapes decoded, as the prompt pipeline does)."""
  from rlj.data import prompts
  return prompts.PromptFormat(user_template=config.data.user_template).user_text(question)


def prompt_format(config, tokenizer):
  """The config's ``data.format`` / ``user_template`` / ``system_prompt`` as a ``prompts.PromptFormat``; an agent
  job's tools go to a chat template as its ``tools`` (their JSON schemas), as chat templates with a tool-calling
  convention (Qwen, Llama 3.1) describe them to the model."""
  from launch import agent_setup
  from rlj.data import prompts
  d = config.data
  kwargs = {}
  if d.format == "chat" and agent_setup.enabled(config) and config.agent.tools:
    kwargs = {"tools": tuple(t.schema for t in agent_setup.tools(config))}
  try:
    return prompts.from_tokenizer(tokenizer, format=d.format, user_template=d.user_template,
                                  system_prompt=d.system_prompt, template_kwargs=kwargs)
  except prompts.PromptError as e:
    raise SystemExit(f"config key 'data.format': {e}") from None


GENERATED = ("synthetic", "calculator")   # data sources generated from a seed (no files)
JSONL_SOURCES = ("gsm8k", "generic", "messages", "rubric")   # data sources built from JSONL files (tfds_builders)


def generated_source(config, split: str, num_records: int | None = None):
  """A generated split: ``synthetic`` (``rlj.data.synthetic.ArithmeticTask`` at ``data.levels``) or ``calculator``
  (``rlj.agents.task.CalculatorTask``: ``data.digits``, ``data.tool_fraction``)."""
  from rlj.data import synthetic
  d = config.data
  n = num_records if num_records is not None else d.train_records if split == "train" else d.eval_records
  seed = d.seed if split == "train" else d.seed + 1000003
  if d.source == "calculator":
    from rlj.agents.task import CalculatorTask
    return CalculatorTask(num_records=n, seed=seed, digits=tuple(d.get("digits", (2, 2))),
                          tool_fraction=float(d.get("tool_fraction", 0.5)),
                          observation_template=config.agent.observation_template)
  return synthetic.ArithmeticTask(num_records=n, seed=seed, levels=tuple(d.levels))


def prompt_source(config, split: str, workdir: str = ""):
  """The split's random-access records: a generated task (``GENERATED``), or the tfds build of ``data.source_dir`` in
  ``data.data_dir`` (default ``<workdir>/tfds``)."""
  from rlj.data import tfds_builders
  d = config.data
  if d.source in GENERATED:
    return generated_source(config, split)
  if d.source in JSONL_SOURCES:
    data_dir = d.data_dir or os.path.join(workdir, "tfds")
    name = d.train_split if split == "train" else d.eval_split
    if d.source_dir:  # the entry built from the files as they are now (keyed by their fingerprint)
      return tfds_builders.build("prompt_answer", d.source, source_dir=d.source_dir,
                                 data_dir=data_dir).as_data_source(split=name)
    try:
      return tfds_builders.data_source("prompt_answer", d.source, data_dir=data_dir, split=name)
    except FileNotFoundError as e:
      raise SystemExit(f"config key 'data.data_dir': {e}") from None
  raise SystemExit(f"config key 'data.source': {d.source!r}; choose {' | '.join(GENERATED + JSONL_SOURCES)}")


def prompt_iterator(config, env, *, split: str, batch_prompts: int, seed: int, num_epochs=None,
                    shuffle: bool = True, drop_remainder: bool = True, source=None):
  """Batches of encoded prompts of ``split``; ``source``: its records when the caller holds them already
  (``prompt_source``), so that a split read again (every evaluation) is not fingerprinted and opened again."""
  from rlj.data import pipeline
  fmt = prompt_format(config, env.tokenizer)
  pc = pipeline.PipelineConfig(batch_size=batch_prompts, buckets=tuple(config.data.buckets), prompt_format=fmt,
                               add_bos=config.data.add_bos and fmt.add_bos(env.tokenizer),
                               overflow=config.data.overflow, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                               drop_remainder=drop_remainder, num_workers=config.data.num_workers)
  if source is None:
    source = prompt_source(config, split, env.workdir)
  return pipeline.prompt_pipeline(source, env.tokenizer, pc)
