"""launch.aot: TPU ahead-of-time compilation of an RL config, per-chip HBM accounting and the fit verdict.

Needs libtpu (``pip install "jax[tpu]"``) for the compile-only TPU devices; without it the compile tests skip.
The message parsing, topology layouts and FLOP counter are tested without libtpu.
"""
import jax
import jax.numpy as jnp
import pytest

from configs import grpo_tpu
from launch.aot_tools import flops, hbm, tpu_topology

pytestmark = pytest.mark.usefixtures("fast_compile")


# ------------------------------------------------------------------------------------------ no libtpu needed

@pytest.mark.parametrize("name,shape,chips", [
    ("v5p-64", (2, 4, 4), 32), ("v5p-8", (2, 2, 1), 4), ("v4-32", (2, 2, 4), 16), ("v4-128", (4, 4, 4), 64),
    ("v5litepod-16", (4, 4), 16), ("v5e-4", (2, 2), 4), ("v6e-8", (2, 4), 8), ("v6e-256", (16, 16), 256),
    ("v5p:4x4x8", (4, 4, 8), 128)])
def test_slice_layouts(name, shape, chips):
  s = tpu_topology.parse(name)
  assert s.shape == shape and s.num_chips == chips


def test_slice_errors_and_capacity():
  assert tpu_topology.parse("v5p-64").hbm_bytes == 95 * hbm.GIB
  assert tpu_topology.parse("v5e-8").hbm_bytes == 16 * hbm.GIB
  assert tpu_topology.parse("v5e-8", hbm_gib=0.5).hbm_bytes == hbm.GIB // 2
  for bad in ("v5p-63", "v9-8", "v5p:2x2", "gpu-8"):
    with pytest.raises(ValueError):
      tpu_topology.parse(bad)


def test_compiler_out_of_memory_messages():
  a = hbm.from_out_of_memory("x", "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
                             "HLO temporaries (50.81G) exceeds available HBM (15.75G).", per_step=1,
                             args={"params": 2 * hbm.GIB})
  assert a.temp == int(50.81 * hbm.GIB) and a.peak == a.temp + 2 * hbm.GIB and a.error
  b = hbm.from_out_of_memory("y", "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in "
                             "memory space hbm. Used 63.80G of 30.75G hbm. Exceeded hbm capacity by 33.05G.",
                             per_step=1, args={"params": hbm.GIB})
  assert b.peak == int(63.80 * hbm.GIB)


def test_traced_flops_expand_scans():
  def f(w, x):
    h, _ = jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, w)
    return h.sum()
  w, x = jax.ShapeDtypeStruct((3, 64, 64), jnp.float32), jax.ShapeDtypeStruct((16, 64), jnp.float32)
  assert flops.traced_flops(jax.jit(f), w, x) == 3 * 2 * 16 * 64 * 64
  # Gradient w.r.t. w and x: the forward plus two matmuls per layer in the backward pass.
  assert flops.traced_flops(jax.jit(jax.grad(f, argnums=(0, 1))), w, x) == 3 * 3 * 2 * 16 * 64 * 64


# ------------------------------------------------------------------------------------------ compiled on TPU

def _devices(name):
  pytest.importorskip("libtpu")
  try:
    return tpu_topology.compile_only_devices(tpu_topology.parse(name))
  except Exception as e:  # noqa: BLE001  libtpu present but unable to describe the topology
    pytest.skip(f"no TPU topology from libtpu: {e}")


def _config(fsdp=-1):
  """The runlocal GRPO job (a ~0.4M-parameter model) laid out fully sharded over the slice."""
  c = grpo_tpu.get_config("runlocal")
  c.mesh = [("data", -1), ("fsdp", fsdp), ("tensor", 1)] if fsdp != -1 else [("data", 1), ("fsdp", -1),
                                                                              ("tensor", 1)]
  c.algo.kwargs.kl_coef = 0.04   # a reference model and its log-prob pass
  return c


@pytest.fixture(scope="module")
def compiled():
  from launch import aot
  devices = _devices("v5e-8")
  c = _config()
  c.sampler.max_new_tokens = 8
  return c, aot.compile_all(c, devices, log=lambda *_: None)


def test_breakdown_and_param_bytes(compiled):
  from launch import builders
  c, (phases, costs, summary) = compiled
  assert set(phases) == {"sampling", "rollout log-probs", "train step"}
  comps = phases["train step"].components
  for key in ("params", "optimizer state", "reference params", "KV cache", "activations / temporaries", "batch"):
    assert key in comps, key
  assert "KV cache" in phases["sampling"].components
  n = builders.model_config(c, c.tokenizer.vocab_size).num_params()
  # Every parameter has an "embed" axis split over fsdp=8 (float32), so a chip holds 1/8 of them.
  assert summary["params"] == pytest.approx(4 * n / 8, rel=0.02)
  assert summary["optimizer state"] == pytest.approx(2 * summary["params"], rel=0.01)   # Adam mu and nu
  train = phases["train step"].program
  assert train.argument >= summary["params"] + summary["optimizer state"]   # compiled memory analysis
  assert all(ph.total >= ph.program.peak > 0 for ph in phases.values())
  by_name = {name: (f, k) for name, f, k, _ in costs}
  assert by_name["train_step"][1] == c.train.num_minibatches * c.train.num_epochs
  assert by_name["sampler decode step"][1] == c.sampler.max_new_tokens - 1   # no forward pass after the last token
  # Per row, the step (forward + backward, no remat) does three times the matmuls of the log-prob forward.
  per_row_train = by_name["train_step"][0] / summary["minibatch_rows"]
  per_row_logp = by_name["completion_logprobs"][0] / summary["rows"]
  assert per_row_train == pytest.approx(3 * per_row_logp, rel=0.05)


def test_does_not_fit_names_biggest_consumer(compiled):
  _, (phases, _, _) = compiled
  peak = max(ph.total for ph in phases.values())
  fits, text = hbm.report(phases, peak + 1, header="h")
  assert fits and "FITS" in text
  fits, text = hbm.report(phases, peak - 1, header="h")
  assert not fits and "DOES NOT FIT" in text and "biggest consumer" in text and "fix:" in text


@pytest.mark.slow
def test_cli_exit_status_when_it_does_not_fit():
  from launch import aot
  _devices("v5e-8")
  c = _config()
  c.sampler.max_new_tokens = 8
  lines = []
  assert aot.check(c, "v5e-8", hbm_gib=1e-4, log=lines.append) == 1
  assert "DOES NOT FIT" in lines[-1] and "biggest consumer" in lines[-1]


@pytest.mark.slow   # ~11 s on 2 cores (a second layout compiled): outside the CI budget
def test_param_and_optimizer_bytes_fall_as_one_over_fsdp(compiled):
  from launch import aot
  _, (phases8, _, summary8) = compiled                      # fsdp=8
  c = _config(2)                                             # data=4, fsdp=2
  c.sampler.max_new_tokens = 8
  phases2, _, summary2 = aot.compile_all(c, _devices("v5e-8"), log=lambda *_: None)
  state = {k: s["params"] + s["optimizer state"] for k, s in ((2, summary2), (8, summary8))}
  assert state[2] == pytest.approx(4 * state[8], rel=0.02)
  # The compiled step's arguments (train state + a small batch) shrink with it.
  args = {2: phases2["train step"].program.argument, 8: phases8["train step"].program.argument}
  assert args[8] < 0.5 * args[2]


# ------------------------------------------------------------------------------------------ LoRA runs

@pytest.mark.parametrize("key,value,named", [
    ("model.lora.rank", 10 ** 4, "model.lora.rank"), ("model.lora.targets", ("q", "qq"), "model.lora"),
    ("model.lora.base_dtype", "float16", "model.lora.base_dtype"), ("algo.name", "dno", "model.lora.rank")])
def test_lora_config_launch_train_refuses_stops_in_one_line(key, value, named):
  from launch import aot
  c = _config()
  c.model.lora.rank = 2
  section, leaf = key.rsplit(".", 1)
  node = c
  for part in section.split("."):
    node = node[part]
  node[leaf] = value
  with pytest.raises(SystemExit) as e:
    aot.compile_all(c, [], log=lambda *_: None)   # checked before anything is laid out
  msg = str(e.value)
  assert "\n" not in msg and f"'{named}'" in msg


def test_lora_run_reports_base_adapters_and_no_reference(compiled):
  """Rank-1 adapters over a bfloat16 base, old log-probs recomputed, against the full fine-tuning of the same
  model (``compiled``: float32, the same fsdp=8 layout and KL term)."""
  from launch import aot
  from launch.aot_tools import lora_weights as lw
  _, (_, _, full) = compiled
  c = _config()
  c.sampler.max_new_tokens = 8
  c.model.lora.rank, c.model.lora.base_dtype, c.train.old_logp = 1, "bfloat16", "recompute"
  phases, costs, summary = aot.compile_all(c, _devices("v5e-8"), log=lambda *_: None)
  assert list(phases) == ["LoRA merge (sampler copy)", "LoRA merge (log-prob copy)", "sampling", "rollout log-probs",
                          "train step"]
  assert full["reference"] > 0 and summary["reference"] == 0     # the base is the reference: no copy
  assert not any(ph.components.get("reference params") for ph in phases.values())
  assert summary[lw.BASE] == pytest.approx(full["params"] / 2, rel=0.02)            # bfloat16 base
  assert summary["sampler_params"] == pytest.approx(full["params"], rel=0.02)       # merged, float32 sampler
  assert summary["optimizer state"] == pytest.approx(2 * summary[lw.ADAPTERS], rel=0.01)   # Adam on the adapters
  assert summary[lw.ADAPTERS] < summary[lw.BASE] / 4
  assert summary[lw.ADAPTERS] + summary["optimizer state"] < (full["params"] + full["optimizer state"]) / 8
  # The step takes the base as an argument beside the adapters' state; the old log-probs read a merged copy.
  assert phases["train step"].program.argument >= summary[lw.BASE] + summary[lw.ADAPTERS] + summary["optimizer state"]
  assert phases["rollout log-probs"].components[lw.MERGED] == summary[lw.BASE]
  assert phases["sampling"].components[lw.SAMPLER] == summary["sampler_params"]
  assert {name for name, *_ in costs} >= {"lora_merge (float32)", "lora_merge (bfloat16)", "train_step"}
  fits, text = hbm.report(phases, 1, header="h")   # every LoRA component has a fix
  assert not fits and "fix:" in text
  for label in (lw.BASE, lw.ADAPTERS, lw.SAMPLER, lw.MERGED, "optimizer state", "KV cache"):
    assert label in text, label


def test_suggest_ladders_and_search_fit_the_train_step(compiled):
  """launch.aot --suggest: each phase's ladder (cheapest first), and a search that recompiles only the train step
  until it fits a capacity just under its peak."""
  from launch import aot
  from launch.aot_tools import suggest
  c, (phases, _, _) = compiled
  long = aot_config = _config()
  long.sampler.max_new_tokens = 4096
  assert suggest._ladder("train step", long, {}, kv_cache_heavy=True)[:4] == [
      {"model.overrides.remat": True}, {"train.logits_chunk": 512}, {"sampler.keep_cache": False},
      {"train.num_microbatches": 2}]
  logp_rungs = suggest._ladder("rollout log-probs", long, {"train.logits_chunk": 512})
  assert logp_rungs[0] == {"train.logp_microbatches": 2 * long.train.num_minibatches}
  assert suggest._ladder("sampling", aot_config, {})[0] == {"sampler.chunks": 2}
  cap = (phases["train step"].total - 1) / suggest.HEADROOM
  devices = _devices("v5e-8")
  found = suggest.search(c, devices, {"train step": phases["train step"]}, cap, aot.compile_all, hosts=1,
                         log=lambda *_: None)
  assert found is not None and found
  again = aot.compile_all(suggest.apply(c, found), devices, log=lambda *_: None, only={"train step"})[0]
  assert set(again) == {"train step"} and again["train step"].total <= suggest.HEADROOM * cap
  assert suggest.flags(found).startswith("--config.")


def test_packed_programs_compile_at_the_largest_bucket(compiled):
  """``train.packing``: the train step and the log-prob pass compile for the TPU target on packed rows of the
  largest bucket (a bin per row), whose batch bytes are the unpacked batch's plus the packing arrays."""
  from launch import aot
  devices = _devices("v5e-8")
  c = _config()
  c.sampler.max_new_tokens = 8
  c.train.packing = True
  phases, _, _ = aot.compile_all(c, devices, log=lambda *_: None, only={"train step", "rollout log-probs"})
  assert set(phases) == {"train step", "rollout log-probs"}
  assert all(ph.program.peak > 0 for ph in phases.values())
  plain = compiled[1][0]    # the same config unpacked
  assert phases["train step"].components["batch"] > plain["train step"].components["batch"]
