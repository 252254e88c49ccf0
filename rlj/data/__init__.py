"""Datasets, tokenizer and input pipelines.

Submodules are imported one by one (``from rlj.data import pipeline``) so that the rest of rlj never
loads grain or tensorflow_datasets:

- ``jsonl``: strict JSONL reading (errors name file, line and field).
- ``tfds_builders``: array_record tfds datasets built from local JSONL (GSM8K, HH-RLHF, generic layouts).
- ``synthetic``: seeded arithmetic task with exact answers and a preference set with a known scorer.
- ``tokenizer``: SentencePiece training (in-process) and loading, explicit BOS/EOS/PAD ids.
- ``encoding``: per-record tokenisation and left-padded, bucketed batches (numpy).
- ``pipeline``: grain pipelines with host sharding, epochs and exactly restorable iterator state.
"""
