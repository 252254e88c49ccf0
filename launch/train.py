r"""The main job: ``python -m launch.train --config configs/grpo_tpu.py[:args] [--config.key=value] [--workdir DIR]``.

Jobs (config key ``job``): ``rl`` (GRPO / GDPO / P3O / DNO, chosen by ``algo.name``), ``sft`` (cold start) and
``rm`` (reward model, see ``launch/rm.py``). The config is turned into plain dataclasses and partials here;
nothing below ``launch/`` reads it.

Sections: flags -> checks (before any compilation) -> mesh, tokenizer, data -> model and params -> job.
"""
from __future__ import annotations

if __name__ == "__main__":   # on CPU, re-run with the host-allocator settings before JAX starts
  from launch import malloc_env
  malloc_env.reexec()

import datetime
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import jax

from launch import builders, checks, distributed
from rewards import combine
from rlj import lifecycle, metrics_writer, preemption, rl_loop, sft, train_state

_CONFIG = config_flags.DEFINE_config_file("config", None, "job config file (configs/*.py[:args])", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder; default: runs/<config>-<time>. An existing one resumes.")

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
  job = lifecycle.Lifecycle(os.path.join(workdir, "checkpoints"), builders.checkpoint_policy(config), job="sft",
                            total_steps=config.sft.steps, stop=stop, data=data, label="SFT stage",
                            meta=builders.checkpoint_meta(env.model_config))
  start, state, _, _ = job.resume(state)
  if start >= config.sft.steps:
    logging.info("SFT stage in %s already finished at step %d", workdir, start)
    job.close()
    return state
  writer = metrics_writer.MetricsWriter(workdir, total_steps=config.sft.steps, enabled=jax.process_index() == 0,
                                        start_step=start)
  try:
    state, history = sft.run_sft(
        state, model=env.model, tx=env.sft_tx, mesh=env.mesh, rules=env.rules,
        state_shardings=env.state_shardings, tokenizer=env.tokenizer, train_iter=data,
        completion_len=config.sampler.max_new_tokens, steps=config.sft.steps, writer=writer, start_step=start,
        eval_fn=builders.eval_fn(config, env), eval_every=config.sft.eval_every, job=job,
        max_consecutive_skips=config.train.max_consecutive_skips, seed=config.seed)
  finally:
    job.close()
    writer.close()
  metrics_writer.plot_curves(workdir)
  if history and history[-1]["step"] < config.sft.steps:
    raise Stopped()
  return state


def run_rl(config, env, workdir: str, stop) -> list[dict]:
  """Runs (or resumes) the RL job in ``workdir``; returns the logged records.

  Raises:
    Stopped: when a stop request ended the job early (after saving).
  """
  state = env.state
  if builders.runs_sft_stage(config):
    sft_state = run_sft_stage(config, env, state, os.path.join(workdir, "sft"), stop)
    # RL starts from the SFT weights with a fresh optimizer.
    state = train_state.TrainState.create(sft_state.params, env.tx)
    state = jax.device_put(state, env.state_shardings)
  # A copy: the state's buffers are donated to the train step, the reference must outlive them.
  ref_params = jax.tree.map(jax.numpy.copy, state.params) if env.use_reference else None
  data = builders.prompt_iterator(config, env, split="train", batch_prompts=config.train.batch_prompts,
                                  seed=config.seed)
  job = lifecycle.Lifecycle(os.path.join(workdir, "checkpoints"), builders.checkpoint_policy(config), job="rl",
                            total_steps=config.train.total_steps, stop=stop, data=data, label="RL",
                            meta=builders.checkpoint_meta(env.model_config))
  start, state, extra, meta = job.resume(state, {"ref_params": ref_params})
  writer = metrics_writer.MetricsWriter(workdir, total_steps=config.train.total_steps,
                                        enabled=jax.process_index() == 0, start_step=start)
  trainer = rl_loop.Trainer(builders.rl_components(config, env, data, writer),
                            builders.loop_config(config, env.tokenizer.pad_id))
  trainer.load_host_state(meta.get("host"))
  try:
    _, _, history = trainer.run(state, extra["ref_params"], start_step=start, job=job)
  finally:
    job.close()
    writer.close()
  png = metrics_writer.plot_curves(workdir)
  logging.info("curves: %s", png)
  if history and history[-1]["step"] < config.train.total_steps:
    raise Stopped()
  return history


def run(config, workdir: str) -> list[dict]:
  """Runs the job a (locked) config describes in ``workdir``; returns the logged records of an RL job."""
  if config.job not in JOBS:
    raise SystemExit(f"config key 'job' is {config.job!r}; choose one of {JOBS}")
  check_hardware(config)
  checks.validate(config)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  print(f"workdir: {os.path.abspath(workdir)}", flush=True)
  try:
    if config.job == "rm":
      from launch import rm  # reward-model job
      rm.run(config, workdir)
      return []
    env = builders.build_env(config, workdir)
    with preemption.StopRequest() as stop:
      if config.job == "sft":
        run_sft_stage(config, env, env.state, workdir, stop)
        return []
      history = run_rl(config, env, workdir, stop)
  except Stopped:
    return []
  except (train_state.NonFiniteUpdates, combine.RewardError) as e:
    raise SystemExit(f"training stopped: {e}") from e
  evals = [h for h in history if "eval/accuracy" in h]
  if len(evals) > 1:
    print(f"held-out greedy accuracy: before {evals[0]['eval/accuracy']:.3f} -> after "
          f"{evals[-1]['eval/accuracy']:.3f}", flush=True)
  return history


def main(argv) -> None:
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO
  distributed.initialize_from_flags()  # multi-host jobs: join before anything touches a device
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config configs/grpo_tpu.py:runlocal")
  run(config, _WORKDIR.value or default_workdir())


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad ``--config.<key>`` override reported in one line (exit status 1)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # a value that does not parse, an unknown flag
    raise SystemExit(f"bad command line: {e}") from None
  except (KeyError, AttributeError) as e:  # an override of a key the (locked) config does not have
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    raise SystemExit(f"bad command-line override: {msg} (the config is locked: every key must exist; see the "
                     f"config file's get_config)") from None


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
