"""TFDS dataset builders that turn local JSONL files into array_record datasets (no TensorFlow needed).

Two record schemas cover the trainer's needs:

- ``rlj_prompt_answer``: ``{"prompt", "answer", "index"}``. Configs ``gsm8k`` (GSM8K's ``question`` /
  ``answer`` fields, answer ending in ``#### N``) and ``generic`` (``prompt`` / ``answer``); config ``messages``
  (rows with a ``messages`` conversation, see ``jsonl.prompt_answer_record``) adds a ``messages`` field, the
  prompt turns as a JSON string, and its ``prompt`` is the last user turn; config ``rubric`` (rows with a
  ``rubric`` of yes/no questions, see ``jsonl.rubric_record``) adds a ``rubric`` field, the items as a JSON string.
- ``rlj_preference``: ``{"prompt", "chosen", "rejected", "index"}``. Configs ``hh_rlhf`` (Anthropic HH-RLHF
  ``chosen`` / ``rejected`` transcripts, split into the shared prompt and the two responses, see
  ``split_transcripts``) and ``generic`` (``prompt`` / ``chosen`` / ``rejected``).

``index`` is the record's 0-based line number in its source file; records keep file order (shuffling
belongs to the input pipeline). A source directory holds one file per split named ``<split>.jsonl`` or
``<split>.jsonl.gz``. A built entry is keyed by a fingerprint of the source files' contents and the encoding
options (``source_fingerprint``), so editing a source and building again gives a new entry, never the stale
one. Building is atomic: tfds writes into an ``incomplete.*`` directory and renames it
when every record has been written; on error that directory is removed, and so are the (empty) dataset
directories this build created, so a failed build leaves the data dir as it found it. Build once, then
read with ``data_source`` (``tfds.data_source``); text fields come back as UTF-8 ``bytes``.

Custom configs (another JSONL layout, another dataset name) are ``JsonlConfig`` instances passed as
``config=``; read them back with ``data_source(..., config=that_config)``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import os
import shutil
import tempfile
from typing import Any

from absl import logging as absl_logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from rlj.data import fingerprint, jsonl

ASSISTANT_MARKER = "\n\nAssistant:"
VERSION = "1.0.0"


@dataclasses.dataclass(eq=False)
class JsonlConfig(tfds.core.BuilderConfig):
  """Maps a JSONL layout onto a record schema.

  Attributes:
    fields: record field -> JSONL key, e.g. ``{"prompt": "question", "answer": "answer"}``; for a
      preference set, either ``{"prompt", "chosen", "rejected"}`` or (``transcripts=True``) just
      ``{"chosen", "rejected"}``.
    transcripts: preference sets only: the chosen / rejected values are whole dialogue transcripts to be
      split at the last shared ``"\\n\\nAssistant:"`` turn.
    messages: prompt-answer sets only: rows carry a ``messages`` conversation (``fields`` unused).
    rubric: prompt-answer sets only: rows carry a ``rubric`` (``jsonl.rubric_record``; ``fields`` unused).
  """
  fields: dict[str, str] = dataclasses.field(default_factory=dict)
  transcripts: bool = False
  messages: bool = False
  rubric: bool = False


def split_transcripts(chosen: str, rejected: str, *, where: str = "") -> tuple[str, str, str]:
  """Splits two dialogue transcripts into (shared prompt, chosen response, rejected response).

  The split is at the last ``"\\n\\nAssistant:"`` marker (HH-RLHF's turn separator) that both transcripts
  share, i.e. that ends inside their common prefix; the prompt keeps the marker, each response is the
  rest, so ``prompt + chosen_response == chosen`` exactly (responses usually start with a space).

  Warning:
    In a few HH-RLHF rows (5 of 2312 in harmless-base test) a response itself contains an
    ``"\\n\\nAssistant:"``; splitting each transcript at its own last marker would then give two different
    prompts. Taking the last marker inside the common prefix keeps the prompt shared.

  Raises:
    ValueError: (prefixed with ``where``) when the transcripts share no assistant turn.
  """
  common = os.path.commonprefix([chosen, rejected])
  cut = common.rfind(ASSISTANT_MARKER)
  if cut < 0:
    raise ValueError(f"{where}: chosen and rejected share no {ASSISTANT_MARKER!r} turn")
  cut += len(ASSISTANT_MARKER)
  return chosen[:cut], chosen[cut:], rejected[cut:]


def _find_splits(source_dir: str) -> dict[str, str]:
  """``{split: path}`` for the ``<split>.jsonl[.gz]`` files of a source directory."""
  splits = {}
  for name in sorted(os.listdir(source_dir)):
    for ext in (".jsonl", ".jsonl.gz"):
      if name.endswith(ext):
        split = name[: -len(ext)]
        if split in splits:
          raise ValueError(f"{source_dir}: split {split!r} has two files ({splits[split]}, {name})")
        splits[split] = os.path.join(source_dir, name)
  if not splits:
    raise ValueError(f"{source_dir}: no <split>.jsonl or <split>.jsonl.gz files")
  return splits


class _JsonlBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared part: split discovery, record order, atomic build without a download dir in ``data_dir``."""
  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {str(VERSION): "First release."}
  BUILDER_CONFIG_CLASS = JsonlConfig
  TEXT_FIELDS: tuple[str, ...] = ()

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds' default probes the package with the optional `importlib_resources` module; the file suffices.
    return epath.Path(inspect.getfile(cls))

  def __init__(self, *, source_dir: str | None = None, **kwargs):
    self._source_dir = source_dir
    super().__init__(**kwargs)

  def _text_fields(self) -> tuple[str, ...]:
    c = self.builder_config
    return self.TEXT_FIELDS + (("messages",) if c.messages else ()) + (("rubric",) if c.rubric else ())

  def _info(self) -> tfds.core.DatasetInfo:
    features = {name: tfds.features.Text() for name in self._text_fields()}
    features["index"] = tfds.features.Scalar(dtype=np.int64, doc="0-based line number in the source file")
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                 features=tfds.features.FeaturesDict(features), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    if self._source_dir is None:
      raise ValueError(f"{self.name}/{self.builder_config.name}: pass source_dir= to build it")
    return {split: self._generate_examples(path) for split, path in _find_splits(self._source_dir).items()}

  def _generate_examples(self, path: str):
    if self.builder_config.messages:
      for record in jsonl.read_prompt_answer(path, layout="messages"):
        yield record["index"], record
      return
    if self.builder_config.rubric:
      for record in jsonl.read_rubric(path):
        yield record["index"], record
      return
    fields = self.builder_config.fields
    for line_no, raw in jsonl.read_jsonl(path, fields=tuple(fields.values())):
      record = self._convert({name: raw[key] for name, key in fields.items()}, where=f"{path}:{line_no}")
      yield line_no - 1, {**record, "index": line_no - 1}

  def _convert(self, record: dict[str, str], *, where: str) -> dict[str, str]:
    del where
    return record


class RljPromptAnswer(_JsonlBuilder):
  """Prompts with reference answers: ``{"prompt", "answer", "index"}``."""
  TEXT_FIELDS = ("prompt", "answer")
  BUILDER_CONFIGS = [
      JsonlConfig(name="gsm8k", description="GSM8K question/answer; answers end in '#### N'.",
                  fields={"prompt": "question", "answer": "answer"}),
      JsonlConfig(name="generic", description="JSONL with 'prompt' and 'answer' string fields.",
                  fields={"prompt": "prompt", "answer": "answer"}),
      JsonlConfig(name="messages", description="JSONL with a 'messages' conversation (role/content) whose last "
                  "assistant turn, or an 'answer' field, is the answer.", messages=True),
      JsonlConfig(name="rubric", description="JSONL with a 'prompt', its 'rubric' (a list of yes/no questions, "
                  "optionally weighted) and an optional 'answer'.", rubric=True),
  ]


class RljPreference(_JsonlBuilder):
  """Preference pairs sharing a prompt: ``{"prompt", "chosen", "rejected", "index"}``."""
  TEXT_FIELDS = ("prompt", "chosen", "rejected")
  BUILDER_CONFIGS = [
      JsonlConfig(name="hh_rlhf", description="Anthropic HH-RLHF transcripts, split at the last shared "
                  "assistant turn.", fields={"chosen": "chosen", "rejected": "rejected"}, transcripts=True),
      JsonlConfig(name="generic", description="JSONL with 'prompt', 'chosen' and 'rejected' string fields.",
                  fields={"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}),
  ]

  def _convert(self, record: dict[str, str], *, where: str) -> dict[str, str]:
    if not self.builder_config.transcripts:
      return record
    prompt, chosen, rejected = split_transcripts(record["chosen"], record["rejected"], where=where)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


BUILDERS = {"prompt_answer": RljPromptAnswer, "preference": RljPreference}


def _pick_builder(kind: str) -> type[_JsonlBuilder]:
  if kind not in BUILDERS:
    raise ValueError(f"unknown dataset kind {kind!r}; choose one of {sorted(BUILDERS)}")
  return BUILDERS[kind]


def source_files(source_dir: str) -> list[str]:
  """The ``<split>.jsonl[.gz]`` files of a source directory (what a build reads, and what is fingerprinted)."""
  return list(_find_splits(os.fspath(source_dir)).values())


def _base_config(kind: str, config: str | JsonlConfig) -> JsonlConfig:
  if isinstance(config, JsonlConfig):
    return config
  by_name = {c.name: c for c in _pick_builder(kind).BUILDER_CONFIGS}
  if config not in by_name:
    raise ValueError(f"unknown {kind} dataset config {config!r}; choose one of {sorted(by_name)}")
  return by_name[config]


def source_fingerprint(kind: str, config: str | JsonlConfig, source_dir: str) -> dict:
  """``rlj.data.fingerprint`` of a source directory's split files and the encoding options (builder kind,
  config, field mapping, schema version): what a built entry is keyed by."""
  base = _base_config(kind, config)
  options = {"kind": kind, "config": base.name, "fields": dict(base.fields), "transcripts": base.transcripts,
             "messages": base.messages, "version": VERSION, **({"rubric": True} if base.rubric else {})}
  return fingerprint.fingerprint(source_files(source_dir), options)


@contextlib.contextmanager
def _quiet():
  """tfds announces every config that is not one of the class's own ("Using custom data configuration") and draws
  progress bars; an entry keyed by its fingerprint is such a config, and a trainer's console is not the place."""
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  tfds.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(io.StringIO()):   # and prints "Downloading and preparing dataset ..."
      yield
  finally:
    absl_logging.set_verbosity(verbosity)
    tfds.display_progress_bar(True)


def _keyed_config(kind: str, config: str | JsonlConfig, digest: str) -> JsonlConfig:
  """The config under the name of its cache entry: ``<config name>-<first 16 hex digits of the digest>``."""
  base = _base_config(kind, config)
  return dataclasses.replace(base, name=f"{base.name}-{digest[:16]}")


def build(kind: str, config: str | JsonlConfig, *, source_dir: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """Builds one dataset from ``source_dir`` into ``data_dir`` (array_record), unless an entry built from the
  same file contents with the same options is there already.

  Args:
    kind: "prompt_answer" | "preference".
    config: a config name of that builder ("gsm8k", "hh_rlhf", "generic") or a ``JsonlConfig``.
    source_dir: directory with ``<split>.jsonl[.gz]`` files.
    data_dir: tfds data dir; the dataset lands in ``data_dir/<builder>/<config>-<fingerprint>/<version>``, keyed
      by ``source_fingerprint``: an edited source builds a new entry beside the old one.

  Returns:
    The builder (``builder.info.splits[split].num_examples`` holds the record counts; ``as_data_source(split)``
    reads a split).

  Raises:
    jsonl.JsonlError: naming file and line (and field) of a bad record; ``data_dir`` is left untouched.
  """
  data_dir = os.fspath(data_dir)
  digest = source_fingerprint(kind, config, source_dir)["digest"]
  with _quiet():
    builder = _pick_builder(kind)(config=_keyed_config(kind, config, digest), source_dir=os.fspath(source_dir),
                                  data_dir=data_dir, file_format="array_record")
  own_dir = os.path.join(data_dir, builder.name)  # tfds writes only below data_dir/<builder name>
  before = _snapshot(data_dir)
  download_dir = tempfile.mkdtemp(prefix="rlj_tfds_download_")
  try:
    with _quiet():
      builder.download_and_prepare(download_dir=download_dir)
  except BaseException:
    _remove_new_paths(own_dir, before)
    for path in (own_dir, data_dir):  # created by this build and now empty
      if path not in before and os.path.isdir(path) and not os.listdir(path):
        os.rmdir(path)
    raise
  finally:
    shutil.rmtree(download_dir, ignore_errors=True)
  return builder


def built_entries(kind: str, config: str | JsonlConfig, *, data_dir: str) -> list[str]:
  """Names of the built entries of ``config`` in ``data_dir`` (one per distinct source fingerprint)."""
  base = _base_config(kind, config)
  root = os.path.join(os.fspath(data_dir), _pick_builder(kind).name)
  if not os.path.isdir(root):
    return []
  return sorted(n for n in os.listdir(root) if n.startswith(base.name + "-")
                and os.path.isfile(os.path.join(root, n, VERSION, "dataset_info.json")))


def data_source(kind: str, config: str | JsonlConfig, *, data_dir: str, split: str,
                source_dir: str | None = None) -> Any:
  """Random-access reader (``len``, ``[i]``) over a built split; text fields come back as ``bytes``.

  With ``source_dir``, the entry built from its files as they are now; without, the one entry of ``config`` in
  ``data_dir`` (a data dir prepared elsewhere).

  Raises:
    FileNotFoundError: no such entry, or (without ``source_dir``) several, naming them.
  """
  if source_dir is not None:
    name = _keyed_config(kind, config, source_fingerprint(kind, config, source_dir)["digest"]).name
  else:
    entries = built_entries(kind, config, data_dir=data_dir)
    if len(entries) != 1:
      where = os.path.join(os.fspath(data_dir), _pick_builder(kind).name)
      found = f"several ({', '.join(entries)})" if entries else "no built dataset"
      raise FileNotFoundError(f"{where} holds {found} for {_base_config(kind, config).name!r}; pass the source "
                              f"folder (data.source_dir) to pick or build the entry of its files")
    name = entries[0]
  base = _base_config(kind, config)
  with _quiet():
    builder = _pick_builder(kind)(config=dataclasses.replace(base, name=name), data_dir=os.fspath(data_dir),
                                  file_format="array_record")
  if not builder.is_prepared():
    raise FileNotFoundError(f"{builder.data_path} holds no built dataset; build it from data.source_dir first")
  return builder.as_data_source(split=split)


def _snapshot(root: str) -> set[str]:
  """Every file and directory under ``root`` (``root`` included when it exists)."""
  paths = set()
  for dirpath, _, filenames in os.walk(root):
    paths.add(dirpath)
    paths.update(os.path.join(dirpath, name) for name in filenames)
  return paths


def _remove_new_paths(root: str, before: set[str]) -> None:
  """Removes what appeared under ``root`` since ``before`` was taken: files, then directories deepest first."""
  new = _snapshot(root) - before
  for path in sorted(new, key=len, reverse=True):
    if os.path.isdir(path):
      if not os.listdir(path):
        os.rmdir(path)
    else:
      os.remove(path)
