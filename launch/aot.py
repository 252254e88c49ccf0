r"""Ahead-of-time proof that an RL config fits a TPU slice, compiled on a machine without TPUs.

  python -m launch.aot --config configs/grpo_tpu.py                       # the config's slice (v5p-32)
  python -m launch.aot --config configs/grpo_tpu.py:model=llama-3.1-8b,slice=v5p-64
  python -m launch.aot --config configs/grpo_tpu.py --topology v5litepod-16 --config.train.num_microbatches=8

For the slice (``--topology``, default: the config's ``slice``) libtpu describes compile-only devices
(``launch/aot_tools/tpu_topology.py``); the config's mesh (-1 resolved against the slice's chip count) and sharding rules
lay the model over them, with abstract parameters (``jax.eval_shape``: nothing is allocated). Then the real TPU
compiler compiles, at the config's shapes:

- the optimizer step from the program factory the trainer uses (``rlj.programs.rl_programs``: same partials,
  output shardings, donated state, micro-batches) on one minibatch built by the algorithm row's batcher,
- the rollout's teacher-forced log-prob pass (reference and recomputed old log-probs) on the whole rollout,
- the sampler's program (prefill + decode loop, ``rlj.sampler``) on the whole rollout, and its prefill and one
  decode step alone for their costs.

With ``model.lora.rank > 0`` it compiles the LoRA run instead (``launch/aot_tools/lora_weights.py``): the step on
the adapters' train state with the frozen base as its separate argument, the log-prob pass on the base's shapes,
the sampler on the merged copy, and the merge program itself.

It prints each phase's per-chip HBM (params, optimizer state, reference params, sampler params, KV cache,
activations / temporaries; with LoRA the base, the adapters and the merged copies) against the chip's HBM, the
FLOPs and the compiler's time estimate per program and per RL step, and exits non-zero naming the biggest
consumer and a fix when the config does not fit.
Batch sizes: ``train.batch_prompts`` is per host (as the data pipeline reads it), so a step's rollout has
``batch_prompts x hosts x num_generations`` rows. Needs ``pip install "jax[tpu]"`` (libtpu); the rest of the
project does not.
"""
from __future__ import annotations

import dataclasses
import functools
import sys

from absl import app, flags
from ml_collections import config_flags

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from launch import builders
from launch.aot_tools import flops, hbm, lora_weights, shapes, tpu_topology
from launch.aot_tools import suggest as suggest_lib
from models import attention_kernels
from models.transformer import Transformer
from rlj import packing, programs, rl_algos, sharding, train_state
from rlj.buckets import pick_bucket
from rlj.sampler import Sampler



def define_flags() -> None:
  """The command line's flags (defined only when run as a program: ``launch.train`` owns ``--config``)."""
  config_flags.DEFINE_config_file("config", None, "RL job config (configs/*.py[:args])", lock_config=True)
  flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p-64, v5litepod-16, v4:2x2x4; default: the config's slice")
  flags.DEFINE_float("hbm_gib", None, "HBM per chip in GiB instead of the chip's (v4 32, v5e 16, v5p 95, v6e 32)")
  flags.DEFINE_bool("suggest", False, "when the config does not fit, search the micro-batch, remat, logits-chunk and "
                    "sampling-chunk settings that make it fit (recompiles the phases over HBM) and report them")


# ------------------------------------------------------------------------------------------------------------
# Compilation
# ------------------------------------------------------------------------------------------------------------

def compile_all(config, devices, *, log=print, only=None) -> tuple[dict, list, dict]:
  """Compiles every program of one RL step for ``devices``; returns (phases, cost programs, summary).

  ``only``: compile just these phases ("sampling", "rollout log-probs", "train step") and skip the FLOP counts
  (``launch/aot_tools/suggest.py`` recompiles the phases that do not fit under other settings).

  With ``model.lora.rank > 0`` the train state holds the adapters and their moments, the frozen base (also the
  reference) is the step's separate argument, and the sampler reads a merged copy (``aot_tools/lora_weights.py``).
  """
  lora_cfg = lora_weights.check(config)   # a LoRA config launch.train would refuse stops here, in one line
  hosts = tpu_topology.num_hosts(devices)
  names, sizes = shapes.check_mesh(config, len(devices), hosts)
  mesh = sharding.make_mesh(list(zip(names, sizes)), devices=devices)
  rules = [tuple(r) for r in config.sharding_rules]
  mc = builders.model_config(config, config.tokenizer.vocab_size)
  # "auto" attention is the target's kernel and the layer scan the target's loop (this process traces on CPU,
  # for TPU devices).
  mc = dataclasses.replace(mc, attention=attention_kernels.resolve(
      mc.attention, devices[0].platform, dtype=mc.jnp_dtype, logit_cap=mc.attn_logit_softcap, head_dim=mc.head_dim),
      scan_unroll=mc.scan_unroll or 1)
  model = Transformer(mc)
  p_len, t_len, g = max(config.data.buckets), config.sampler.max_new_tokens, config.sampler.num_generations
  prompts = config.train.batch_prompts * hosts
  rows = prompts * g
  replicated = jax.sharding.NamedSharding(mesh, jax.P())

  # Abstract params and train state in their shardings (as builders.build_env lays them out).
  dummy = jnp.zeros((1, 8), jnp.int32)
  boxed = jax.eval_shape(lambda r: model.init(r, dummy, dummy, jnp.ones_like(dummy))["params"], jax.random.key(0))
  param_sh = sharding.tree_shardings(sharding.logical_specs(boxed), nn.unbox(boxed), mesh, rules)
  params = shapes.with_shardings(nn.unbox(boxed), param_sh)
  tx = train_state.make_optimizer(train_state.OptimConfig(**config.optim.to_dict()))
  lc = builders.loop_config(config)
  if lora_cfg is None:
    lw, frozen = None, ()
    state_sh = train_state.state_shardings(param_sh, tx, nn.unbox(boxed), mesh)
    state = shapes.with_shardings(jax.eval_shape(lambda p: train_state.TrainState.create(p, tx), params), state_sh)
    sizes_b = {"params": hbm.shard_bytes(state.params), "optimizer state": hbm.shard_bytes(state.opt_state)}
    what = ""
  else:   # as builders.lora_state lays them out: the TrainState over the adapters, the base apart
    lw = lora_weights.abstract(lora_cfg, config.model.lora.get("base_dtype", ""), mc, params, tx, mesh, rules)
    state, state_sh, frozen = lw.state, lw.state_shardings, (lw.base,)
    sizes_b = {lora_weights.BASE: hbm.shard_bytes(lw.base), lora_weights.ADAPTERS: hbm.shard_bytes(state.params),
               "optimizer state": hbm.shard_bytes(state.opt_state)}
    what = (f"LoRA rank {lora_cfg.rank} (alpha {lora_cfg.alpha:g}) on {','.join(lora_cfg.targets)}, "
            f"base in {lw.base_dtype.name}, {sum(x.size for x in jax.tree.leaves(state.params)):,} adapter params")
  key_dtype = jax.eval_shape(lambda: jax.random.key(0)).dtype
  rng, rng_free = jax.ShapeDtypeStruct((), key_dtype, sharding=replicated), jax.ShapeDtypeStruct((), key_dtype)

  # The train step's input shardings are given (donated state), so its compiled layout holds these bytes.
  # With LoRA the frozen base is the reference: no copy.
  ref_bytes = sizes_b["params"] if lc.use_reference and lw is None else 0
  log(f"model {config.model.preset}: {mc.num_params():,} params ({mc.param_dtype}), mesh "
      f"{dict(zip(names, sizes))} on {len(devices)} chips / {hosts} hosts ({devices[0].device_kind})"
      + (f"; {what}" if what else ""))

  # The trainer's programs, from the same factory (rlj.programs) the Trainer uses.
  progs = programs.rl_programs(model, tx, lc.program_settings(), mesh=mesh, rules=rules, state_shardings=state_sh,
                               combine=None if lw is None else lw.policy.step_params)
  step_fn = progs.step
  arrays = shapes.example_rollout(config, rows, p_len)
  if lc.old_logp_source == "current":  # the Trainer's on-policy batch has no old log-probs
    del arrays["old_logp"]
  if lc.mismatch_correction != "none":
    arrays["is_weight"] = np.ones_like(arrays["mask"])
  batch = shapes.abstract_batch(shapes.example_minibatch(config, lc, arrays, prompts), mesh, rules)
  updates = lc.num_epochs * lc.num_minibatches

  # Sampler: its own dtype copy of the params (sync_weights; with LoRA always a merged copy), the KV cache for
  # the whole rollout.
  s = config.sampler
  sampler_dtype = jnp.dtype(s.dtype)
  if lw is None:
    sampler_params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, sampler_dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype,
                                       sharding=x.sharding), params)
    sampler_params_bytes = hbm.shard_bytes(sampler_params) if sampler_dtype != mc.jnp_param_dtype else 0
  else:
    sampler_params = lw.merged(sampler_dtype)
    sampler_params_bytes = hbm.shard_bytes(sampler_params)
  sc = builders.sampler_config(config, **shapes.special_ids(config, mc.vocab_size))
  sampler = programs.sampler(model, sc, mesh=mesh, param_shardings=param_sh, rules=rules)
  chunks = int(s.get("chunks", 1))   # the rollout is sampled in this many sequential calls (rlj/sampler_chunks.py)
  bb = pick_bucket(prompts // chunks, sc.batch_buckets, "batch")
  cache_abs = jax.eval_shape(functools.partial(sampler.empty_cache, bb * g, p_len))   # p_len + t_len slots
  cache = shapes.with_shardings(cache_abs, sampler.cache_shardings(cache_abs))
  prompt = jax.ShapeDtypeStruct((bb, p_len), jnp.int32)    # placed by the program's own in_shardings
  cache_bytes = hbm.shard_bytes(cache)
  kept_cache = {"KV cache": cache_bytes} if s.keep_cache else {}

  tokens = jax.ShapeDtypeStruct((rows, p_len + t_len), jnp.int32, sharding=sharding.batch_sharding(mesh, 2, rules))
  packed = shapes.abstract_batch(packing.worst_case(rows, p_len + t_len, t_len), mesh, rules) if lc.packing else None
  recompute = lc.old_logp_source == "recompute"
  passes = int(recompute) + int(lc.use_reference)
  # The log-prob pass reads the params (full fine-tuning), or with LoRA the merged copy in the base's dtype when
  # old log-probs are recomputed (else only the reference pass runs, on the base itself): the base's shapes.
  logp_params = params if lw is None else lw.base
  if lw is None:
    logp_args = {"params": sizes_b["params"]}
  else:
    logp_args = {lora_weights.MERGED if recompute else lora_weights.BASE: sizes_b[lora_weights.BASE]}

  sampler_args = {"KV cache": cache_bytes}
  if lw is not None:
    sampler_args[lora_weights.SAMPLER] = sampler_params_bytes
  else:
    sampler_args["sampler params" if sampler_params_bytes else "params"] = sampler_params_bytes or sizes_b["params"]
  s_params = sampler_params if sampler_params_bytes else params
  prefill_fn, prefill_args, decode_args = _prefill_and_decode(sampler, s_params, cache, prompt, mesh, rules)
  merges = []   # LoRA: (phase, dtype) of each merged copy a rollout makes
  if lw is not None:
    merges.append(("LoRA merge (sampler copy)", sampler_dtype))
    if recompute and lw.base_dtype != sampler_dtype:
      merges.append(("LoRA merge (log-prob copy)", lw.base_dtype))
  chips = len(devices)
  with jax.set_mesh(mesh):
    merge_costs, merge_phases = [], {}
    want = lambda phase: only is None or phase in only   # noqa: E731
    for phase, dtype in merges if only is None else ():
      log(f"compiling the {phase} ...")
      merge_fn, merge_args = lw.merge_call(dtype)
      merge_p = _compile("lora_merge", merge_fn, merge_args, per_step=1,
                         args={k: sizes_b[k] for k in (lora_weights.BASE, lora_weights.ADAPTERS)})
      merge_phases[phase] = hbm.Phase(merge_p, {"optimizer state": sizes_b["optimizer state"], **kept_cache})
      merge_costs.append((f"lora_merge ({dtype.name})", flops.traced_flops(merge_fn, *merge_args) / chips, 1,
                          merge_p))
    train_p = logp_p = sample_p = None
    logp_fn_jit = progs.logp   # the Trainer's rollout pass
    if want("train step"):
      log("compiling the optimizer step ...")
      train_p = _compile("train_step", step_fn, (state, batch, rng, *frozen), per_step=updates,
                         args={**sizes_b, "batch": hbm.shard_bytes(batch)})
    if want("rollout log-probs") and passes:
      log("compiling the rollout log-prob pass ...")
      logp_p = _compile("completion_logprobs", logp_fn_jit, (logp_params, tokens, tokens, packed), per_step=passes,
                        args={**logp_args, "rollout tokens": 2 * hbm.shard_bytes(tokens)
                              + (hbm.shard_bytes(packed) if packed else 0)})
    if want("sampling"):
      log("compiling the sampler (prefill + decode loop) ...")
      sample_p = _compile("sampler program", sampler.program(bb, p_len), (s_params, prompt, prompt, rng_free,
                                                                          cache), per_step=chunks, args=sampler_args)
    # (name, matmul FLOPs per chip of one run, runs per RL step, compiled program or None); none when ``only``
    costs = [] if only is not None else [
        *merge_costs,
        ("sampler prefill", flops.traced_flops(prefill_fn, *prefill_args) / chips, chunks, None),
        # T tokens take T - 1 forward passes after the prefill (the last one is drawn without one).
        ("sampler decode step", flops.traced_flops(prefill_fn, *decode_args) / chips, max(t_len - 1, 0) * chunks,
         None),
        ("sampler program", None, chunks, sample_p),
        ("completion_logprobs", flops.traced_flops(logp_fn_jit, logp_params, tokens, tokens, packed) / chips, passes, logp_p),
        ("train_step", flops.traced_flops(step_fn, state, batch, rng, *frozen) / chips, updates, train_p),
    ]

  if lw is None:
    resident_train = {"reference params": ref_bytes, **kept_cache}
    phases = {
        "sampling": hbm.Phase(sample_p, {"optimizer state": sizes_b["optimizer state"], "reference params": ref_bytes,
                                         **({"params": sizes_b["params"]} if sampler_params_bytes else {})}),
        "rollout log-probs": hbm.Phase(logp_p, {"optimizer state": sizes_b["optimizer state"],
                                                "reference params": ref_bytes, **kept_cache}),
        "train step": hbm.Phase(train_p, resident_train),
    }
  else:   # the base and the train state (adapters, moments) stay resident; the base is the reference
    train_state_b = {k: sizes_b[k] for k in (lora_weights.ADAPTERS, "optimizer state")}
    phases = {
        **merge_phases,
        "sampling": hbm.Phase(sample_p, {lora_weights.BASE: sizes_b[lora_weights.BASE], **train_state_b}),
        "rollout log-probs": hbm.Phase(logp_p, {**({lora_weights.BASE: sizes_b[lora_weights.BASE]} if recompute
                                                   else {}), **train_state_b, **kept_cache}),
        "train step": hbm.Phase(train_p, dict(kept_cache)),
    }
  phases = {k: v for k, v in phases.items() if v.program is not None}   # not compiled: no passes, or not asked
  summary = dict(sizes_b, mesh=dict(zip(names, sizes)), hosts=hosts, prompts=prompts, rows=rows,
                 minibatch_rows=batch["tokens"].shape[0], kv_cache=cache_bytes, reference=ref_bytes,
                 sampler_params=sampler_params_bytes, lora=what)
  return phases, costs, summary


def _compile(name: str, jitted, call_args: tuple, *, per_step: float, **kw) -> hbm.Program:
  """Lowers and compiles ``jitted`` for ``args``; a program over HBM becomes a Program with the compiler's
  figures (the TPU compiler refuses programs that do not fit one chip)."""
  try:
    compiled = jitted.lower(*call_args).compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return hbm.from_out_of_memory(name, str(e), per_step=per_step, **kw)
  return hbm.measure(name, compiled, per_step=per_step, **kw)


def _prefill_and_decode(sampler: Sampler, params, cache, prompt, mesh, rules):
  """The sampler's model calls alone, for their costs: prefill of the prompt bucket and one decode step.

  Returns the jitted call and the argument tuples of prefill and of one decode step."""
  row_sh = sharding.batch_sharding(mesh, 2, rules)
  b, p_len = prompt.shape
  n = b * sampler.config.num_samples
  toks = jax.ShapeDtypeStruct((b, p_len), jnp.int32, sharding=row_sh)   # each prompt prefilled once
  one = jax.ShapeDtypeStruct((n, 1), jnp.int32, sharding=row_sh)
  prefix = jax.eval_shape(functools.partial(sampler.cache_buffer, b, p_len))
  prefix = shapes.with_shardings(prefix, sampler.cache_shardings(prefix))
  # tokens, positions and mask share one shape and dtype; the cache is donated as in the decode loop.
  apply = lambda p, *args: sampler.apply_model(sampler.decode_model, sampler.decode_params(p), *args,
                                              logits_at=slice(-1, None))
  jitted = jax.jit(apply, donate_argnums=(4,))
  return jitted, (params, toks, toks, toks, prefix), (params, one, one, one, cache)


# ------------------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------------------

def run(config, topology: str | None = None, *, hbm_gib: float | None = None, log=print,
        suggest: bool = False) -> tuple[bool, str]:
  """Compiles the config for ``topology`` (default: ``config.slice``); returns (fits, report text). With
  ``suggest``, a config that does not fit is followed by the settings that make it fit
  (``launch/aot_tools/suggest.py``) and their report."""
  if config.job != "rl":
    raise SystemExit(f"launch.aot checks RL jobs; config key 'job' is {config.job!r}")
  try:
    rl_algos.get(config.algo.name)
  except rl_algos.SettingError as e:
    raise SystemExit(str(e)) from None
  try:
    sl = tpu_topology.parse(topology or config.slice, hbm_gib=hbm_gib)
  except ValueError as e:
    raise SystemExit(str(e)) from None
  devices = tpu_topology.compile_only_devices(sl)
  fits, text, phases, hosts = _report(config, sl, devices, log)
  if fits or not suggest:
    return fits, text
  log(text)
  log("searching for settings that fit (--suggest) ...")
  found = suggest_lib.search(config, devices, phases, sl.hbm_bytes, compile_all, hosts=hosts, log=log)
  if found is None:
    return fits, ("no micro-batch, remat, logits-chunk or sampling-chunk setting makes it fit: fewer prompts per "
                  "RL step (--config.train.batch_prompts), fewer new tokens or a larger slice")
  _, text2, _, _ = _report(suggest_lib.apply(config, found), sl, devices, log)
  return fits, f"suggested: {suggest_lib.flags(found)}\nwith them:\n{text2}"


def _report(config, sl, devices, log):
  """(fits, report text, phases, hosts) of ``config`` on slice ``sl``."""
  phases, costs, summary = compile_all(config, devices, log=log)
  header = (f"{sl.name} ({sl.topology_name}, {sl.num_chips} chips, {summary['hosts']} hosts, "
            f"{hbm.gib(sl.hbm_bytes).strip()} HBM per chip), mesh {summary['mesh']}; rollout {summary['prompts']} "
            f"prompts x {config.sampler.num_generations} = {summary['rows']} rows, "
            f"{config.train.num_minibatches} minibatches of {summary['minibatch_rows']} rows in "
            f"{config.train.num_microbatches} micro-batches"
            + (f"; sampled in {config.sampler.chunks} chunks of {summary['prompts'] // config.sampler.chunks} "
               f"prompts" if config.sampler.get("chunks", 1) > 1 else "")
            + (f"; {summary['lora']}" if summary["lora"] else "") + "\nper-chip HBM by phase:")
  fits, text = hbm.report(phases, sl.hbm_bytes, header=header)
  text += "\n" + "\n".join(hbm.cost_lines(costs))
  return fits, text, phases, summary["hosts"]


def check(config, topology: str | None = None, *, hbm_gib: float | None = None, log=print,
          suggest: bool = False) -> int:
  """Prints the report; returns the exit status (0 fits, 1 does not fit as given)."""
  try:
    fits, text = run(config, topology, hbm_gib=hbm_gib, log=log, suggest=suggest)
  except ImportError as e:
    raise SystemExit(str(e)) from None
  log(text)
  return 0 if fits else 1


def main(argv) -> None:
  del argv
  config = flags.FLAGS.config
  if config is None:
    raise app.UsageError("--config is required, e.g. --config configs/grpo_tpu.py")
  jax.config.update("jax_platforms", "cpu")  # this process runs nothing: TPU devices are compile-only
  sys.exit(check(config, flags.FLAGS.topology, hbm_gib=flags.FLAGS.hbm_gib, log=functools.partial(print, flush=True),
                 suggest=flags.FLAGS.suggest))


if __name__ == "__main__":
  define_flags()
  app.run(main)
