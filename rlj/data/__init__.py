"""Datasets, tokenizer and input pipelines.

Submodules are imported one by one (``from rlj.data import pipeline``) so that the rest of rlj never
loads grain or tensorflow_datasets:

- ``jsonl``: strict JSONL reading (errors name file, line and field).
- ``tfds_builders``: array_record tfds datasets built from local JSONL (GSM8K, HH-RLHF, generic layouts).
- ``synthetic``: seeded arithmetic task with exact answers and a preference set with a known scorer.
- ``tokenizer``: one interface over SentencePiece ``.model`` and Hugging Face ``tokenizer.json`` (``hf_tokenizer``),
  ``load(checkpoint_dir)``, in-process SentencePiece training; special ids from the checkpoint's files
  (``special_tokens``).
- ``chat``: the checkpoint's chat template, rendered by jinja2 as transformers renders it.
- ``prompts``: a record's prompt text, plain (``str.format`` template) or chat.
- ``stops``: cutting completions at stop ids / stop strings for reward functions.
- ``encoding``: per-record tokenisation and left-padded, bucketed batches (numpy).
- ``pipeline``: grain pipelines with host sharding, epochs and exactly restorable iterator state.
"""
