"""Metrics sinks: the console, ``metrics.jsonl``, TensorBoard event files and a final PNG.

Console. Every line names its phase (``SFT``, ``RL``, ``RM``) and step, e.g.

  RL step 37/100 | eta 0m31s | reward 0.512 | clip_lo 0.000 | clip_hi 0.003 | entropy 0.812 | len 12.3 | ...

and a held-out evaluation prints its own line, ``eval @ RL step 20/100 | accuracy 0.512 | ...``. On a terminal
(``stream.isatty()``) the step line is one progress line per phase, rewritten in place (carriage return, cut
to the terminal's width) and finished with a newline when the phase ends, an eval line prints,
``console_print`` prints or a log record is emitted (through a handler of the root logger); piped, every logged
step is a plain line. Output written by other means (a bare write to stderr) while a progress line is open
lands after it on the same row.

The ETA is measured from the end of the first step this process logged: that step includes compilation, so
its line and any line before it say ``eta ?``; later ones extrapolate the mean time per step since then.

Only process 0 writes (``enabled=False`` elsewhere). ``metrics.jsonl`` holds one JSON object per logged step
with a ``step`` key; on resume, lines past the restored step are dropped so that no step appears twice.
TensorBoard gets the same scalars under the same keys.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Callable, Mapping, Sequence

import numpy as np

# Console columns of the step line, shown when the key was logged: (metrics key, short label, format).
# kl: the loss's KL to the reference, or a diagnostic estimate of it (rlj.rl_algos); no reference, no column.
# clip_frac: GSPO / P3O; clip_frac_low / clip_frac_high: GRPO / GDPO (PPO clip), CISPO (weight clip).
# entropy: the sampling distribution's per-token entropy, estimated from the rollout (rlj.rollout_stats).
# len / len_max / cut: completion length mean and max, fraction of rows cut at sampler.max_new_tokens.
# turns / tool_rate / tool_err (agent jobs): model turns, the fraction of trajectories that called a tool, tool
# errors per trajectory (rlj.agents.rollout.summary).
CONSOLE_COLUMNS = (
    ("reward/mean", "reward", "{:.3f}"),
    ("kl", "kl", "{:.4f}"),
    ("clip_frac", "clip", "{:.3f}"),
    ("clip_frac_low", "clip_lo", "{:.3f}"),
    ("clip_frac_high", "clip_hi", "{:.3f}"),
    ("entropy", "entropy", "{:.3f}"),
    ("response_len/mean", "len", "{:.1f}"),
    ("response_len/max", "len_max", "{:.0f}"),
    ("response_len/truncated_frac", "cut", "{:.2f}"),
    ("agent/turns", "turns", "{:.2f}"),
    ("agent/tool_call_rate", "tool_rate", "{:.2f}"),
    ("agent/tool_errors", "tool_err", "{:.2f}"),
    ("loss", "loss", "{:.4f}"),
    ("accuracy", "pair_acc", "{:.3f}"),       # pairs ranked right: the reward model's, DNO's implicit reward
    ("tokens_per_s", "tok/s", "{:.0f}"),
    ("pairs_per_s", "pairs/s", "{:.0f}"),
)

EVAL_PREFIX = "eval/"
_COUNT_KEYS = ("eval/examples", "eval/count")

# Panels of curves.png: (title, keys drawn in it). A panel is drawn when one of its keys was logged.
PLOT_PANELS = (
    ("reward/mean", ("reward/mean",)),
    ("held-out accuracy (eval/accuracy)", ("eval/accuracy",)),
    ("loss", ("loss",)),
    ("kl (to the reference)", ("kl",)),
    ("clip fraction", ("clip_frac", "clip_frac_low", "clip_frac_high")),
    ("entropy (sampler, per token)", ("entropy",)),
    ("completion length", ("response_len/mean", "response_len/max")),
    ("cut at max_new_tokens", ("response_len/truncated_frac",)),
)


def _scalar(v):
  v = np.asarray(v)
  return float(v) if v.size == 1 else None


def format_duration(seconds: float | None) -> str:
  if seconds is None or not math.isfinite(seconds) or seconds < 0:
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _isatty(stream) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):  # no isatty, or a closed stream
    return False


def _width(stream) -> int | None:
  """The terminal's width in columns, or None when ``stream`` is not a real terminal file."""
  try:
    return os.get_terminal_size(stream.fileno()).columns
  except (AttributeError, ValueError, OSError):
    return None


class Console:
  """One process's console: progress lines rewritten in place on a terminal, plain lines otherwise.

  ``stream``: where to write (None: ``sys.stdout`` at the time of each write).
  """

  def __init__(self, stream=None):
    self._stream = stream
    self._open = None   # the stream whose progress line has no newline yet

  @property
  def stream(self):
    return self._stream if self._stream is not None else sys.stdout

  def progress(self, text: str) -> None:
    """Shows ``text`` as the current progress line (in place on a terminal, a plain line when piped)."""
    s = self.stream
    if not _isatty(s):
      self.line(text)
      return
    if self._open is not None and self._open is not s:
      self.end_line()
    width = _width(s)
    if width:
      text = text[:max(width - 1, 1)]   # a wrapped line cannot be rewritten in place
    s.write("\r" + text + "\x1b[K")
    s.flush()
    self._open = s
    if self is CONSOLE:
      for handler in logging.getLogger().handlers:  # absl's among them: a log record ends the line first
        if not any(isinstance(f, _EndLineFilter) for f in handler.filters):
          handler.addFilter(_EndLineFilter())

  def line(self, text: str) -> None:
    """Prints ``text`` on its own line (after finishing an open progress line)."""
    self.end_line()
    s = self.stream
    s.write(text + "\n")
    s.flush()

  def end_line(self) -> None:
    """Finishes the open progress line, if any, with a newline."""
    if self._open is not None:
      stream, self._open = self._open, None
      stream.write("\n")
      stream.flush()


class _EndLineFilter(logging.Filter):
  """Lets every record through, after finishing the process console's open progress line."""

  def filter(self, record) -> bool:
    try:
      CONSOLE.end_line()
    except (RuntimeError, OSError, ValueError):  # e.g. a signal handler's record while stdout is mid-write
      pass
    return True


CONSOLE = Console()


def console_print(*args) -> None:
  """``print`` for messages during a run: finishes an open progress line first."""
  CONSOLE.line(" ".join(str(a) for a in args))


class EtaClock:
  """Time left from the rate since the end of the first step seen (which includes compilation).

  ``clock``: seconds, monotonic (injectable for tests).
  """

  def __init__(self, total_steps: int, clock: Callable[[], float] = time.monotonic):
    self.total_steps, self.clock = total_steps, clock
    self._first: tuple[float, int] | None = None

  def eta(self, step: int) -> float | None:
    """Seconds left after ``step`` (None until a step after the first has ended)."""
    now = self.clock()
    if self._first is None:
      self._first = (now, step)
      return None
    t_first, step_first = self._first
    if step <= step_first:
      return None
    return (now - t_first) / (step - step_first) * max(self.total_steps - step, 0)


def step_line(phase: str, step: int, total_steps: int, rec: Mapping[str, float], eta: float | None) -> str:
  """The console's step line: phase, step, ETA and the ``CONSOLE_COLUMNS`` present in ``rec``."""
  cols = [f"{phase} step {step}/{total_steps}", f"eta {format_duration(eta)}"]
  cols += [f"{label} {fmt.format(rec[key])}" for key, label, fmt in CONSOLE_COLUMNS if key in rec]
  return " | ".join(cols)


def eval_line(phase: str, step: int, total_steps: int, rec: Mapping[str, float]) -> str:
  """The console's eval line: every ``eval/*`` key of ``rec`` (accuracy first)."""
  keys = sorted((k for k in rec if k.startswith(EVAL_PREFIX)), key=lambda k: (k != "eval/accuracy", k))
  cols = [f"eval @ {phase} step {step}/{total_steps}"]
  cols += [f"{k[len(EVAL_PREFIX):]} {rec[k]:.0f}" if k in _COUNT_KEYS else f"{k[len(EVAL_PREFIX):]} {rec[k]:.3f}"
           for k in keys]
  return " | ".join(cols)


class MetricsWriter:
  """Writes scalar metrics to the console, ``<workdir>/metrics.jsonl`` and TensorBoard.

  Args:
    workdir: the run (or stage) folder.
    total_steps: the phase's last step.
    phase: names the phase on every console line ("SFT", "RL", "RM").
    enabled: False on processes other than 0 (nothing is written).
    tensorboard: also write TensorBoard event files.
    start_step: the resumed step (records past it are dropped).
    stream: the console's stream (None: the process's ``CONSOLE`` on ``sys.stdout``).
    clock: monotonic seconds for the ETA (injectable for tests).
  """

  def __init__(self, workdir: str, *, total_steps: int, phase: str = "RL", enabled: bool = True,
               tensorboard: bool = True, start_step: int = 0, stream=None,
               clock: Callable[[], float] = time.monotonic):
    self.workdir, self.total_steps, self.phase, self.enabled = workdir, total_steps, phase, enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.console = CONSOLE if stream is None else Console(stream)
    self._eta = EtaClock(total_steps, clock)
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
    """Logs one step; ``metrics`` values are scalars (numpy, jax or Python). ``eval/*`` keys print on their own
    eval line, the others on the phase's step line."""
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
    if any(k != "step" and not k.startswith(EVAL_PREFIX) for k in rec):
      self.console.progress(step_line(self.phase, step, self.total_steps, rec, self._eta.eta(step)))
    if any(k.startswith(EVAL_PREFIX) for k in rec):
      self.console.line(eval_line(self.phase, step, self.total_steps, rec))

  def close(self) -> None:
    """Ends the phase: finishes its progress line and closes the TensorBoard writer."""
    if self.enabled:
      self.console.end_line()
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def panels_present(records: Sequence[Mapping], panels=PLOT_PANELS) -> list[tuple[str, tuple[str, ...]]]:
  """The panels to draw: ``(title, keys)`` with only the keys some record has; a panel given as a bare key is
  titled by it. Panels with none of their keys are left out."""
  logged = set().union(*(r.keys() for r in records)) if records else set()
  out = []
  for panel in panels:
    title, keys = (panel, (panel,)) if isinstance(panel, str) else panel
    keys = tuple(k for k in keys if k in logged)
    if keys:
      out.append((title, keys))
  return out


def plot_curves(workdir: str, panels=PLOT_PANELS, filename: str = "curves.png") -> str | None:
  """Plots the curves of ``metrics.jsonl`` into ``<workdir>/<filename>``; returns its path.

  ``panels``: ``(title, keys)`` pairs or bare keys (``PLOT_PANELS``: reward, held-out accuracy, loss, KL, clip
  fractions, entropy, completion length, cut fraction); only keys present in the file are drawn. In a
  multi-process job only process 0 plots (it alone writes ``metrics.jsonl``); the others return None.
  """
  import jax  # only for the process index; the writer itself does not need jax
  if jax.process_index() != 0:
    return None
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  records = read_metrics(path)
  present = panels_present(records, panels)
  if not present:
    return None
  import matplotlib  # optional extra
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cols = min(3, len(present))
  rows = int(math.ceil(len(present) / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
  for ax, (title, keys) in zip(axes.flat, present):
    for key in keys:
      xs, ys = zip(*[(r["step"], r[key]) for r in records if key in r])
      ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=key)
    if len(keys) > 1:
      ax.legend(fontsize="small")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(present):]:
    ax.axis("off")
  fig.tight_layout()
  out = os.path.join(workdir, filename)
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def eval_summary(history: Sequence[Mapping], start_eval: Mapping | None = None, *, phase: str = "RL",
                 key: str = "eval/accuracy", what: str = "held-out greedy accuracy") -> str | None:
  """The end-of-run line comparing the phase's start eval (step 0, before any update) with its last eval.

  ``history``: this process's logged records (a resumed run lacks the steps before its checkpoint);
  ``start_eval``: the step-0 eval recorded in the checkpoint's meta (``Trainer.start_eval``), used when the
  history has no step-0 record. None when no eval after step 0 was logged in this run.
  """
  evals = [h for h in history if key in h]
  if not evals or evals[-1]["step"] == 0:
    return None
  last = evals[-1]
  start = evals[0][key] if evals[0]["step"] == 0 else (start_eval or {}).get(key)
  end = f"{last[key]:.3f} after {phase} step {last['step']}"
  if start is None:
    return f"{phase} {what}: {end} (the start-of-{phase} eval is not recorded in this run's checkpoints)"
  return f"{phase} {what}: {start:.3f} at the start of {phase} (step 0, before any {phase} update) -> {end}"
