"""Content fingerprints of the files a run reads (data sources, tokenizer files).

``fingerprint(paths)`` records each file's name, size and SHA-256 and one digest over them (and over any
``options`` that change what is built from the files, such as a dataset's field mapping). Two uses:

- a built dataset's cache entry is keyed by the digest of its source files and encoding options
  (``rlj.data.tfds_builders.build``), so an edited source builds a new entry instead of reusing a stale one;
- a workdir records the fingerprints of its inputs when it starts (``launch.relaunch``), and a resume whose
  inputs changed stops: the saved data-iterator position and tokenizer would no longer mean what they meant.

Hashing reads every byte once (GSM8K's 4 MB in milliseconds; HH-RLHF's ~40 MB compressed in well under a second).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable, Mapping

_CHUNK = 1 << 20


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(_CHUNK), b""):
      h.update(block)
  return h.hexdigest()


def fingerprint(paths: Iterable[str], options: Mapping[str, Any] | None = None) -> dict:
  """``{"files": {basename: {"size", "sha256"}}, "options": ..., "digest": hex}`` of existing files ``paths``.

  The digest covers basenames, sizes, contents and ``options`` (JSON-serialisable), not the folder the files are
  in: a copy of the same files elsewhere has the same fingerprint.
  """
  files = {}
  for path in sorted(paths, key=os.path.basename):
    files[os.path.basename(path)] = {"size": os.path.getsize(path), "sha256": file_sha256(path)}
  record = {"files": files, "options": dict(options or {})}
  digest = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()
  return {**record, "digest": digest}


def describe_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
  """What differs between two fingerprints, e.g. ``train.jsonl: 4166206 -> 1212 bytes, content differs``."""
  parts = []
  old_files, new_files = dict(old.get("files", {})), dict(new.get("files", {}))
  for name in sorted(set(old_files) | set(new_files)):
    a, b = old_files.get(name), new_files.get(name)
    if a == b:
      continue
    if a is None:
      parts.append(f"{name}: new file")
    elif b is None:
      parts.append(f"{name}: removed")
    elif a["size"] != b["size"]:
      parts.append(f"{name}: {a['size']} -> {b['size']} bytes, content differs")
    else:
      parts.append(f"{name}: same size, content differs")
  if dict(old.get("options", {})) != dict(new.get("options", {})):
    parts.append(f"options {old.get('options')} -> {new.get('options')}")
  return "; ".join(parts) or "no difference"
