"""Tests of the benchmark harness: the FLOP formula by hand, and every case at a tiny size returns well-formed
rows (no timing thresholds: the figures depend on the machine)."""
import dataclasses
import math
import time

import jax.numpy as jnp
import numpy as np
import pytest

from launch import bench
from launch.benchmarks import attention as bench_attention
from launch.benchmarks import logprobs as bench_logprobs, matmul as bench_matmul, rl_step as bench_rl
from launch.benchmarks import sampler as bench_sampler, train_step as bench_train
from models import presets

pytestmark = pytest.mark.usefixtures("fast_compile")

TINY = presets.get("tiny")   # V=128, L=2, D=32, H=4, KVH=2, Dh=8, F=64, untied


def _finite_positive(row, *keys):
  for k in keys:
    assert math.isfinite(row[k]) and row[k] > 0, (k, row[k])


def test_flops_formula_against_a_hand_count():
  # Per layer: q 32*4*8 + k 32*2*8 + v 32*2*8 + o 4*8*32 = 3072; MLP 3*32*64 = 6144.
  p_layers = 2 * (3072 + 6144)
  assert bench_train.layer_params(TINY) == p_layers == 18_432
  # The rest of num_params: the input embedding (a gather), the output projection (counted per completion
  # token, below) and the norm scales (elementwise).
  assert TINY.num_params() - p_layers == 128 * 32 + 32 * 128 + 2 * 2 * 32 + 32
  rows, seq, completion = 3, 10, 4
  causal_pairs = seq * (seq + 1) // 2                      # query i sees keys 0..i
  attention = 3 * 2 * rows * causal_pairs * 4 * (2 * 8 + 2 * 8)  # (fwd + 2 bwd) x layers x rows x pairs x heads x (qk + pv)
  logits = 6 * 32 * 128 * rows * completion
  assert bench_train.train_step_flops(TINY, rows, seq, completion) == 6 * p_layers * rows * seq + logits + attention


def test_flops_of_a_tied_model_are_the_same():
  tied = dataclasses.replace(TINY, tie_embeddings=True)
  assert bench_train.train_step_flops(tied, 3, 10, 4) == bench_train.train_step_flops(TINY, 3, 10, 4)
  assert TINY.num_params() - tied.num_params() == 32 * 128


def test_train_step_case_row():
  row = bench_train.measure(TINY, rows=8, seq_len=16, completion_len=8, repeats=1, peak_sizes=(64,))
  assert row["GFLOP/step"] == pytest.approx(bench_train.train_step_flops(TINY, 8, 16, 8) / 1e9)
  assert row["skipped"] == 0.0
  _finite_positive(row, "step s (best)", "achieved GFLOP/s", "matmul peak GFLOP/s", "MFU", "tokens/s")
  assert row["MFU"] == pytest.approx(row["achieved GFLOP/s"] / row["matmul peak GFLOP/s"])


def test_decode_bytes_by_hand():
  params = {"w": np.zeros((10, 3), np.float32), "b": np.zeros((5,), np.float32)}
  param_bytes, kv = bench_sampler.decode_bytes(TINY, params, rows=2, prompt_len=4, new_tokens=3, cache_itemsize=4)
  assert param_bytes == 35 * 4
  # k and v, 2 layers, 2 KV heads of 8, 4 bytes: 256 bytes a slot; 4 + (3 + 1) / 2 = 6 slots; 2 rows.
  assert kv == 2 * 6 * 256


def test_decode_matmul_shapes_by_hand():
  # Per layer q [32, 32], k and v [32, 16], o [32, 32], gate and up [32, 64], down [64, 32]; then [32, 128].
  assert bench_matmul.step_shapes(TINY) == {(32, 32): 4, (32, 16): 4, (32, 64): 4, (64, 32): 2, (32, 128): 1}
  gemma = presets.get("gemma-2b")   # H·Dh = 2048 = D: q and o are both [2048, 2048]
  shapes = bench_matmul.step_shapes(gemma)
  assert sum(shapes.values()) == 7 * 18 + 1 and shapes[(2048, 2048)] == 2 * 18
  assert sum(k * n * c for (k, n), c in shapes.items()) == bench_train.layer_params(gemma) + 2048 * 256_000


def test_decode_matmuls_case_rows():
  rows = bench_matmul.rows_for("tiny", rows=4, dtype="float32", iters=3, repeats=1)
  shapes, total = rows[:-1], rows[-1]
  assert len(shapes) == 5 and total["per step"] == 15
  for r in shapes:
    _finite_positive(r, "us per matmul", "GFLOP/s", "ms per step", "share of step")
  assert total["ms per step"] == pytest.approx(sum(r["ms per step"] for r in shapes))
  assert sum(r["share of step"] for r in shapes) == pytest.approx(1.0)
  assert total["weight MB"] == pytest.approx((bench_train.layer_params(TINY) + 32 * 128) * 4 / 2**20)


def test_sampler_decode_case_row():
  row = bench_sampler.decode("tiny", batch=2, prompt_len=4, new_tokens=3, repeats=1, bandwidth_mbytes=4)
  _finite_positive(row, "call s (best, T new)", "call s (best, 1 new)", "copy GB/s", "bound ms/step", "params MB",
                   "matmuls alone ms/step", "matmuls, 1 layer's weights ms/step")
  assert row["params MB"] == pytest.approx(TINY.num_params() * 4 / 2**20)
  assert row["x bound"] == pytest.approx(row["decode ms/step"] / row["bound ms/step"])
  assert row["cache phases"] == 1
  phased = bench_sampler.decode("tiny", batch=2, prompt_len=4, new_tokens=34, repeats=1, bandwidth_mbytes=4,
                                cache_phases=2)
  # steps [0, 32) and [32, 33); ms/step is a difference of two timed calls: finite, its sign is load noise
  assert phased["cache phases"] == 2 and np.isfinite(phased["decode ms/step"])


def test_sampler_comparison_contenders_draw_the_same_tokens():
  """The compiled sampler and the Python loop over a jitted step decode the same greedy tokens (transformers
  left out here; it is a test-only package and slow to load)."""
  rows = bench_sampler.compare("tiny", batch=2, prompt_len=4, new_tokens=3, repeats=1, skip_hf=True, verbose=False)
  assert [r["contender"] for r in rows] == ["rlj compiled sampler (while_loop)", "(a) Python loop over jitted step"]
  assert all(r["greedy tokens equal to rlj"] == 1.0 for r in rows)
  _finite_positive(rows[1], "tokens/s", "ms per call")


def test_logprobs_case_rows_agree_across_paths():
  rows = bench_logprobs.measure(rows=8, length=8, vocab=64, repeats=1, chunk_size=3)
  assert [r["path"] for r in rows] == ["dense", "chunked (C=3)", "vocab-parallel"]
  for r in rows:
    assert r["sum logp rel. diff vs dense"] < 1e-5
    assert r["temp MB"] >= 0
    _finite_positive(r, "fwd+bwd ms (best)")


def test_rl_step_case_breakdown():
  overrides = {"train.batch_prompts": 8, "tokenizer.train_records": 200, "data.train_records": 400,
               "model.overrides.num_layers": 1, "model.overrides.embed_dim": 32, "model.overrides.mlp_dim": 64}
  means, facts = bench_rl.measure(steps=1, warmup=1, overrides=overrides)
  assert facts["prompts x G"] == "8 x 8"
  row = bench_rl.breakdown_row(means)
  assert row["step ms"] >= row["sample ms"] + row["update ms"]
  assert 0 <= row["host overhead %"] <= 100
  assert row["not model compute %"] == pytest.approx(row["host overhead %"])   # no reference pass here
  assert row["reference ms"] < row["sample ms"]


def test_rl_step_shape_and_settings_from_the_command_line():
  args = bench.parser().parse_args(["--case", "rl_step", "--model", "small-32m", "--batch", "8", "--seq", "32",
                                    "--new_tokens", "64", "--old_logp", "auto", "--set", "algo.kwargs.kl_coef=0.04",
                                    "--set", "algo.name=gdpo"])
  overrides = bench_rl.shape_overrides(args)
  c = bench_rl.runlocal_config(total_steps=3, overrides=overrides)
  assert (c.model.preset, c.model.vocab_from_tokenizer, c.train.batch_prompts, tuple(c.data.buckets)) == \
      ("small-32m", False, 8, (32,))
  assert (c.sampler.max_new_tokens, c.train.old_logp, c.train.num_minibatches) == (64, "auto", 1)
  assert (c.algo.kwargs.kl_coef, c.algo.name) == (0.04, "gdpo")
  with pytest.raises(SystemExit, match=r"^rl_step override algo\.kwarg\.kl_coef=0\.04: no such key .*kwargs"):
    bench_rl.runlocal_config(total_steps=3, overrides={"algo.kwarg.kl_coef": 0.04})
  slow = bench_rl.shape_overrides(bench.parser().parse_args(["--case", "rl_step", "--reward_ms", "20"]))["rewards"]
  assert [r["name"] for r in slow] == ["correct", "slow"]     # the config's rewards, and one that waits 20 ms
  from rewards import combine
  fn = combine.resolve(slow[1]["fn"])
  t0 = time.perf_counter()
  assert list(fn(["p"] * 3, ["a", "b", "c"], **slow[1]["kwargs"])) == [0.0] * 3
  assert time.perf_counter() - t0 >= 0.02


def test_main_appends_a_section_with_its_command(tmp_path):
  out = tmp_path / "B.md"
  argv = ["--case", "logprobs", "--batch", "8", "--new_tokens", "4", "--vocab", "32", "--repeats", "1",
          "--out", str(out)]
  results = bench.main(argv)
  assert len(results["logprobs"]) == 3
  text = out.read_text()
  assert "`python -m launch.bench --case logprobs --batch 8 --new_tokens 4 --vocab 32 --repeats 1`" in text
  assert "| path |" in text and "Load average" in text and "jaxlib" in text
  bench.main(argv)
  assert out.read_text().count("### logprobs") == 2


def test_unknown_case_fails():
  with pytest.raises(SystemExit, match="unknown case"):
    bench.main(["--case", "nope"])


def test_table_formats_numbers():
  t = bench.table([{"a": 1234567, "b": 0.5}, {"a": 2, "c": "x"}])
  assert t.splitlines()[0] == "| a | b | c |"
  assert "| 1,234,567 | 0.5 |  |" in t


def test_attention_case_row():
  assert bench_attention.implementations("tpu", jnp.bfloat16) == ["xla", "splash"]
  assert bench_attention.implementations("gpu", jnp.bfloat16) == ["xla", "cudnn"]
  assert bench_attention.implementations("cpu", jnp.bfloat16) == ["xla"]
  (row,) = bench_attention.measure(model="tiny", batch=2, seq=64, dtype="float32", repeats=1)
  _finite_positive(row, "fwd+bwd ms (best)", "causal TFLOP/s")
  assert row["impl"] == "xla" and row["max |diff| vs xla"] == 0


@pytest.mark.slow   # ~14 s: out of CI for the suite's budget; in CI the skewed cut and FLOPs are checked below, the
# packed trainer pass in tests/rlj/old_logp_test.py and the rl_step case itself in test_rl_step_case_breakdown
def test_rl_step_skewed_packed_with_a_reference():
  """The skewed rollout (lengths spread over 10%-100% of T), packed updates and a reference model (its pass
  started before the rewards): the case runs and reports the packing's fill and the step's useful FLOPs."""
  overrides = {"train.batch_prompts": 4, "tokenizer.train_records": 200, "data.train_records": 400,
               "model.overrides.num_layers": 1, "model.overrides.embed_dim": 32, "model.overrides.mlp_dim": 64,
               "train.packing": True, "algo.kwargs.kl_coef": 0.04}
  plain = {k: v for k, v in overrides.items() if k != "train.packing"}
  (m_a, _), (m_b, facts) = bench_rl.measure_many([plain, overrides], steps=1, warmup=1, skewed=True)   # --ab
  assert 0 < m_b["fill"] <= 1 and m_b["useful_flops"] > 0 and m_b["time/reference"] > 0
  assert np.isnan(m_a["fill"]) and m_a["useful_flops"] == m_b["useful_flops"]    # the same prompts and lengths
  assert facts["old_logp"] in ("recompute", "sampler", "current")


def test_skewed_lengths_cut_and_useful_flops():
  lengths = bench_rl.skewed_lengths(64, 64, seed=0)
  assert (lengths.min(), lengths.max()) == (6, 64) and len(set(lengths)) > 50
  np.testing.assert_array_equal(np.sort(lengths), np.sort(bench_rl.skewed_lengths(64, 64, seed=1)))
  mc = presets.get("small-3m")
  # One row of 3 prompt + 2 completion tokens: blocks 2 P_layers per token, causal attention 2 L H Dh l (l + 1),
  # the completion's logits 2 D V per token.
  per_layer = 256 * 64 * (2 * 4 + 2 * 2) + 3 * 256 * 688
  want = 2 * 4 * per_layer * 5 + 2 * 4 * 4 * 64 * 5 * 6 + 2 * 256 * 512 * 2
  assert bench_train.forward_flops(mc, np.array([3]), np.array([2])) == want
  assert bench_rl.useful_flops(mc, (np.array([3]), np.array([2])), logp_passes=1, epochs=1) == 5 * want
