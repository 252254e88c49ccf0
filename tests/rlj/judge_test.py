"""The judge as a reward (rewards/pairwise_judge.py, rlj/judge.py): the circular budget, win rates against a numpy
loop (soft, hard, NaN), and the pairwise and rubric rewards of a tiny Llama judge against a slow per-prompt loop
over transformers' logits on the same checkpoint."""
import itertools
import json
import os
import sys

import numpy as np
import pytest

from launch import make_tiny_checkpoint
from rewards import pairwise_judge
from rlj import judge as judge_lib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "data"))
import tiny_checkpoints  # noqa: E402  (tests/data)

pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.mark.parametrize("g,k", [(4, 0), (5, 2), (6, 3), (8, 4), (8, 7), (7, 6), (2, 1)])
def test_circular_schedule_meets_k_opponents_and_judges_each_pair_once(g, k):
  pairs = pairwise_judge.circular_pairs(g, k)
  unordered = {frozenset(map(int, p)) for p in pairs}
  assert len(unordered) == len(pairs) and all(len(p) == 2 for p in unordered)     # each pair once, no self-pair
  meets = np.bincount(pairs.reshape(-1), minlength=g)
  assert (meets == (k or g - 1)).all()


def test_circular_schedule_refuses_what_it_cannot_do():
  with pytest.raises(ValueError, match="odd"):
    pairwise_judge.circular_pairs(5, 3)
  with pytest.raises(ValueError, match="must be 0"):
    pairwise_judge.circular_pairs(4, 4)
  with pytest.raises(ValueError, match="group size 1"):
    pairwise_judge.circular_pairs(1, 0)


def _win_rates_loop(prefs, pairs, g, hard):
  out = np.zeros((prefs.shape[0], g))
  for b in range(prefs.shape[0]):
    for i in range(g):
      vals = []
      for p, (x, y) in enumerate(pairs):
        if i in (x, y):
          v = prefs[b, p] if i == x else 1 - prefs[b, p]
          vals.append(v if not hard or np.isnan(v) else float(v > 0.5) + 0.5 * float(v == 0.5))
      out[b, i] = np.mean(vals)
  return out


@pytest.mark.parametrize("hard", [False, True])
def test_win_rates_equal_a_loop_and_nan_reaches_only_its_pair(hard):
  rng = np.random.default_rng(0)
  g, pairs = 6, pairwise_judge.circular_pairs(6, 3)
  prefs = rng.uniform(size=(3, len(pairs))).astype(np.float32)
  prefs[0, 0] = 0.5
  prefs[1, 2] = np.nan
  got = np.asarray(pairwise_judge.win_rates(prefs, pairs, g, hard=hard))
  np.testing.assert_allclose(got, _win_rates_loop(prefs, pairs, g, hard), rtol=1e-6, atol=1e-6)
  assert set(np.flatnonzero(np.isnan(got[1]))) == set(map(int, pairs[2])) and not np.isnan(got[[0, 2]]).any()
  assert np.isclose(pairwise_judge.debiased(np.float32(0.9), np.float32(0.9)), 0.5)   # a pure position bias cancels


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory):
  root = tmp_path_factory.mktemp("judge")
  corpus = [f"Question: what is {a} + {b}? Response A: {a + b}. Response B: {a * b}. Answer A or B. Yes No"
            for a, b in itertools.product(range(12), range(12))]
  ckpt = tiny_checkpoints.llama3(str(root / "judge"), corpus)
  make_tiny_checkpoint.write_model(ckpt, 768, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
                                   mlp_dim=64, seed=3)
  return ckpt


def _hf_first_verdict(model, hf_tok, text, ids):
  import torch
  enc = hf_tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
  enc = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
  with torch.no_grad():
    z = model(input_ids=torch.tensor([enc], dtype=torch.long)).logits[0, -1].double().numpy()
  return 1.0 / (1.0 + np.exp(-(z[ids[0]] - z[ids[1]]))), enc


def test_pairwise_and_rubric_rewards_equal_a_transformers_loop(tiny_judge):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  del torch
  judge = judge_lib.Judge.load(tiny_judge, chunk_rows=8)
  model = transformers.AutoModelForCausalLM.from_pretrained(tiny_judge).float().eval()
  hf_tok = transformers.AutoTokenizer.from_pretrained(tiny_judge)
  ids = judge.verdict_ids(("A", "B"))
  g = 4
  prompts = ["what is 3 + 4?"] * g + ["what is 5 + 6?"] * g
  completions = ["7", "12", "seven", "1 + 1", "11", "30", "eleven", ""]
  for k in (0, 2):
    got = judge_lib.pairwise_reward_fn(judge, verdicts=("A", "B"), opponents=k)(prompts, completions, group_size=g)
    want = np.zeros(len(completions))
    for b in range(2):
      pairs = pairwise_judge.circular_pairs(g, k)
      wins = {i: [] for i in range(g)}
      for i, j in pairs:
        q = prompts[b * g]
        text = lambda x, y: judge_lib.PAIRWISE_TEMPLATE.format(question=q, a=completions[b * g + x],  # noqa: E731
                                                               b=completions[b * g + y])
        p_ij, enc = _hf_first_verdict(model, hf_tok, text(i, j), ids)
        assert enc == judge.encode([text(i, j)])[0]       # the same prompt tokens as transformers renders them
        p_ji, _ = _hf_first_verdict(model, hf_tok, text(j, i), ids)
        pref = (p_ij + 1 - p_ji) / 2
        wins[i].append(pref)
        wins[j].append(1 - pref)
      want[b * g:(b + 1) * g] = [np.mean(wins[i]) for i in range(g)]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

  items = ["Is the response a number?", "Is the response correct?"]
  got = judge_lib.rubric_reward_fn(judge, items=items, weights=(1.0, 3.0))(prompts, completions)
  yes_no = judge.verdict_ids(("Yes", "No"))
  want = [(1.0 * _hf_first_verdict(model, hf_tok, judge_lib.RUBRIC_TEMPLATE.format(question=q, response=c,
                                                                                    item=items[0]), yes_no)[0]
           + 3.0 * _hf_first_verdict(model, hf_tok, judge_lib.RUBRIC_TEMPLATE.format(question=q, response=c,
                                                                                     item=items[1]), yes_no)[0]) / 4
          for q, c in zip(prompts, completions)]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_judge_refusals_and_overlong_prompts(tiny_judge):
  judge = judge_lib.Judge.load(tiny_judge, max_len=64, chunk_rows=8)
  with pytest.raises(judge_lib.JudgeError, match=r"verdict 'Answer A' is \d+ tokens"):
    judge.verdict_ids(("Answer A", "B"))
  with pytest.raises(judge_lib.JudgeError, match="two different"):
    judge.verdict_ids(("A", "A"))
  fn = judge_lib.pairwise_reward_fn(judge, opponents=0)
  got = fn(["q"] * 2, ["short", "word " * 200], group_size=2)      # the second is far over 64 tokens
  assert np.isnan(got).all() and judge.skipped == 2               # both orders of the one pair are missing


def _config_with(rewards):
  from configs import grpo_tpu
  c = grpo_tpu.get_config("runlocal")
  c.tokenizer.train_records = 200
  c.rewards = rewards
  return c


def test_launcher_checks_and_builds_judge_rewards(tiny_judge):
  from launch import reward_setup
  from rewards import combine
  good = ({"name": "judge", "fn": "pairwise_judge", "kwargs": {"path": tiny_judge, "opponents": 2}},
          {"name": "rubric", "fn": "rubric_judge", "kwargs": {"path": tiny_judge, "items": ["Is it a number?"]}})
  c = _config_with(good)
  reward_setup.check_specs(c.rewards, "rewards", tokenizer_vocab=None, group_size=8)   # passes
  fns = combine.build(reward_setup.reward_specs(c))
  prompts, completions = ["what is 1 + 2?"] * 8, ["3", "4", "5", "6", "three", "2", "1", "0"]
  r = combine.compute(fns, prompts, completions, num_generations=8, group_size=8)
  assert r.values.shape == (1, 8, 2) and np.all((r.values > 0) & (r.values < 1))
  assert fns[0][1].fn.judge is fns[1][1].fn.judge               # one judge loaded for both specs
  bad = [({"opponents": 3}, r"'rewards\[0\]\.kwargs\.opponents'"),
         ({"verdicts": ("Answer A", "B")}, r"'rewards\[0\]\.kwargs\.verdicts'.*not one"),
         ({"template": "Q {question} {a}"}, r"'rewards\[0\]\.kwargs\.template'.*missing \['b'\]"),
         ({"temperature": 1.0}, r"'rewards\[0\]\.kwargs'.*unknown keys \['temperature'\]"),
         ({"path": "/nonexistent/judge"}, r"'rewards\[0\]\.kwargs\.path'.*no config\.json")]
  for change, match in bad:
    spec = {"name": "judge", "fn": "pairwise_judge", "kwargs": {"path": tiny_judge, **change}}
    with pytest.raises(SystemExit, match=match) as e:
      reward_setup.check_specs([spec], "rewards", tokenizer_vocab=None, group_size=7)
    assert "\n" not in str(e.value)


def test_judge_eval_figures(tiny_judge, tmp_path):
  from launch import judge_eval
  data = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, os.pardir, "shared", "data",
                      "hh-rlhf-harmless-base")
  if not os.path.isdir(data):
    pytest.skip("the shared HH-RLHF data is not beside the checkout")
  hh = judge_eval.read_pairs(data, "test", 3)      # HH-RLHF transcripts split into (conversation, chosen, rejected)
  assert len(hh) == 3 and all(q.endswith("Assistant:") and c != r and ref is None for q, c, r, ref in hh)
  rows = [{"prompt": f"what is {a} + {a}?", "chosen": str(2 * a), "rejected": str(2 * a + 1)} for a in range(5)]
  (tmp_path / "ok").mkdir()
  (tmp_path / "ok" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  pairs = judge_eval.read_pairs(str(tmp_path / "ok"), "test", 10)
  judge = judge_lib.Judge.load(tiny_judge, max_len=256, chunk_rows=8)
  m = judge_eval.evaluate(judge, pairs, template=judge_lib.PAIRWISE_TEMPLATE, verdicts=("A", "B"))
  p = judge.first_verdict_probs([judge_lib.PAIRWISE_TEMPLATE.format(question=q, a=x, b=y)
                                 for q, c, r, _ in pairs for x, y in ((c, r), (r, c))], ("A", "B")).reshape(-1, 2)
  assert m["pairs"] == 5 and m["skipped"] == 0
  pref = (p[:, 0] + 1 - p[:, 1]) / 2
  assert m["pair_accuracy"] == pytest.approx(np.mean((pref > 0.5) + 0.5 * (pref == 0.5)))
  assert m["position_bias_rate"] == pytest.approx(np.mean((p[:, 0] > 0.5) != (p[:, 1] < 0.5)))
  assert m["first_position_rate"] == pytest.approx(np.mean(p > 0.5))
  (tmp_path / "test.jsonl").write_text('{"chosen": 1}\n')
  with pytest.raises(SystemExit, match=r"^launch.judge_eval --data: .*test.jsonl:1: a row needs string"):
    judge_eval.read_pairs(str(tmp_path), "test", 3)


def test_reference_slot_takes_each_rows_answer(tiny_judge):
  """A template with {reference} reads the reward call's ``answers`` (reference-guided judging): the pairwise and
  rubric rewards equal the judge's probabilities on prompts formatted by hand; no answers is refused."""
  judge = judge_lib.Judge.load(tiny_judge, chunk_rows=8)
  g, prompts = 2, ["q1", "q1", "q2", "q2"]
  completions, answers = ["3", "4", "5", "five"], ["3", "3", "5", "5"]
  pair_t = "Reference: {reference}\n" + judge_lib.PAIRWISE_TEMPLATE
  got = judge_lib.pairwise_reward_fn(judge, template=pair_t)(prompts, completions, group_size=g, answers=answers)
  p = judge.first_verdict_probs([pair_t.format(question=prompts[b], reference=answers[b], a=x, b=y)
                                 for b in (0, 2) for x, y in ((completions[b], completions[b + 1]),
                                                              (completions[b + 1], completions[b]))], ("A", "B"))
  pref = (p[0::2] + 1 - p[1::2]) / 2
  np.testing.assert_allclose(got, np.stack([pref, 1 - pref], 1).reshape(-1), rtol=1e-5)
  rub_t = judge_lib.RUBRIC_TEMPLATE + "\nReference: {reference}"
  got = judge_lib.rubric_reward_fn(judge, items=["Correct?"], template=rub_t)(prompts, completions, answers=answers)
  want = judge.first_verdict_probs([rub_t.format(question=q, response=c, item="Correct?", reference=a)
                                    for q, c, a in zip(prompts, completions, answers)], ("Yes", "No"))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  with pytest.raises(ValueError, match="reference.*no answers"):
    judge_lib.pairwise_reward_fn(judge, template=pair_t)(prompts, completions, group_size=g)
  judge_lib.check_template(pair_t, judge_lib.PAIRWISE_SLOTS)
  with pytest.raises(judge_lib.JudgeError, match=r"unknown \['answer'\]"):
    judge_lib.check_template(pair_t.replace("{reference}", "{answer}"), judge_lib.PAIRWISE_SLOTS)


def test_the_judge_is_shown_the_examples_questions_not_the_rendered_prompts(tiny_judge):
  """With ``questions`` (what the RL loop passes: the data's own prompts), the judge prompts hold them, not the
  policy's rendered prompts (its prompt format or chat template); the prompt batches carry them."""
  from rlj.data import encoding  # pylint: disable=g-import-not-at-top
  judge = judge_lib.Judge.load(tiny_judge, chunk_rows=8)
  rendered, questions = ["<user>q1</user>\n"] * 2 + ["<user>q2</user>\n"] * 2, ["q1", "q1", "q2", "q2"]
  completions = ["3", "4", "5", "five"]
  pair = judge_lib.pairwise_reward_fn(judge)
  np.testing.assert_allclose(pair(rendered, completions, group_size=2, questions=questions),
                             pair(questions, completions, group_size=2), rtol=1e-6)
  assert not np.allclose(pair(rendered, completions, group_size=2), pair(questions, completions, group_size=2))
  rub = judge_lib.rubric_reward_fn(judge, items=["Correct?"])
  np.testing.assert_allclose(rub(rendered, completions, questions=questions), rub(questions, completions), rtol=1e-6)
  element = {"tokens": np.array([5], np.int32), "prompt": rendered[0], "question": "q1", "answer": "3", "index": 0,
             "truncated": False}
  batch = encoding.collate_prompts([element], batch_size=2, buckets=(4,), pad_id=0)
  assert list(batch["question"][:1]) == ["q1"] and list(batch["prompt"][:1]) == [rendered[0]]


def test_rubric_items_from_the_data_equal_a_per_item_loop(tiny_judge):
  """items='data': each row is scored on its own weighted items; the score equals a loop over its items."""
  judge = judge_lib.Judge.load(tiny_judge, chunk_rows=8)
  prompts, completions = ["q1", "q1", "q2"], ["7", "seven", "no"]
  rubrics = [[{"item": "Is it a number?", "weight": 1.0}, {"item": "Is it 7?", "weight": 3.0}]] * 2 + \
            [[{"item": "Is it polite?", "weight": 2.0}]]
  fn = judge_lib.rubric_reward_fn(judge, items="data")
  got = fn(prompts, completions, rubrics=[json.dumps(r) for r in rubrics])
  want = []
  for q, c, rub in zip(prompts, completions, rubrics):
    p = [judge.first_verdict_probs([judge_lib.RUBRIC_TEMPLATE.format(question=q, response=c, item=it["item"])],
                                   ("Yes", "No"))[0] for it in rub]
    want.append(sum(it["weight"] * x for it, x in zip(rub, p)) / sum(it["weight"] for it in rub))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  with pytest.raises(ValueError, match="use data.source=rubric"):
    fn(prompts, completions)
  with pytest.raises(judge_lib.JudgeError, match="drop kwargs.weights"):
    judge_lib.rubric_reward_fn(judge, items="data", weights=[1.0])
  from launch import judge_setup
  spec = {"name": "r", "fn": "rubric_judge", "kwargs": {"path": tiny_judge, "items": "data"}}
  judge_setup.check(spec, "rewards[0]", group_size=2, data_source="rubric")
  with pytest.raises(SystemExit, match=r"^config key 'rewards\[0\]\.kwargs\.items': 'data' .*use data.source=rubric"):
    judge_setup.check(spec, "rewards[0]", group_size=2, data_source="generic")


def test_judge_training_pairs_and_bos(tiny_judge):
  """launch.make_judge_data: the target names the correct answer's position, the wrong answer differs; a judge's
  BOS follows add_bos (an rlj SFT job's judge saw BOS + prompt)."""
  from launch import make_judge_data
  from rlj.data import synthetic
  task = synthetic.ArithmeticTask(num_records=40, seed=0, levels=(1,))
  sft, pairs = make_judge_data.records(task, np.random.default_rng(0))
  for row, pair in zip(sft, pairs):
    a, b = (pair["chosen"], pair["rejected"]) if row["answer"] == "1" else (pair["rejected"], pair["chosen"])
    assert row["prompt"] == make_judge_data.TEMPLATE.format(question=pair["prompt"], a=a, b=b)
    assert pair["chosen"] != pair["rejected"] and pair["chosen"].endswith("#### " + pair["chosen"].split()[-1])
  assert {r["answer"] for r in sft} == {"1", "2"}
  sft_ref, pairs_ref = make_judge_data.records(task, np.random.default_rng(0), reference=True)
  assert [p["reference"] for p in pairs_ref] == [p["chosen"] for p in pairs_ref]
  assert all(f"Reference = {p['chosen']}\n" in r["prompt"] for r, p in zip(sft_ref, pairs_ref))
  judge = judge_lib.Judge.load(tiny_judge, add_bos=True, chat=False)
  bos = judge.tokenizer.bos_id
  assert judge.encode(["x"])[0][0] == bos
  judge.add_bos = False
  assert judge.encode(["x"])[0][0] != bos


def test_judge_pairs_from_a_policys_mistakes(tmp_path):
  """make_judge_data --policy: a question with wrong answers the policy wrote is paired with one of them about half
  the time (a made-up one otherwise); a workdir without an SFT checkpoint stops in one line."""
  from launch import make_judge_data
  from rlj.data import synthetic
  task = synthetic.ArithmeticTask(num_records=400, seed=0, levels=(1,))
  written = {task[i]["prompt"]: [f"policy wrong {i}", f"policy wrong {i}b"] for i in range(0, 400, 2)}
  _, pairs = make_judge_data.records(task, np.random.default_rng(0), policy_wrong=written)
  from_policy = np.array([p["rejected"].startswith("policy wrong") for p in pairs])
  has = np.array([p["prompt"] in written for p in pairs])           # questions repeat: key by the question
  assert has.any() and not has.all() and not from_policy[~has].any()   # none written: always made up
  assert 0.35 < from_policy[has].mean() < 0.65
  assert all(p["rejected"] in written[p["prompt"]] for p in pairs if p["rejected"].startswith("policy wrong"))
  with pytest.raises(SystemExit, match="does not exist; pass the workdir of a runlocal RL job") as e:
    make_judge_data.policy_wrong_answers(str(tmp_path), [task], samples=2, seed=0)
  assert "\n" not in str(e.value)
