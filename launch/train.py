r"""The main job: ``python -m launch.train --config configs/grpo_tpu.py[:args] [--config.key=value] [--workdir DIR]``.

Jobs (config key ``job``): ``rl`` (GRPO / GDPO / P3O / DNO, chosen by ``algo.name``), ``sft`` (cold start) and
``rm`` (reward model, see ``launch/rm.py``). The config is turned into plain dataclasses and partials here;
nothing below ``launch/`` reads it.

``--help`` lists the job configs, their variants and the model presets; ``--show`` prints the resolved config and
the pre-run checks without building anything (``launch/cli_help.py``). Every user mistake stops in one line naming
the file, key or path and the fix; ``RLJ_TRACEBACK=1`` keeps the Python traceback.

Sections: flags -> checks (before any compilation) -> mesh, tokenizer, data -> model and params -> job.
"""
from __future__ import annotations

if __name__ == "__main__":   # before JAX starts: its platforms (no TPU probe without TPUs), the CPU host allocator
  from launch import malloc_env
  malloc_env.reexec()

import datetime
import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

import jax

from launch import agent_setup, builders, checks, cli_help, distributed, relaunch
from rewards import combine
from rlj import (checkpoint, lifecycle, lora_policy, metrics_writer, preemption, rl_loop, sample_ahead, sft,
                 train_state)

_CONFIG = config_flags.DEFINE_config_file("config", None, "job config file (configs/*.py[:args])", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder; default: runs/<config>-<time>. An existing one resumes.")
_SHOW = flags.DEFINE_bool("show", False, "print the resolved config (YAML) and the pre-run checks, then exit; "
                          "nothing is built or compiled")

# Jobs this launcher runs; config key ``job`` must be one of them.
JOBS = ("rl", "sft", "rm")


# ------------------------------------------------------------------------------------------------------------
# Checks that run before anything is compiled
# ------------------------------------------------------------------------------------------------------------

def check_hardware(config) -> None:
  """Fails fast when the config expects an accelerator this machine does not have."""
  want, have = config.hardware, jax.default_backend()
  if want not in ("any", have):
    raise SystemExit(
        f"config key 'hardware' expects {want!r} devices (this config is a {want.upper()} job: "
        f"{config.hardware_note}) but JAX found {have!r} ({jax.device_count()} device(s)). "
        f"To run locally on CPU use the runlocal variant, e.g. "
        f"`python -m launch.train --config {config_path()}:runlocal`, or pass --config.hardware=any.")


def config_path() -> str:
  for i, a in enumerate(sys.argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1].split(":", 1)[0]
    if a == "--config" and i + 1 < len(sys.argv):
      return sys.argv[i + 1].split(":", 1)[0]
  return "configs/<job>.py"


def default_workdir() -> str:
  name = os.path.splitext(os.path.basename(config_path()))[0]
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  return os.path.join("runs", f"{name}-{stamp}")


# ------------------------------------------------------------------------------------------------------------
# Jobs
# ------------------------------------------------------------------------------------------------------------

class Stopped(Exception):
  """A stop request (SIGTERM / preemption) ended the job at a step boundary after a checkpoint."""


def run_sft_stage(config, env, state, workdir: str, stop):
  """Runs (or resumes) the SFT job in ``workdir``; returns the trained state.

  Raises:
    Stopped: when a stop request ended the stage early (after saving).
  """
  data = builders.prompt_iterator(config, env, split="train", batch_prompts=config.sft.batch_prompts,
                                  seed=config.seed + 1)
  with lifecycle.Lifecycle(os.path.join(workdir, "checkpoints"), builders.checkpoint_policy(config), job="sft",
                           total_steps=config.sft.steps, stop=stop, data=data, label="SFT stage",
                           meta=builders.checkpoint_meta(env.model_config)) as job:
    start, state, _, _ = job.resume(state)
    if start >= config.sft.steps:
      logging.info("SFT stage in %s already finished at step %d", workdir, start)
      return state
    writer = metrics_writer.MetricsWriter(workdir, total_steps=config.sft.steps, phase="SFT",
                                          enabled=jax.process_index() == 0, start_step=start)
    try:
      state, history = sft.run_sft(
          state, model=env.model, tx=env.sft_tx, mesh=env.mesh, rules=env.rules,
          state_shardings=env.state_shardings, tokenizer=env.tokenizer, train_iter=data,
          completion_len=agent_setup.completion_len(config), steps=config.sft.steps, writer=writer, start_step=start,
          eval_fn=builders.eval_fn(config, env), eval_every=config.sft.eval_every, job=job,
          max_consecutive_skips=config.train.max_consecutive_skips, seed=config.seed,
          skip_spans=agent_setup.skip_spans(config, env.tokenizer))
    finally:
      writer.close()
  metrics_writer.plot_curves(workdir)
  if history and history[-1]["step"] < config.sft.steps:
    raise Stopped()
  return state


def run_rl(config, env, workdir: str, stop) -> list[dict]:
  """Runs (or resumes) the RL job in ``workdir``; returns the logged records.

  With ``model.lora`` the RL state holds the adapters over the frozen base (the initial policy, or the SFT stage's
  weights), the base is the reference, and a resume checks that the base is the one the adapters were trained on.

  Raises:
    Stopped: when a stop request ended the job early (after saving).
  """
  params = env.params
  if builders.runs_sft_stage(config):
    params = run_sft_stage(config, env, env.state, os.path.join(workdir, "sft"), stop).params
  start_from = builders.rl_start(config, env, params, workdir)   # RL: a fresh optimizer (or fresh adapters)
  lora = start_from.lora
  # Lookahead: with train.sample_ahead a batch drawn for the next step is not saved as consumed (rlj.sample_ahead).
  data = sample_ahead.wrap(builders.prompt_iterator(config, env, split="train",
                                                    batch_prompts=config.train.batch_prompts, seed=config.seed))
  with lifecycle.Lifecycle(os.path.join(workdir, "checkpoints"), builders.checkpoint_policy(config), job="rl",
                           total_steps=config.train.total_steps, stop=stop, data=data, label="RL",
                           meta={**builders.checkpoint_meta(env.model_config), **start_from.meta}) as job:
    start, state, extra, meta = job.resume(start_from.state, {"ref_params": start_from.ref_params})
    if lora is not None and start:
      lora_policy.check_same_base(meta.get("lora_base"), lora.fingerprint,
                                  f"checkpoint step {start} in {job.directory}")
    writer = metrics_writer.MetricsWriter(workdir, total_steps=config.train.total_steps, phase="RL",
                                          enabled=jax.process_index() == 0, start_step=start)
    try:
      trainer = rl_loop.Trainer(builders.rl_components(config, env, data, writer, lora=lora,
                                                       state_shardings=start_from.state_shardings),
                                builders.loop_config(config, env.tokenizer.pad_id))
      trainer.load_host_state(meta.get("host"))
      trainer.start_eval = meta.get("start_eval")  # the step-0 eval of a resumed run (None in earlier checkpoints)
      _, _, history = trainer.run(state, extra["ref_params"], start_step=start, job=job)
    finally:
      writer.close()
  png = metrics_writer.plot_curves(workdir)
  logging.info("curves: %s", png)
  if history and history[-1]["step"] < config.train.total_steps:
    raise Stopped()
  summary = metrics_writer.eval_summary(history, trainer.start_eval, phase="RL")
  if summary and jax.process_index() == 0:
    metrics_writer.console_print(summary)
  return history


def run(config, workdir: str) -> list[dict]:
  """Runs the job a (locked) config describes in ``workdir``; returns the logged records of an RL job."""
  if config.job not in JOBS:
    raise SystemExit(f"config key 'job' is {config.job!r}; choose one of {JOBS}")
  check_hardware(config)
  checks.validate(config)
  checks.check_workdir(workdir)   # an unwritable run folder stops here, in one line
  os.makedirs(workdir, exist_ok=True)
  # A workdir with checkpoints resumes only the config it was started with (schedule and logging may change).
  relaunch.check(config, workdir, write=jax.process_index() == 0)
  print(f"workdir: {os.path.abspath(workdir)}", flush=True)
  try:
    history = []
    if config.job == "rm":
      from launch import rm  # reward-model job
      rm.run(config, workdir)
    else:
      env = builders.build_env(config, workdir)
      with preemption.StopRequest() as stop:
        if config.job == "sft":
          run_sft_stage(config, env, env.state, workdir, stop)
        else:
          history = run_rl(config, env, workdir, stop)
  except Stopped:
    _record_start(config, workdir)
    return []
  except (train_state.NonFiniteUpdates, combine.RewardError) as e:
    raise SystemExit(f"training stopped: {e}") from e
  except lora_policy.BaseMismatch as e:
    raise SystemExit(str(e)) from None
  except checkpoint.CheckpointMismatchError as e:  # a workdir without config.json, or another job's checkpoints
    raise SystemExit(f"{e}. To resume, relaunch with the config that wrote it; to start afresh, pass a new "
                     f"--workdir") from None
  _record_start(config, workdir)
  return history    # run_rl printed the RL stage's held-out summary


def _record_start(config, workdir: str) -> None:
  """A workdir whose checkpoints had no config record gets one once the job ran with them."""
  if jax.process_index() == 0 and not relaunch.recorded(workdir):
    relaunch.record_start(config, workdir)


def launch(config, workdir: str) -> list[dict]:
  """``run``, with the input errors that surface only while the job builds its data (a malformed line after the
  first one of a JSONL file, which the pre-run check does not read) stopped in one line naming the config key."""
  from rlj.data import jsonl
  try:
    return run(config, workdir)
  except jsonl.JsonlError as e:
    if cli_help.show_tracebacks():
      raise
    raise SystemExit(f"config key 'data.source_dir': {e}") from None


def main(argv) -> None:
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO
  config = _CONFIG.value
  if config is None:
    raise SystemExit("--config is required, e.g. --config configs/grpo_tpu.py:runlocal (python -m launch.train "
                     "--help lists the job configs)")
  workdir = _WORKDIR.value or default_workdir()
  try:
    if _SHOW.value:
      cli_help.show(config, spec=config_spec(sys.argv) or "", workdir=workdir, checks=[
          (f"hardware: the config asks for {config.get('hardware', 'any')!r}, JAX found {jax.default_backend()!r} "
           f"({jax.device_count()} device(s))", lambda: check_hardware(config)),
          (f"config checks of the {config.job!r} job (launch/checks.py)", lambda: checks.validate(config) or [
              "a reward-model job checks its data, tokenizer and model when it starts (launch/rm.py)"])])
      return
    distributed.initialize_from_flags()  # multi-host jobs: join before anything touches a device
    launch(config, workdir)
  except SystemExit as e:
    if isinstance(e.code, str) and cli_help.show_tracebacks():
      if e.__context__ is not None:   # the error the one-line message replaced (raised ``from None``)
        traceback.print_exception(e.__context__)
      traceback.print_exc()
    raise


# Flags that ask for help; absl's own print two flags and exit 1.
HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "-helpshort", "-?")


def config_spec(argv: list[str]) -> str | None:
  """The value of ``--config`` (``file.py[:variants]``) on a command line, or None."""
  for i, a in enumerate(argv):
    if a.startswith(("--config=", "-config=")):
      return a.split("=", 1)[1]
    if a in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, plus: ``--help`` prints the launcher's help (``launch.cli_help``) and exits 0; a missing
  config file, a bad variant, a ``--config.<key>`` the config does not have or a value that does not parse stop
  in one line naming it and the fix (exit status 1; ``RLJ_TRACEBACK=1`` keeps the traceback)."""
  args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
  if any(a in HELP_FLAGS for a in args):
    print(cli_help.usage())
    sys.exit(0)
  spec = config_spec(args)
  if spec is not None:
    cli_help.check_overrides(spec, args, config=cli_help.check_config_arg(spec))
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # a value that does not parse, an unknown flag
    if cli_help.show_tracebacks():
      raise
    lines = [line for line in str(e).splitlines() if line.strip()]
    msg = lines[-1] if "Traceback" in str(e) else " ".join(lines)   # config_flags puts a traceback in its text
    fix = ("give the key a value of the type it holds (--show prints every key and value)" if
           msg.startswith("flag --config.") else "python -m launch.train --help lists the flags")
    raise SystemExit(f"bad command line: {msg}; {fix}") from None
  except (KeyError, AttributeError) as e:  # an override of a key the (locked) config does not have
    if cli_help.show_tracebacks():
      raise
    msg = " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())
    raise SystemExit(f"bad --config.<key> override: {msg} (the config is locked: every key must exist; --show "
                     f"prints them)") from None


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
