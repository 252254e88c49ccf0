r"""Sampler throughput: compiled while_loop sampler vs a Python loop over a jitted step vs transformers.

Every contender starts from the same random weights (our param tree; transformers reads it from the
checkpoint that ``models.hf.save_hf_checkpoint`` writes), gets the same unpadded prompts [B, P] and
generates exactly ``new_tokens`` tokens per row by greedy decoding (no EOS), so all do the same work.
Throughput is generated tokens / wall-clock seconds of one whole generate call (prefill included), the
median over ``--repeats`` timed calls after one warm-up call (which compiles).

  python -m launch.benchmarks.sampler --model tiny --batch 32 --prompt_len 32 --new_tokens 64
  python -m launch.benchmarks.sampler --model small-50m --batch 32 --prompt_len 32 --new_tokens 64
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import platform
import statistics
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from launch import bench
from launch.benchmarks import matmul as bench_matmul
from models import kv_cache, presets
from models.transformer import Transformer
from rlj import logprobs, programs, sampler, sampling_filters


def _timed(fn, repeats: int) -> tuple[float, object]:
  """Median wall seconds of ``fn()`` over ``repeats`` runs after one warm-up run, and its last output."""
  outs = []
  times = bench.time_calls(lambda: outs.append(fn()) or outs[-1], repeats=repeats)
  return statistics.median(times), outs[-1]


def python_loop_generate(s: sampler.Sampler, params, prompts, mask, *, new_tokens: int):
  """Baseline (a): jitted prefill, then one jitted decode step per token called from Python; the model and
  weights the sampler ``s`` decodes with (``decode_model``, converted once before the loop)."""
  n, p = prompts.shape
  model = s.decode_model
  params = jax.jit(s.decode_params)(params)
  apply = lambda prm, tok, pos, m, cache: model.apply({"params": prm}, tok, pos, m, cache=cache)

  @jax.jit
  def prefill(prm, tokens, mask):
    cache = kv_cache.init_cache(model.config, n, p + new_tokens)
    logits, cache = apply(prm, tokens, logprobs.positions_from_mask(mask), mask, cache)
    return logits[:, -1], jnp.sum(mask, axis=-1), cache

  draw = jax.jit(lambda logits: sampling_filters.sample_token(jax.random.key(0), logits, temperature=1.0,
                                                              greedy=True)[0])

  @functools.partial(jax.jit, donate_argnums=(3,))
  def step(prm, logits, positions, cache):
    tok = draw(logits)
    logits, cache = apply(prm, tok[:, None], positions[:, None], jnp.ones((n, 1), jnp.int32), cache)
    return tok, logits[:, 0], positions + 1, cache

  def run():   # T - 1 forward passes after the prefill, like the compiled sampler and transformers
    logits, positions, cache = prefill(params, prompts, mask)
    out = []
    for _ in range(new_tokens - 1):
      tok, logits, positions, cache = step(params, logits, positions, cache)
      out.append(tok)
    out.append(draw(logits))
    return np.stack([np.asarray(t) for t in out], axis=1)
  return run


def hf_generate(params, config, prompts, mask, *, new_tokens: int, workdir: str):
  """Baseline (b): transformers ``generate`` (greedy, KV cache) on the exported checkpoint, with weights and
  compute in ``config.dtype`` like ours."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from models import hf  # pylint: disable=g-import-not-at-top
  hf.save_hf_checkpoint(params, config, workdir, dtype=config.dtype)
  model = transformers.AutoModelForCausalLM.from_pretrained(workdir, dtype=getattr(torch, config.dtype)).eval()
  ids, am = torch.from_numpy(np.asarray(prompts, np.int64)), torch.from_numpy(np.asarray(mask, np.int64))

  def run():
    with torch.inference_mode():
      out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, prompts.shape[1]:].numpy()
  return run, f"transformers {transformers.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def _setup(model_name: str, dtype: str, batch: int, prompt_len: int):
  """The preset at ``dtype``, its module, random unpadded prompts [batch, prompt_len] and seeded params."""
  config = dataclasses.replace(presets.get(model_name), dtype=dtype)
  model = Transformer(config)
  prompts = np.random.default_rng(0).integers(1, config.vocab_size, size=(batch, prompt_len)).astype(np.int32)
  mask = np.ones((batch, prompt_len), np.int32)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), prompts[:1], prompts[:1] * 0, mask[:1])["params"])
  return config, model, prompts, mask, params


def compare(model_name: str, *, batch: int, prompt_len: int, new_tokens: int, repeats: int, skip_hf: bool = False,
            dtype: str = "float32", verbose: bool = True) -> list[dict]:
  """Times the three contenders on the same weights and prompts; one row per contender."""
  config, model, prompts, mask, params = _setup(model_name, dtype, batch, prompt_len)
  params = jax.tree.map(lambda x: x.astype(config.jnp_dtype), params)   # both sides hold the weights in dtype
  b, p, t = batch, prompt_len, new_tokens
  if verbose:
    print(f"model {model_name} ({config.num_params() / 1e6:.1f}M params), batch {b}, prompt {p}, new tokens {t}, "
          f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")

  results = {}
  s = programs.sampler(model, sampler.SamplerConfig(max_new_tokens=t, greedy=True))   # the trainer's factory
  run_ours = lambda: np.asarray(s.sample(params, prompts, mask, jax.random.key(0)).completion)
  secs, ours = _timed(run_ours, repeats)
  results["rlj compiled sampler (while_loop)"] = secs

  secs, loop_tokens = _timed(python_loop_generate(s, params, prompts, mask, new_tokens=t), repeats)
  results["(a) Python loop over jitted step"] = secs
  agree = {"rlj compiled sampler (while_loop)": 1.0,
           "(a) Python loop over jitted step": float(np.mean(loop_tokens == ours))}

  if not skip_hf:
    try:
      with tempfile.TemporaryDirectory() as workdir:
        run_hf, hf_version = hf_generate(params, config, prompts, mask, new_tokens=t, workdir=workdir)
        secs, hf_tokens = _timed(run_hf, repeats)
      name = f"(b) transformers generate [{hf_version}]"
      results[name] = secs
      agree[name] = float(np.mean(hf_tokens == ours))
    except ImportError as e:
      print(f"transformers baseline skipped: {e}")

  base = results["rlj compiled sampler (while_loop)"]
  return [{"model": model_name, "contender": name, "tokens/s": b * t / secs, "ms per call": secs * 1e3,
           "time vs rlj": secs / base, "greedy tokens equal to rlj": agree[name]} for name, secs in results.items()]


def decode_bytes(config, params, *, rows: int, prompt_len: int, new_tokens: int, cache_itemsize: int) -> tuple[int, float]:
  """(parameter bytes, mean KV-cache bytes a decode step must read) for greedy decoding without EOS.

  Step i (0-based) attends over the prompt, the i earlier completion tokens and itself, so the cache it
  must read averages P + (T + 1) / 2 slots per row over the T - 1 decode steps after the first token.
  """
  param_bytes = sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(params))
  slots = prompt_len + (new_tokens + 1) / 2
  per_slot = 2 * config.num_layers * config.num_kv_heads * config.head_dim * cache_itemsize
  return param_bytes, rows * slots * per_slot


def decode_matmul_floor(config, *, rows: int, dtype: str, steps: int = 8, repeats: int = 3,
                        one_layer: bool = False) -> float:
  """Seconds per decode step of the step's matmuls alone, at ``rows`` rows: per layer x [rows, D] times separate
  q, k, v, o, gate, up and down weights (with the SwiGLU product and residual adds that join them), then the
  [D, V] output projection; no norms, RoPE, attention, cache writes or sampling. A jitted ``fori_loop`` of
  ``steps`` steps, best of ``repeats``: what a decode step cannot go below on this backend at this batch.

  With ``one_layer`` every layer multiplies by the first layer's weights: the same FLOPs, but one layer's
  weights can stay in the processor's caches between layers and steps, where a real step streams all L
  layers' weights from memory. The gap between the two times is the cost of that streaming.
  """
  c, dt, d = config, jnp.dtype(dtype), config.embed_dim
  shapes = bench_matmul.layer_shapes(c)
  distinct = 1 if one_layer else c.num_layers
  make = jax.jit(lambda: ([{n: jnp.full(sh, 1e-4, dt) for n, sh in shapes.items()} for _ in range(distinct)],
                          jnp.full((d, c.vocab_size), 1e-4, dt)))   # small: x stays O(1) over the loop
  layers, head = make()
  layers = layers * (c.num_layers // distinct)

  def step(_, x):
    for w in layers:
      q, k, v = x @ w["q"], x @ w["k"], x @ w["v"]
      x = x + q @ w["o"] + (jnp.sum(k) + jnp.sum(v)) * 1e-9          # k, v feed the output: not dead code
      x = x + (jax.nn.silu(x @ w["gate"]) * (x @ w["up"])) @ w["down"]
    return x + (x @ head)[:, :d] * 1e-9

  run = jax.jit(lambda x, layers, head: jax.lax.fori_loop(0, steps, step, x))
  x = jnp.ones((rows, d), dt)
  return min(bench.time_calls(lambda: run(x, layers, head), repeats=repeats)) / steps


def decode(model_name: str, *, batch: int, prompt_len: int, new_tokens: int, repeats: int,
           dtype: str = "float32", bandwidth_mbytes: int | None = None, cache_phases: int | None = None) -> dict:
  """Decode throughput of the compiled sampler against the memory-bandwidth bound; one result row.

  Decode time is (call with T new tokens) - (call with 1 new token), i.e. prefill and the first token are
  subtracted, over T - 1 steps. The bound of one step is (parameter bytes + KV bytes it must read) / copy
  bandwidth, both measured in this process.
  """
  config, model, prompts, mask, params = _setup(model_name, dtype, batch, prompt_len)
  b, p, t = batch, prompt_len, new_tokens
  params = jax.tree.map(lambda x: x.astype(config.jnp_dtype), params)   # the trainer's sampler dtype
  secs = {}
  for steps in (1, t):
    s = programs.sampler(model, sampler.SamplerConfig(max_new_tokens=steps, greedy=True, keep_cache=True,
                                                      cache_phases=cache_phases if steps == t else None))
    call = lambda: s.sample(params, prompts, mask, jax.random.key(0)).completion  # noqa: E731
    times = bench.time_calls(call, repeats=repeats)
    secs[steps] = (min(times), float(np.median(times)))
    s.release_caches()
  phases = len(s.phase_ends()) or 1   # of the T-token call, the last one
  step_s = (secs[t][0] - secs[1][0]) / (t - 1)
  param_bytes, kv_bytes = decode_bytes(config, params, rows=b, prompt_len=p, new_tokens=t,
                                       cache_itemsize=config.jnp_dtype.itemsize)
  bw = bench.copy_bandwidth(mbytes=bandwidth_mbytes)
  bound_s = (param_bytes + kv_bytes) / bw
  floor_s = decode_matmul_floor(config, rows=b, dtype=dtype)
  resident_s = decode_matmul_floor(config, rows=b, dtype=dtype, one_layer=True)
  return {"model": model_name, "rows": b, "prompt + new": f"{p} + {t}", "dtype": dtype, "cache phases": phases,
          "call s (best, T new)": secs[t][0], "call s (best, 1 new)": secs[1][0], "decode ms/step": step_s * 1e3,
          "decode tokens/s": b / step_s, "params MB": param_bytes / 2**20, "KV read MB/step": kv_bytes / 2**20,
          "copy GB/s": bw / 1e9, "bound ms/step": bound_s * 1e3, "x bound": step_s / bound_s,
          "matmuls alone ms/step": floor_s * 1e3, "x matmuls alone": step_s / floor_s,
          "matmuls, 1 layer's weights ms/step": resident_s * 1e3}


def run_decode(args) -> tuple[list[dict], list[str]]:
  """``launch.bench`` case ``sampler``."""
  rows = [decode(name, batch=args.batch or 32, prompt_len=args.seq or 32, new_tokens=args.new_tokens or 64,
                 repeats=args.repeats, dtype=args.dtype, cache_phases=args.cache_phases)
          for name in ([args.model] if args.model else ["tiny", "small-50m"])]
  return rows, ["Greedy decoding of random prompts without EOS (every row decodes every step), "
                "rlj.sampler.Sampler with keep_cache and the platform's KV-cache phases (SamplerConfig.cache_phases) "
                "unless --cache_phases says; best of --repeats calls after one warm-up.",
                "x bound = decode ms/step / bound ms/step, bound = (params + KV bytes a step must read) / copy "
                "bandwidth (donated x + 1, read + write bytes).",
                "matmuls alone = the step's weight matmuls (separate q, k, v, o, gate, up, down per layer, then the "
                "output projection) at the same rows and dtype, jitted in a loop without norms, attention, cache "
                "or sampling (launch.benchmarks.sampler.decode_matmul_floor). 1 layer's weights = the same matmuls with "
                "every layer reusing the first layer's weights, which can then stay in the processor's caches: "
                "the difference is the time spent streaming L layers' weights from memory."]


def run_compare(args) -> tuple[list[dict], list[str]]:
  """``launch.bench`` case ``sampler_hf``."""
  rows = compare(args.model or "small-50m", batch=args.batch or 32, prompt_len=args.seq or 32,
                 new_tokens=args.new_tokens or 64, repeats=args.repeats, dtype=args.dtype, verbose=False)
  return rows, ["Median of --repeats whole generate calls (prefill + greedy decode, no EOS) after one warm-up; "
                "transformers runs on torch's CPU build whatever the JAX backend, with weights and compute in "
                "--dtype like rlj. In bfloat16 the two round differently, so greedy paths part after the first "
                "near-tie (the last column)."]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", default="tiny", help="preset name (models.presets)")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--prompt_len", type=int, default=32)
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--skip_hf", action="store_true", help="do not run the transformers baseline")
  args = ap.parse_args(argv)
  rows = compare(args.model, batch=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                 repeats=args.repeats, skip_hf=args.skip_hf)
  for r in rows:
    print(f"{r['contender']:70s} {r['tokens/s']:10.1f} tok/s  ({r['ms per call']:8.1f} ms/call, "
          f"{r['time vs rlj']:5.2f}x ours' time, greedy tokens equal {r['greedy tokens equal to rlj']:.3f})")
  return rows


if __name__ == "__main__":
  main()
