"""The console lines (phase, columns, ETA, terminal vs pipe), the curves' panels and the end-of-run summary."""
import io
import logging
import os
import sys

from rlj import metrics_writer as mw


class FakeStream(io.StringIO):
  def __init__(self, tty: bool):
    super().__init__()
    self.tty = tty

  def isatty(self):
    return self.tty


class FakeClock:
  def __init__(self, t: float = 0.0):
    self.t = t

  def __call__(self):
    return self.t


def _writer(tmp_path, stream, *, phase="RL", total=10, clock=None, start=0):
  return mw.MetricsWriter(str(tmp_path), total_steps=total, phase=phase, tensorboard=False, stream=stream,
                          clock=clock or FakeClock(), start_step=start)


def test_lines_name_their_phase_and_eval_gets_its_own_line(tmp_path):
  out = FakeStream(tty=False)
  w = _writer(tmp_path / "sft", out, phase="SFT", total=100)
  w.write(5, {"loss": 0.5, "tokens_per_s": 1000.0})
  w.write(50, {"loss": 0.25, "eval/accuracy": 0.426, "eval/examples": 256.0})
  w.close()
  lines = out.getvalue().splitlines()
  assert lines[0].startswith("SFT step 5/100 | eta ? | loss 0.5000 | tok/s 1000")
  assert lines[1].startswith("SFT step 50/100 |") and "eval/" not in lines[1] and "accuracy" not in lines[1]
  assert lines[2] == "eval @ SFT step 50/100 | accuracy 0.426 | examples 256"
  assert len(lines) == 3


def test_eta_excludes_the_first_step(tmp_path):
  clock = FakeClock(100.0)          # the first step ends after 100 s of compilation
  out = FakeStream(tty=False)
  w = _writer(tmp_path, out, total=10, clock=clock, start=2)   # a resumed run: steps 3..10
  w.write(3, {"loss": 1.0})
  for step in (4, 5):               # then 2 s per step
    clock.t += 2.0
    w.write(step, {"loss": 1.0})
  etas = [line.split(" | ")[1] for line in out.getvalue().splitlines()]
  assert etas == ["eta ?", "eta 0m12s", "eta 0m10s"]   # (10 - 4) * 2 s, (10 - 5) * 2 s


def test_terminal_rewrites_one_progress_line_and_a_pipe_gets_plain_lines(tmp_path):
  tty = FakeStream(tty=True)
  w = _writer(tmp_path / "a", tty)
  w.write(1, {"reward/mean": 0.1})
  w.write(2, {"reward/mean": 0.2, "eval/accuracy": 0.5})
  w.write(3, {"reward/mean": 0.3})
  w.close()
  text = tty.getvalue()
  assert text.count("\r") == 3
  # the progress line is finished before the eval line and when the phase ends; nothing else breaks lines
  rows = text.split("\n")
  assert rows[0].endswith("reward 0.200\x1b[K") and "RL step 1/10" in rows[0]
  assert rows[1].startswith("eval @ RL step 2/10")
  assert rows[2].startswith("\rRL step 3/10") and rows[3] == ""

  piped = FakeStream(tty=False)
  w = _writer(tmp_path / "b", piped)
  w.write(1, {"reward/mean": 0.1})
  w.write(2, {"reward/mean": 0.2})
  w.close()
  assert "\r" not in piped.getvalue() and "\x1b" not in piped.getvalue()
  assert [line.split(" | ")[0] for line in piped.getvalue().splitlines()] == ["RL step 1/10", "RL step 2/10"]


def test_a_message_or_a_log_record_finishes_the_progress_line_first(tmp_path, monkeypatch):
  out = FakeStream(tty=True)
  monkeypatch.setattr(sys, "stdout", out)
  log = io.StringIO()
  handler = logging.StreamHandler(log)
  logging.getLogger().addHandler(handler)
  try:
    w = _writer(tmp_path, None)                         # the process console, on sys.stdout
    w.write(1, {"loss": 1.0})
    mw.console_print("stopped at step 1")
    assert out.getvalue().endswith("\x1b[K\nstopped at step 1\n")
    w.write(2, {"loss": 1.0})
    logging.getLogger("somewhere").warning("a warning")
    assert out.getvalue().endswith("\x1b[K\n") and log.getvalue() == "a warning\n"
    w.close()
    assert out.getvalue().endswith("\x1b[K\n")           # nothing was open: no second newline
  finally:
    logging.getLogger().removeHandler(handler)
    mw.CONSOLE.end_line()


def test_clip_columns_follow_what_the_loss_logs():
  grpo = mw.step_line("RL", 1, 2, {"clip_frac_low": 0.01, "clip_frac_high": 0.02, "entropy": 0.7}, None)
  assert "clip_lo 0.010 | clip_hi 0.020" in grpo and "clip " not in grpo and "entropy 0.700" in grpo
  gspo = mw.step_line("RL", 1, 2, {"clip_frac": 0.1}, None)
  assert "clip 0.100" in gspo and "clip_lo" not in gspo
  lengths = mw.step_line("RL", 1, 2, {"response_len/mean": 12.25, "response_len/max": 16.0,
                                      "response_len/truncated_frac": 0.125, "kl": 0.0012}, 30.0)
  assert "kl 0.0012" in lengths and "len 12.2 | len_max 16 | cut 0.12" in lengths and "eta 0m30s" in lengths


def test_curves_draw_only_logged_keys_with_the_new_panels(tmp_path):
  records = [{"step": 0, "eval/accuracy": 0.4},
             {"step": 1, "reward/mean": 0.1, "loss": 0.2, "clip_frac_low": 0.0, "clip_frac_high": 0.01,
              "entropy": 0.9, "response_len/mean": 10.0, "response_len/max": 16.0,
              "response_len/truncated_frac": 0.1}]
  chosen = dict(mw.panels_present(records))
  assert chosen["clip fraction"] == ("clip_frac_low", "clip_frac_high")
  assert chosen["completion length"] == ("response_len/mean", "response_len/max")
  assert chosen["entropy (sampler, per token)"] == ("entropy",)
  assert chosen["cut at max_new_tokens"] == ("response_len/truncated_frac",)
  assert "kl (to the reference)" not in chosen          # no reference: no KL panel
  assert len(chosen) == 7
  assert mw.panels_present(records, ("loss", "margin")) == [("loss", ("loss",))]   # bare keys (the RM job)

  w = _writer(tmp_path, FakeStream(tty=False))
  for r in records:
    w.write(r["step"], {k: v for k, v in r.items() if k != "step"})
  w.close()
  assert mw.plot_curves(str(tmp_path)) == os.path.join(str(tmp_path), "curves.png")


def test_summary_compares_the_recorded_start_eval_after_a_resume():
  fresh = [{"step": 0, "eval/accuracy": 0.426}, {"step": 1, "loss": 1.0}, {"step": 60, "eval/accuracy": 0.488},
           {"step": 100, "eval/accuracy": 0.609}]
  line = mw.eval_summary(fresh, None)
  assert line == ("RL held-out greedy accuracy: 0.426 at the start of RL (step 0, before any RL update) -> "
                  "0.609 after RL step 100")
  resumed = fresh[2:]                                   # relaunched from the checkpoint of step 60
  assert mw.eval_summary(resumed, {"eval/accuracy": 0.426}) == line
  assert "0.488" not in mw.eval_summary(resumed, {"eval/accuracy": 0.426})
  older = mw.eval_summary(resumed, None)               # a checkpoint written before the start eval was recorded
  assert older.startswith("RL held-out greedy accuracy: 0.609 after RL step 100") and "not recorded" in older
  assert mw.eval_summary(fresh[:2], None) is None       # only the start eval: nothing to compare
  assert mw.eval_summary([], {"eval/accuracy": 0.4}) is None   # a finished run relaunched
