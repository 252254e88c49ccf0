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
def records(task, rng, *, reference: bool = False) -> tuple[list[dict], list[dict]]:
  """(SFT records, preference pairs) of every question of ``task``; with ``reference`` the judge prompt is
  ``REFERENCE_TEMPLATE`` with the question's answer and each pair carries it as ``reference``."""
  sft, pairs = [], []
  template = REFERENCE_TEMPLATE if reference else TEMPLATE
  for i in range(len(task)):
    r = task[i]
    good, bad = r["answer"], wrong_answer(r["answer"], rng)
    first_good = bool(rng.integers(0, 2))
    a, b = (good, bad) if first_good else (bad, good)
    sft.append({"prompt": template.format(question=r["prompt"], a=a, b=b, reference=good),
                "answer": VERDICTS[0 if first_good else 1]})
    pairs.append({"prompt": r["prompt"], "chosen": good, "rejected": bad, **({"reference": good} if reference else {})})
  return sft, pairs


def write(out: str, *, train_records: int, test_records: int, seed: int = 0, reference: bool = False) -> None:
  import numpy as np
  from rlj.data import synthetic
  rng = np.random.default_rng(seed)
  train, _ = records(synthetic.ArithmeticTask(num_records=train_records, seed=seed, levels=(1,)), rng,
                     reference=reference)
  test, pairs = records(synthetic.ArithmeticTask(num_records=test_records, seed=seed + 1000003, levels=(1,)), rng,
                        reference=reference)
  os.makedirs(os.path.join(out, "pairs"), exist_ok=True)
  for path, rows in ((os.path.join(out, "train.jsonl"), train), (os.path.join(out, "test.jsonl"), test),
                     (os.path.join(out, "pairs", "test.jsonl"), pairs)):
    with open(path, "w") as f:
      f.writelines(json.dumps(row) + "\n" for row in rows)


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  if not f.out:
    raise SystemExit("launch.make_judge_data --out: required, the folder to write")
  write(f.out, train_records=f.train_records, test_records=f.test_records, seed=f.seed, reference=f.reference)
  print(f"wrote {f.out}/train.jsonl, test.jsonl and pairs/test.jsonl", flush=True)


if __name__ == "__main__":
  flags.DEFINE_string("out", None, "output folder")
  flags.DEFINE_integer("train_records", 8000, "training questions")
  flags.DEFINE_integer("test_records", 256, "held-out questions")
  flags.DEFINE_integer("seed", 0, "seed of the questions and of the wrong answers")
  flags.DEFINE_bool("reference", False, "reference-guided judge data: REFERENCE_TEMPLATE, with the worked answer")
  app.run(main)
