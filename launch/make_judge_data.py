r"""Pairwise-judge training data from the synthetic arithmetic task, whose scorer is known.

  python -m launch.make_judge_data --out runs/judge-data

Each record pairs a question's correct worked answer with a wrong one (``wrong_answer``: the result moved, the
answer cut short, or its working repeated without a final line), in random order, inside the judge template
(``TEMPLATE``, the ``template`` of a ``pairwise_judge`` reward with the verdicts "1" / "2"; with ``--reference``,
``REFERENCE_TEMPLATE``, which also shows the question's worked answer); the target is the position of the correct
answer. Writes

  <out>/train.jsonl, <out>/test.jsonl   {"prompt": judge prompt, "answer": "1" | "2"}  (an SFT job's generic data)
  <out>/pairs/test.jsonl                {"prompt": question, "chosen": correct, "rejected": wrong[, "reference"]}
                                        (launch.judge_eval)

The test questions come from the task's held-out records (another seed), as the RL job's evaluation does.

  python -m launch.make_judge_data --out runs/judge-data --reference --policy runs/grpo-local

``--policy`` takes wrong answers from a policy instead: the SFT checkpoint a runlocal RL job starts from samples
``--samples`` completions per question, the task's scorer marks the wrong ones, and half the questions are paired
with one of those (the mistakes the judge will be asked about once RL starts), the rest with made-up ones.
"""
from __future__ import annotations

import json
import os

from absl import app, flags

TEMPLATE = "{question}\n1 = {a}\n2 = {b}\nWhat is the result?"
# Reference-guided (``--reference``): the question's worked answer, which the RL job passes as ``answers``.
REFERENCE_TEMPLATE = "{question}\nReference = {reference}\n1 = {a}\n2 = {b}\nWhich matches?"
VERDICTS = ("1", "2")


def wrong_answer(answer: str, rng) -> str:
  """A wrong version of ``answer`` ("... = R\n#### R"): 40% of the time the result moved by 1 to 9 in both places,
  else the answer cut off before its end, its working repeated without a final line (what a policy that runs out
  of tokens writes), or the answer running on past its final line with another "####" line, so that the judge
  has seen the failures a policy drifts into."""
  work, final = answer.rsplit("\n#### ", 1)
  kind = rng.random()
  if kind < 0.4:
    wrong = int(final) + int(rng.choice([-1, 1])) * int(rng.integers(1, 10))
    head, _, _ = work.rpartition("= ")
    return f"{head}= {wrong}\n#### {wrong}"
  if kind < 0.6:
    return answer[:int(rng.integers(1, len(answer) - 1))]
  if kind < 0.8:
    return (work + " ") * 3
  return answer + "\n#### " + (str(int(rng.integers(0, 100))) if rng.random() < 0.5 else "")


def records(task, rng, *, reference: bool = False, policy_wrong: dict | None = None,
            policy_fraction: float = 0.5) -> tuple[list[dict], list[dict]]:
  """(SFT records, preference pairs) of every question of ``task``; with ``reference`` the judge prompt is
  ``REFERENCE_TEMPLATE`` with the question's answer and each pair carries it as ``reference``. ``policy_wrong``:
  {question: wrong completions a policy wrote}; a question that has some is paired with one of them, with probability
  ``policy_fraction``, instead of a made-up wrong answer (which keeps the failures a policy drifts into later)."""
  sft, pairs = [], []
  template = REFERENCE_TEMPLATE if reference else TEMPLATE
  for i in range(len(task)):
    r = task[i]
    written = (policy_wrong or {}).get(r["prompt"])
    good = r["answer"]
    if written and rng.random() < policy_fraction:
      bad = written[int(rng.integers(0, len(written)))]
    else:
      bad = wrong_answer(good, rng)
    first_good = bool(rng.integers(0, 2))
    a, b = (good, bad) if first_good else (bad, good)
    sft.append({"prompt": template.format(question=r["prompt"], a=a, b=b, reference=good),
                "answer": VERDICTS[0 if first_good else 1]})
    pairs.append({"prompt": r["prompt"], "chosen": good, "rejected": bad, **({"reference": good} if reference else {})})
  return sft, pairs


def policy_wrong_answers(workdir: str, tasks, *, samples: int, seed: int) -> dict[str, list[str]]:
  """{question: the wrong completions} of ``samples`` completions per question of ``tasks`` sampled from the
  policy a runlocal RL job ``workdir`` starts from (its SFT stage's checkpoint, its tokenizer), scored by the
  task's scorer (``rewards.verifiable.math_exact_match``), in the RL job's prompt format and sampler settings."""
  import tempfile

  import jax
  from configs import grpo_tpu
  from launch import builders, data_setup
  from rewards import combine, verifiable
  from rlj import evaluation
  ckpt, tok = os.path.join(workdir, "sft", "checkpoints"), os.path.join(workdir, "tokenizer.model")
  for path in (ckpt, tok):
    if not os.path.exists(path):
      raise SystemExit(f"launch.make_judge_data --policy: {path} does not exist; pass the workdir of a runlocal RL "
                       f"job (python -m launch.train --config configs/grpo_tpu.py:runlocal --workdir <dir>)")
  config = grpo_tpu.get_config("runlocal")
  config.init.policy, config.init.path = "rlj", ckpt
  config.tokenizer.kind, config.tokenizer.path = "sentencepiece", tok
  config.sampler.num_generations = samples
  with tempfile.TemporaryDirectory() as scratch:
    env = builders.build_env(config, scratch)
    sampler = builders.make_sampler(config, env)
    stops = sampler.config.stop_set
    out: dict[str, list[str]] = {}
    rng = jax.random.key(seed)
    for t, task in enumerate(tasks):
      batches = data_setup.prompt_iterator(config, env, split="train", batch_prompts=config.train.batch_prompts,
                                           seed=seed, num_epochs=1, shuffle=False, drop_remainder=False,
                                           source=task)
      for b, batch in enumerate(batches):
        ro = sampler.sample(env.params, batch["prompt_tokens"], batch["prompt_mask"],
                            jax.random.fold_in(rng, t * 100_000 + b))
        texts = evaluation.rollout_texts(env.tokenizer, ro, stops)
        questions = combine.repeat_per_prompt([str(q) for q in batch["question"]], samples)
        answers = combine.repeat_per_prompt([str(a) for a in batch["answer"]], samples)
        right = verifiable.math_exact_match(questions, texts, answers=answers)
        for q, text, ok in zip(questions, texts, right):
          if not ok and text.strip():
            out.setdefault(str(q), []).append(text)
  return out


def write(out: str, *, train_records: int, test_records: int, seed: int = 0, reference: bool = False,
          policy: str = "", samples: int = 4) -> dict:
  """Writes the data (module docstring); returns counts: questions whose wrong answer the policy wrote."""
  import numpy as np
  from rlj.data import synthetic
  rng = np.random.default_rng(seed)
  train_task = synthetic.ArithmeticTask(num_records=train_records, seed=seed, levels=(1,))
  test_task = synthetic.ArithmeticTask(num_records=test_records, seed=seed + 1000003, levels=(1,))
  wrong = policy_wrong_answers(policy, (train_task, test_task), samples=samples, seed=seed) if policy else {}
  train, _ = records(train_task, rng, reference=reference, policy_wrong=wrong)
  test, pairs = records(test_task, rng, reference=reference, policy_wrong=wrong)
  os.makedirs(os.path.join(out, "pairs"), exist_ok=True)
  for path, rows in ((os.path.join(out, "train.jsonl"), train), (os.path.join(out, "test.jsonl"), test),
                     (os.path.join(out, "pairs", "test.jsonl"), pairs)):
    with open(path, "w") as f:
      f.writelines(json.dumps(row) + "\n" for row in rows)
  count = lambda task: sum(task[i]["prompt"] in wrong for i in range(len(task)))  # noqa: E731
  return {"train": count(train_task), "test": count(test_task)}


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  if not f.out:
    raise SystemExit("launch.make_judge_data --out: required, the folder to write")
  n = write(f.out, train_records=f.train_records, test_records=f.test_records, seed=f.seed, reference=f.reference,
            policy=f.policy, samples=f.samples)
  print(f"wrote {f.out}/train.jsonl, test.jsonl and pairs/test.jsonl"
        + (f"; wrong answers written by the policy for {n['train']} of {f.train_records} training and {n['test']} "
           f"of {f.test_records} held-out questions" if f.policy else ""), flush=True)


if __name__ == "__main__":
  flags.DEFINE_string("out", None, "output folder")
  flags.DEFINE_integer("train_records", 8000, "training questions")
  flags.DEFINE_integer("test_records", 256, "held-out questions")
  flags.DEFINE_integer("seed", 0, "seed of the questions and of the wrong answers")
  flags.DEFINE_bool("reference", False, "reference-guided judge data: REFERENCE_TEMPLATE, with the worked answer")
  flags.DEFINE_string("policy", "", "a runlocal RL workdir: pair half the questions with a wrong answer its SFT "
                      "policy wrote (of --samples per question), where it wrote one; a made-up one the rest")
  flags.DEFINE_integer("samples", 4, "with --policy: completions sampled per question")
  app.run(main)
