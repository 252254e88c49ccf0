r"""Sampler throughput: compiled while_loop sampler vs a Python loop over a jitted step vs transformers.

Every contender starts from the same random weights (our param tree; transformers reads it from the
checkpoint that ``models.hf.save_hf_checkpoint`` writes), gets the same unpadded prompts [B, P] and
generates exactly ``new_tokens`` tokens per row by greedy decoding (no EOS), so all do the same work.
Throughput is generated tokens / wall-clock seconds of one whole generate call (prefill included), the
median over ``--repeats`` timed calls after one warm-up call (which compiles).

  python -m launch.bench_sampler --model tiny --batch 32 --prompt_len 32 --new_tokens 64
  python -m launch.bench_sampler --model small-50m --batch 32 --prompt_len 32 --new_tokens 64
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import kv_cache, presets
from models.transformer import Transformer
from rlj import logprobs, sampler, sampling_filters


def _timed(fn, repeats: int) -> tuple[float, object]:
  """Median wall seconds of ``fn()`` over ``repeats`` runs after one warm-up run."""
  out = fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), out


def python_loop_generate(model, params, prompts, mask, *, new_tokens: int):
  """Baseline (a): jitted prefill, then one jitted decode step per token called from Python."""
  n, p = prompts.shape
  apply = lambda prm, tok, pos, m, cache: model.apply({"params": prm}, tok, pos, m, cache=cache)

  @jax.jit
  def prefill(prm, tokens, mask):
    cache = kv_cache.init_cache(model.config, n, p + new_tokens)
    logits, cache = apply(prm, tokens, logprobs.positions_from_mask(mask), mask, cache)
    return logits[:, -1], jnp.sum(mask, axis=-1), cache

  @functools.partial(jax.jit, donate_argnums=(3,))
  def step(prm, logits, positions, cache):
    tok, _ = sampling_filters.sample_token(jax.random.key(0), logits, temperature=1.0, greedy=True)
    logits, cache = apply(prm, tok[:, None], positions[:, None], jnp.ones((n, 1), jnp.int32), cache)
    return tok, logits[:, 0], positions + 1, cache

  def run():
    logits, positions, cache = prefill(params, prompts, mask)
    out = []
    for _ in range(new_tokens):
      tok, logits, positions, cache = step(params, logits, positions, cache)
      out.append(tok)
    return np.stack([np.asarray(t) for t in out], axis=1)
  return run


def hf_generate(params, config, prompts, mask, *, new_tokens: int, workdir: str):
  """Baseline (b): transformers ``generate`` (greedy, KV cache) on the exported checkpoint."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from models import hf  # pylint: disable=g-import-not-at-top
  hf.save_hf_checkpoint(params, config, workdir, dtype="float32")
  model = transformers.AutoModelForCausalLM.from_pretrained(workdir, dtype=torch.float32).eval()
  ids, am = torch.from_numpy(np.asarray(prompts, np.int64)), torch.from_numpy(np.asarray(mask, np.int64))

  def run():
    with torch.inference_mode():
      out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, prompts.shape[1]:].numpy()
  return run, f"transformers {transformers.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", default="tiny", help="preset name (models.presets)")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--prompt_len", type=int, default=32)
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--skip_hf", action="store_true", help="do not run the transformers baseline")
  args = ap.parse_args(argv)

  config = presets.get(args.model)
  model = Transformer(config)
  b, p, t = args.batch, args.prompt_len, args.new_tokens
  prompts = np.random.default_rng(0).integers(1, config.vocab_size, size=(b, p)).astype(np.int32)
  mask = np.ones((b, p), np.int32)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), prompts[:1], prompts[:1] * 0, mask[:1])["params"])
  print(f"model {args.model} ({config.num_params() / 1e6:.1f}M params), batch {b}, prompt {p}, new tokens {t}, "
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")

  results = {}
  s = sampler.Sampler(model, sampler.SamplerConfig(max_new_tokens=t, greedy=True))
  run_ours = lambda: np.asarray(s.sample(params, prompts, mask, jax.random.key(0)).completion)
  secs, ours = _timed(run_ours, args.repeats)
  results["rlj compiled sampler (while_loop)"] = secs

  secs, loop_tokens = _timed(python_loop_generate(model, params, prompts, mask, new_tokens=t), args.repeats)
  results["(a) Python loop over jitted step"] = secs
  agree = {"(a)": float(np.mean(loop_tokens == ours))}

  if not args.skip_hf:
    try:
      with tempfile.TemporaryDirectory() as workdir:
        run_hf, hf_version = hf_generate(params, config, prompts, mask, new_tokens=t, workdir=workdir)
        secs, hf_tokens = _timed(run_hf, args.repeats)
      results[f"(b) transformers generate [{hf_version}]"] = secs
      agree["(b)"] = float(np.mean(hf_tokens == ours))
    except ImportError as e:
      print(f"transformers baseline skipped: {e}")

  base = results["rlj compiled sampler (while_loop)"]
  for name, secs in results.items():
    print(f"{name:70s} {b * t / secs:10.1f} tok/s  ({secs * 1e3:8.1f} ms/call, {secs / base:5.2f}x ours' time)")
  print("greedy tokens equal to ours:", ", ".join(f"{k} {v:.3f}" for k, v in agree.items()))
  return results


if __name__ == "__main__":
  main()
