"""grain input pipelines: host sharding, seeded shuffle, epochs, tokenisation, bucketed left-padded batches.

The pipeline is split where grain's determinism guarantees end:

1. A random-access ``grain.MapDataset`` of encoded elements (per-record work, no cross-record state):
   source -> seeded shuffle (a new permutation each epoch) -> repeat -> this host's share -> encode.
   Element ``k`` of this host is a pure function of ``(source, seed, process_index, process_count, k)``.
2. ``BatchIterator`` reads that element stream from an element counter, through grain threads and
   (optionally) worker processes, and in the main process skips the records marked too long
   (``overflow="drop"``), groups ``batch_size`` records and left-pads them to the smallest bucket.

The iterator state is that counter plus running totals, so restoring it replays exactly the batches an
uninterrupted iterator would yield, with any number of workers or threads (grain's own multi-process
state depends on the worker count; this one does not). ``get_state`` returns a JSON-serialisable dict
for the checkpoint.

Host sharding: all hosts shuffle the same global record stream (the first ``n * (len // n)`` records with
``drop_remainder_hosts=True``, so every host has as many records and steps, else all of them) and cut it into
global batches of ``batch_size * n`` records; host ``i`` of ``n`` reads block ``i`` (``batch_size`` records) of
every global batch, and an even share of a final partial one. The global batch is therefore the same
records in the same order for any host count (host ``i``'s rows are rows ``i * batch_size ...`` of it), so a
multi-host job sees the data of a one-host job with ``n`` times its per-host batch. The per-host batch is
``batch_size``; the global batch is ``batch_size * process_count``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import grain
import numpy as np

from rlj.data import encoding
from rlj.data.tokenizer import TokenizerBase


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Options shared by the prompt and preference pipelines.

  Attributes:
    batch_size: records per batch on this host.
    buckets: allowed padded lengths (prompt length for prompts, full sequence length for preferences).
    template: prompt template with a ``{prompt}`` slot.
    prompt_format: a ``prompts.PromptFormat`` (plain or chat template) rendering prompts instead of ``template``;
      with a chat format set ``add_bos=prompt_format.add_bos(tokenizer)`` (False).
    add_bos: start every sequence with the tokenizer's BOS.
    overflow: "truncate" (keep the end, and the BOS) | "drop" sequences longer than ``max(buckets)``.
    seed: shuffle seed.
    shuffle: shuffle records (a different permutation each epoch).
    num_epochs: passes over this host's records; None repeats forever.
    drop_remainder: drop the final partial batch of a finite run; else pad it with invalid rows.
    drop_remainder_hosts: give every host the same number of records by dropping the last
      ``len % process_count`` records.
    num_workers: grain worker processes for reading and encoding (0: in the main process).
    num_threads: grain reader threads per process.
    prefetch: grain read-ahead buffer per process, in records.
  """
  batch_size: int
  buckets: tuple[int, ...] = (64, 128, 256)
  template: str = "{prompt}"
  prompt_format: Any = None
  add_bos: bool = True
  overflow: str = "truncate"
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None
  drop_remainder: bool = True
  drop_remainder_hosts: bool = True
  num_workers: int = 0
  num_threads: int = 2
  prefetch: int = 64

  def __post_init__(self):
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {self.batch_size}")
    if not self.buckets or min(self.buckets) < 1:
      raise ValueError(f"buckets must be positive lengths, got {self.buckets}")
    if self.overflow not in encoding.OVERFLOW:
      raise ValueError(f"unknown overflow {self.overflow!r}; choose one of {encoding.OVERFLOW}")


def host_shard(num_records: int, *, process_index: int, process_count: int,
               drop_remainder: bool = True) -> slice:
  """The slice of record indices host ``process_index`` of ``process_count`` reads (see module doc)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  stop = num_records - num_records % process_count if drop_remainder else num_records
  return slice(process_index, stop, process_count)


def _host(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # only for the defaults; the pipeline itself does not need jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return int(process_index), int(process_count)


def host_block_index(k: int, *, total: int, block: int, process_index: int, process_count: int) -> int:
  """Global stream index of element ``k`` of host ``process_index`` (see module doc: blocks of global batches).

  The ``total`` elements form global batches of ``block * process_count``; host ``i`` reads block ``i`` of
  each, and of a final partial batch of ``R`` elements the ``i``-th of ``process_count`` near-equal parts.
  """
  per_batch = block * process_count
  full = total // per_batch
  if k < full * block:
    return (k // block) * per_batch + process_index * block + k % block
  rest = total - full * per_batch
  share, extra = divmod(rest, process_count)
  offset = process_index * share + min(process_index, extra)
  return full * per_batch + offset + (k - full * block)


class _HostBlocks(grain.MapDataset):
  """Host ``process_index``'s share of a global element stream (``host_block_index``)."""

  def __init__(self, parent: grain.MapDataset, *, block: int, process_index: int, process_count: int):
    super().__init__(parent)
    self._total, self._block = len(parent), block
    self._index, self._count = process_index, process_count
    full = self._total // (block * process_count)
    share, extra = divmod(self._total - full * block * process_count, process_count)
    self._length = full * block + share + int(process_index < extra)

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    if not 0 <= index < self._length:
      raise IndexError(f"element {index} of a host stream of {self._length}")
    return self._parent[host_block_index(index, total=self._total, block=self._block,
                                         process_index=self._index, process_count=self._count)]

  def __str__(self) -> str:
    return f"_HostBlocks(block={self._block}, host={self._index}/{self._count})"


def element_dataset(source: Any, encoder: Callable[[dict], dict], config: PipelineConfig, *,
                    process_index: int, process_count: int) -> tuple[grain.MapDataset, int]:
  """Stage 1: this host's encoded element stream and its records per epoch."""
  ds = grain.MapDataset.source(source)
  records = host_shard(len(ds), process_index=0, process_count=process_count,
                       drop_remainder=config.drop_remainder_hosts).stop
  ds = ds[:records]
  epoch_len = len(range(process_index, records, process_count))
  if epoch_len == 0:
    raise ValueError(f"host {process_index} of {process_count} gets no records from {len(source)}")
  if config.shuffle:
    ds = ds.shuffle(seed=config.seed)
  ds = ds.repeat(config.num_epochs)
  if process_count > 1:
    ds = _HostBlocks(ds, block=config.batch_size, process_index=process_index, process_count=process_count)
  return ds.map(encoder), epoch_len


class BatchIterator:
  """Batches from an element stream, with exact ``get_state`` / ``set_state`` (see module doc).

  Yields dicts of numpy arrays (see ``encoding.collate_prompts`` / ``collate_preferences``). ``metrics()``
  gives running totals: records yielded, truncated, dropped, and the current epoch.
  """

  def __init__(self, elements: grain.MapDataset, collate: Callable[[list[dict]], dict], *, epoch_len: int,
               config: PipelineConfig, fingerprint: dict[str, Any]):
    self._elements = elements
    self._collate = collate
    self._epoch_len = epoch_len
    self._config = config
    self._fingerprint = dict(fingerprint)
    self._next_element = 0
    self._counts = {"examples": 0, "truncated": 0, "dropped": 0, "batches": 0}
    self._it = None
    self._done = False

  def __iter__(self) -> "BatchIterator":
    return self

  def _open(self):
    ds = self._elements[self._next_element:].to_iter_dataset(
        grain.ReadOptions(num_threads=self._config.num_threads, prefetch_buffer_size=self._config.prefetch))
    if self._config.num_workers > 0:
      _ensure_flags_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._config.num_workers))
    return iter(ds)

  def __next__(self) -> dict[str, np.ndarray]:
    if self._done:
      raise StopIteration
    if self._it is None:
      self._it = self._open()
    batch, counts, consumed = [], dict(self._counts), 0
    while len(batch) < self._config.batch_size:
      try:
        element = next(self._it)
      except StopIteration:
        break
      consumed += 1
      if element["too_long"] and self._config.overflow == "drop":
        counts["dropped"] += 1
        if not batch and consumed > self._epoch_len:
          raise ValueError(f"a whole epoch ({self._epoch_len} records) is longer than the longest bucket "
                           f"{max(self._config.buckets)}; raise the buckets or use overflow='truncate'")
        continue
      counts["truncated"] += int(element["truncated"])
      batch.append(element)
    if not batch or (len(batch) < self._config.batch_size and self._config.drop_remainder):
      self._done = True
      self.close()
      raise StopIteration
    counts["examples"] += len(batch)
    counts["batches"] += 1
    self._counts, self._next_element = counts, self._next_element + consumed
    return self._collate(batch)

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position: elements consumed, running totals and the pipeline's identity."""
    return {"next_element": self._next_element, **self._counts, **self._fingerprint}

  def set_state(self, state: dict[str, Any]) -> None:
    """Moves to a saved position; the next batch is the one that followed it when it was saved.

    Raises:
      ValueError: when the state was saved by a pipeline over other data, seed or host layout.
    """
    for key, value in self._fingerprint.items():
      if state.get(key) != value:
        raise ValueError(f"iterator state was saved with {key}={state.get(key)!r}, this pipeline has "
                         f"{key}={value!r}")
    self.close()
    self._done = False
    self._next_element = int(state["next_element"])
    self._counts = {k: int(state[k]) for k in self._counts}

  def metrics(self) -> dict[str, int]:
    return {f"data/{k}": v for k, v in self._counts.items()} | {"data/epoch": self._next_element // self._epoch_len}

  def close(self) -> None:
    """Stops reader threads and worker processes (a later ``next`` reopens from the current position)."""
    if self._it is not None:
      close = getattr(self._it, "close", None)
      if close is not None:
        close()
      self._it = None


def _ensure_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside an absl app (tests, notebooks) use their defaults."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _build(source, encoder, collate_fn, tokenizer: TokenizerBase, config: PipelineConfig, kind: str,
           process_index, process_count) -> BatchIterator:
  process_index, process_count = _host(process_index, process_count)
  elements, epoch_len = element_dataset(source, encoder, config, process_index=process_index,
                                        process_count=process_count)
  collate = _Collate(collate_fn, config.batch_size, tuple(config.buckets), tokenizer.pad_id)
  fingerprint = {"kind": kind, "num_records": len(source), "seed": config.seed, "shuffle": config.shuffle,
                 "process_index": process_index, "process_count": process_count}
  return BatchIterator(elements, collate, epoch_len=epoch_len, config=config, fingerprint=fingerprint)


@dataclasses.dataclass(frozen=True)
class _Collate:
  fn: Callable
  batch_size: int
  buckets: tuple[int, ...]
  pad_id: int

  def __call__(self, elements: list[dict]) -> dict:
    return self.fn(elements, batch_size=self.batch_size, buckets=self.buckets, pad_id=self.pad_id)


def prompt_pipeline(source: Any, tokenizer: TokenizerBase, config: PipelineConfig, *,
                    process_index: int | None = None, process_count: int | None = None) -> BatchIterator:
  """Batches of left-padded prompts with their reference answers, for RL rollouts.

  Args:
    source: random-access records ``{"prompt", "answer", "index"}`` (a tfds data source of
      ``rlj_prompt_answer``, a ``synthetic.ArithmeticTask``, or any sequence of such dicts).
    tokenizer: encodes the rendered prompts; its ``pad_id`` fills the padding.
    config: see ``PipelineConfig``; ``buckets`` are prompt lengths.
    process_index, process_count: this host and the number of hosts (default: jax's).

  Returns:
    A ``BatchIterator`` of ``encoding.collate_prompts`` batches: ``prompt_tokens`` [B, P] int32 left-padded,
    ``prompt_mask`` [B, P], ``prompt``/``answer`` [B] str, ``index`` [B], ``truncated``/``valid`` [B].
  """
  encoder = encoding.PromptEncoder(tokenizer, max(config.buckets), template=config.template,
                                   add_bos=config.add_bos, overflow=config.overflow,
                                   prompt_format=config.prompt_format)
  return _build(source, encoder, encoding.collate_prompts, tokenizer, config, "prompts", process_index,
                process_count)


def preference_pipeline(source: Any, tokenizer: TokenizerBase, config: PipelineConfig, *,
                        process_index: int | None = None, process_count: int | None = None) -> BatchIterator:
  """Batches of (prompt + chosen, prompt + rejected) token sequences, for reward-model training.

  Args:
    source: random-access records ``{"prompt", "chosen", "rejected", "index"}`` (a tfds data source of
      ``rlj_preference``, a ``synthetic.PreferenceTask``, or any sequence of such dicts).
    tokenizer, config, process_index, process_count: as in ``prompt_pipeline``; ``buckets`` are full
      sequence lengths (prompt + response + EOS).

  Returns:
    A ``BatchIterator`` of ``encoding.collate_preferences`` batches: ``chosen_tokens``/``chosen_mask``/
    ``chosen_loss_mask`` and the same for ``rejected``, [B, L] int32, left-padded to one shared L.
  """
  encoder = encoding.PreferenceEncoder(tokenizer, max(config.buckets), template=config.template,
                                       add_bos=config.add_bos, overflow=config.overflow,
                                       prompt_format=config.prompt_format)
  return _build(source, encoder, encoding.collate_preferences, tokenizer, config, "preferences",
                process_index, process_count)
