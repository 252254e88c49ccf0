"""grain pipelines: exact resume (also across worker counts), host sharding, epochs, overflow accounting."""
import dataclasses
import json

import numpy as np
import pytest

from rlj.data import pipeline, synthetic, tfds_builders

CFG = pipeline.PipelineConfig(batch_size=4, buckets=(16, 24, 32), template="Q: {prompt}\nA:", seed=7)


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype, k
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _prompts(src, tok, cfg, index=0, count=1):
  return pipeline.prompt_pipeline(src, tok, cfg, process_index=index, process_count=count)


def test_restore_replays_the_same_batches(tok):
  src = synthetic.ArithmeticTask(30, seed=1, levels=(1, 3, 5))
  cfg = dataclasses.replace(CFG, buckets=(16, 24), overflow="drop")
  straight = _take(_prompts(src, tok, cfg), 14)
  it = _prompts(src, tok, cfg)
  _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  assert state["dropped"] > 0  # some level-5 prompts exceed 24 tokens
  _take(it, 2)  # move on, then go back
  it.set_state(state)
  resumed = _take(it, 9)  # crosses into later epochs (14 batches > 30 records)
  fresh = _prompts(src, tok, cfg)
  fresh.set_state(state)
  for a, b, c in zip(straight[5:], resumed, _take(fresh, 9)):
    _assert_same(a, b)
    _assert_same(a, c)
  assert it.get_state() == fresh.get_state()
  assert it.metrics()["data/epoch"] >= 1


def test_restore_across_worker_count(tok, built_data_dir):
  """Saved with no worker process (1 reader thread), restored with 2 worker processes, and back."""
  ds = tfds_builders.data_source("prompt_answer", "gsm8k", data_dir=built_data_dir, split="test")
  cfg0 = dataclasses.replace(CFG, buckets=(64, 96), num_threads=1)
  cfg2 = dataclasses.replace(cfg0, num_workers=2, num_threads=4)
  straight = _take(_prompts(ds, tok, cfg0, 1, 2), 7)
  it = _prompts(ds, tok, cfg0, 1, 2)
  _take(it, 3)
  other = _prompts(ds, tok, cfg2, 1, 2)
  other.set_state(it.get_state())
  try:
    for a, b in zip(straight[3:6], _take(other, 3)):
      _assert_same(a, b)
    state = other.get_state()
  finally:
    other.close()
  it.set_state(state)
  _assert_same(next(it), straight[6])


def test_two_hosts_read_disjoint_halves(tok):
  src = synthetic.ArithmeticTask(27, seed=0)
  for drop_remainder_hosts in (True, False):
    cfg = dataclasses.replace(CFG, batch_size=2, num_epochs=1, drop_remainder=False,
                              drop_remainder_hosts=drop_remainder_hosts)
    seen = []
    for host in (0, 1):
      batches = list(_prompts(src, tok, cfg, host, 2))
      seen.append([int(i) for b in batches for i, v in zip(b["index"], b["valid"]) if v])
    assert not set(seen[0]) & set(seen[1])
    for host in (0, 1):  # each host reads its own records, each once
      assert len(set(seen[host])) == len(seen[host])
    if drop_remainder_hosts:
      assert len(seen[0]) == len(seen[1]) == 13 and set(seen[0]) | set(seen[1]) == set(range(26))
    else:
      assert set(seen[0]) | set(seen[1]) == set(range(27))


def test_global_batch_is_the_same_for_any_host_count(tok):
  """Host i's batch k is block i of the one-host batch k of n times the size: a multi-host job sees the data
  (and row order) of a one-host job; a final partial batch is shared out evenly."""
  src = synthetic.ArithmeticTask(30, seed=3)
  for num_epochs, drop, size, hosts in ((2, True, 6, 2), (2, True, 6, 3), (1, False, 4, 2)):  # last: 30 = 7*4 + 2
    one = dataclasses.replace(CFG, batch_size=size, num_epochs=num_epochs, drop_remainder=drop)
    single = [b["index"][b["valid"]].tolist() for b in _prompts(src, tok, one)]
    cfg = dataclasses.replace(one, batch_size=size // hosts)
    per_host = [[b["index"][b["valid"]].tolist() for b in _prompts(src, tok, cfg, h, hosts)] for h in range(hosts)]
    assert {len(p) for p in per_host} == {len(single)}
    for k, batch in enumerate(single):
      assert sum((p[k] for p in per_host), []) == batch, (hosts, k)
  assert len(single) == 8 and len(single[-1]) == 2


def test_epochs_are_seeded_permutations(tok):
  src = synthetic.ArithmeticTask(12, seed=0)
  cfg = dataclasses.replace(CFG, batch_size=3, num_epochs=2)
  order = [int(i) for b in _prompts(src, tok, cfg) for i in b["index"]]
  assert len(order) == 24
  assert sorted(order[:12]) == sorted(order[12:]) == list(range(12))
  assert order[:12] != order[12:] and order[:12] != list(range(12))
  assert order == [int(i) for b in _prompts(src, tok, cfg) for i in b["index"]]
  other = [int(i) for b in _prompts(src, tok, dataclasses.replace(cfg, seed=8)) for i in b["index"]]
  assert other != order
  plain = [int(i) for b in _prompts(src, tok, dataclasses.replace(cfg, shuffle=False)) for i in b["index"]]
  assert plain == list(range(12)) * 2


def test_overflow_is_truncated_or_dropped_and_counted(tok):
  src = synthetic.ArithmeticTask(40, seed=2, levels=(1, 5))
  max_len = 24
  lengths = [len(tok.encode(f"Q: {src[i]['prompt']}\nA:", add_bos=True)) for i in range(len(src))]
  too_long = {i for i, n in enumerate(lengths) if n > max_len}
  assert 0 < len(too_long) < len(src)
  for overflow in ("truncate", "drop"):
    cfg = dataclasses.replace(CFG, buckets=(16, max_len), num_epochs=1, drop_remainder=False, overflow=overflow)
    it = _prompts(src, tok, cfg)
    batches = list(it)
    rows = [(int(i), t, m, tr) for b in batches
            for i, t, m, tr, v in zip(b["index"], b["prompt_tokens"], b["prompt_mask"], b["truncated"], b["valid"]) if v]
    for b in batches:  # each batch uses the smallest bucket fitting its longest prompt
      longest = b["prompt_mask"].sum(axis=1).max()
      assert b["prompt_tokens"].shape[1] == min(x for x in (16, max_len) if x >= longest)
    metrics = it.metrics()
    if overflow == "truncate":
      assert {i for i, *_, tr in rows if tr} == too_long and metrics["data/truncated"] == len(too_long)
      for i, t, m, _ in rows:
        if i in too_long:  # BOS, then the end of the prompt
          full = tok.encode(f"Q: {src[i]['prompt']}\nA:", add_bos=True)
          assert t[m == 1].tolist() == full[:1] + full[-(max_len - 1):]
      assert len(rows) == len(src) and metrics["data/dropped"] == 0
    else:
      assert {i for i, *_ in rows} == set(range(len(src))) - too_long
      assert metrics["data/dropped"] == len(too_long) and metrics["data/truncated"] == 0
    assert metrics["data/examples"] == len(rows)


def test_all_records_too_long_raises_instead_of_spinning(tok):
  cfg = dataclasses.replace(CFG, buckets=(4,), overflow="drop")
  with pytest.raises(ValueError, match="longer than the longest bucket 4"):
    next(_prompts(synthetic.ArithmeticTask(6), tok, cfg))


def test_finite_run_pads_or_drops_the_last_batch(tok):
  src = synthetic.ArithmeticTask(10, seed=0)
  padded = list(_prompts(src, tok, dataclasses.replace(CFG, num_epochs=1, drop_remainder=False)))
  assert len(padded) == 3 and padded[-1]["valid"].tolist() == [True, True, False, False]
  assert padded[-1]["index"].tolist()[2:] == [-1, -1] and padded[-1]["prompt_mask"][2:].sum() == 0
  assert len(list(_prompts(src, tok, dataclasses.replace(CFG, num_epochs=1)))) == 2


def test_state_from_another_pipeline_is_refused(tok):
  src = synthetic.ArithmeticTask(10, seed=0)
  state = _prompts(src, tok, CFG).get_state()
  with pytest.raises(ValueError, match="saved with seed=7, this pipeline has seed=8"):
    _prompts(src, tok, dataclasses.replace(CFG, seed=8)).set_state(state)
  with pytest.raises(ValueError, match="process_count"):
    _prompts(src, tok, CFG, 0, 2).set_state(state)


def test_default_host_comes_from_jax(tok):
  it = pipeline.prompt_pipeline(synthetic.ArithmeticTask(8), tok, CFG)
  assert (it.get_state()["process_index"], it.get_state()["process_count"]) == (0, 1)


def test_preference_pipeline_on_hh_rlhf(tok, built_data_dir):
  ds = tfds_builders.data_source("preference", "hh_rlhf", data_dir=built_data_dir, split="test")
  cfg = dataclasses.replace(CFG, template="{prompt}", buckets=(256, 512), shuffle=False, batch_size=2)
  batch = next(pipeline.preference_pipeline(ds, tok, cfg, process_index=0, process_count=1))
  assert batch["chosen_tokens"].shape == batch["rejected_tokens"].shape
  assert batch["chosen_tokens"].shape[1] in (256, 512) and batch["index"].tolist() == [0, 1]
  for row in range(2):
    rec = ds[row]
    for name in ("chosen", "rejected"):
      tokens, loss = batch[f"{name}_tokens"][row], batch[f"{name}_loss_mask"][row]
      assert tokens[-1] == tok.eos_id
      if not batch["truncated"][row]:
        assert tok.decode(tokens[loss == 1]) == rec[name].decode()


def test_synthetic_preference_pipeline_keeps_pairs_together(tok):
  src = synthetic.PreferenceTask(16, seed=0)
  cfg = dataclasses.replace(CFG, template="{prompt}", buckets=(16, 32), num_epochs=1)
  for batch in pipeline.preference_pipeline(src, tok, cfg, process_index=0, process_count=1):
    chosen = tok.decode_batch(np.where(batch["chosen_loss_mask"] == 1, batch["chosen_tokens"], tok.pad_id))
    prompts = tok.decode_batch(batch["chosen_tokens"] * (1 - batch["chosen_loss_mask"]))
    for i, c, p in zip(batch["index"], chosen, prompts):
      assert c == src[int(i)]["chosen"] and p == src[int(i)]["prompt"]
      assert synthetic.number_score(p, c) > synthetic.number_score(p, src[int(i)]["rejected"])
