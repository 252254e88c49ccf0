"""Metrics sinks: a console line per step, ``metrics.jsonl``, TensorBoard event files and a final PNG.

Only process 0 writes (``enabled=False`` elsewhere). ``metrics.jsonl`` holds one JSON object per logged step
with a ``step`` key; on resume, lines past the restored step are dropped so that no step appears twice.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping

import numpy as np

# Console columns: (metrics key, short label, format).
CONSOLE_COLUMNS = (
    ("reward/mean", "reward", "{:.3f}"),
    ("kl", "kl", "{:.4f}"),
    ("clip_frac", "clip", "{:.3f}"),
    ("response_len/mean", "len", "{:.1f}"),
    ("loss", "loss", "{:.4f}"),
    ("eval/accuracy", "eval_acc", "{:.3f}"),
    ("tokens_per_s", "tok/s", "{:.0f}"),
)

PLOT_KEYS = ("reward/mean", "eval/accuracy", "kl", "clip_frac", "response_len/mean", "loss")


def _scalar(v):
  v = np.asarray(v)
  return float(v) if v.size == 1 else None


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds) or seconds < 0:
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsWriter:
  """Writes scalar metrics to the console, ``<workdir>/metrics.jsonl`` and TensorBoard."""

  def __init__(self, workdir: str, *, total_steps: int, enabled: bool = True, tensorboard: bool = True,
               start_step: int = 0, print_fn=print):
    self.workdir, self.total_steps, self.enabled, self.print_fn = workdir, total_steps, enabled, print_fn
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._t0, self._step0 = time.time(), start_step
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.truncate_after(start_step)
    if tensorboard:
      from tensorboardX import SummaryWriter  # optional extra; imported only where metrics are written
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def truncate_after(self, step: int) -> None:
    """Drops records with ``step > step`` (used on resume) and any partial last line."""
    if not os.path.exists(self.path):
      return
    kept = []
    with open(self.path) as f:
      for line in f:
        try:
          rec = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut by a crash
        if rec.get("step", 0) <= step:
          kept.append(json.dumps(rec))
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.write("".join(k + "\n" for k in kept))
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """Logs one step; ``metrics`` values are scalars (numpy, jax or Python)."""
    if not self.enabled:
      return
    rec = {"step": int(step)}
    for k, v in sorted(metrics.items()):
      s = _scalar(v)
      if s is not None:
        rec[k] = s
    with open(self.path, "a") as f:
      f.write(json.dumps(rec) + "\n")
    if self._tb is not None:
      for k, v in rec.items():
        if k != "step":
          self._tb.add_scalar(k, v, global_step=step)
      self._tb.flush()
    elapsed = time.time() - self._t0
    done = max(step - self._step0, 1)
    eta = elapsed / done * max(self.total_steps - step, 0)
    cols = [f"step {step}/{self.total_steps}"]
    for key, label, fmt in CONSOLE_COLUMNS:
      if key in rec:
        cols.append(f"{label} {fmt.format(rec[key])}")
    cols.append(f"eta {format_duration(eta)}")
    self.print_fn(" | ".join(cols), flush=True)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_curves(workdir: str, keys=PLOT_KEYS, filename: str = "curves.png") -> str | None:
  """Plots the main curves from ``metrics.jsonl`` into ``<workdir>/<filename>``; returns its path.

  In a multi-process job only process 0 plots (it alone writes ``metrics.jsonl``); the others return None.
  """
  import jax  # only for the process index; the writer itself does not need jax
  if jax.process_index() != 0:
    return None
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  records = read_metrics(path)
  present = [k for k in keys if any(k in r for r in records)]
  if not present:
    return None
  import matplotlib  # optional extra
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cols = min(3, len(present))
  rows = int(math.ceil(len(present) / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
  for ax, key in zip(axes.flat, present):
    pts = [(r["step"], r[key]) for r in records if key in r]
    xs, ys = zip(*pts)
    ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(present):]:
    ax.axis("off")
  fig.tight_layout()
  out = os.path.join(workdir, filename)
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out
