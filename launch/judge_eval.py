r"""Check a pairwise judge before training with it: pair accuracy and position bias on held-out preference pairs.

  python -m launch.judge_eval --judge runs/judge-hf --data ../shared/data/hh-rlhf-harmless-base --num_pairs 200

Reads ``<data>/<split>.jsonl[.gz]`` in Anthropic HH-RLHF's layout (``{"chosen": transcript, "rejected":
transcript}``, split at their last shared "\n\nAssistant:" turn into the conversation and the two responses, as the
reward-model data is: ``rlj.data.tfds_builders.split_transcripts``), or rows ``{"prompt", "chosen", "rejected"}``
(plus ``"reference"``, the reference answer, for a template with a ``{reference}`` slot).
Every pair is judged in both orders with the reward's own prompt template, verdict tokens and length limit
(``rlj.judge``), and the command prints

  pair accuracy         P(chosen > rejected) > 1/2 (ties 1/2), with P debiased over both orders;
  position-bias rate    how often the verdict flips when A and B swap (the judge picks the same position twice);
  first-position rate   how often the judge says the first verdict, over all judged orders;
  skipped               pairs whose prompt exceeds ``--max_len`` (not scored).

Every mistake (a missing folder, a verdict of several tokens, a template without its slots) stops in one line.
"""
from __future__ import annotations

if __name__ == "__main__":   # before JAX starts: no TPU runtime probe on a host without TPUs (launch/malloc_env.py)
  from launch import malloc_env
  malloc_env.set_jax_platforms()

import os

from absl import app, flags, logging
import numpy as np

from rlj import judge as judge_lib

ASSISTANT = "\n\nAssistant:"


def fail(flag: str, msg: str):
  raise SystemExit(f"launch.judge_eval --{flag}: {msg}")


def read_pairs(data: str, split: str, limit: int) -> list[tuple[str, str, str, str | None]]:
  """``(question, chosen, rejected, reference or None)`` of the first ``limit`` rows of ``data``'s ``split``."""
  from rlj.data import jsonl
  from rlj.data.tfds_builders import split_transcripts
  files = [os.path.join(data, split + ext) for ext in (".jsonl", ".jsonl.gz")]
  path = next((f for f in files if os.path.isfile(f)), None)
  if path is None:
    fail("data", f"no {split}.jsonl or {split}.jsonl.gz in {data!r}; pass a folder of HH-RLHF-style JSONL files")
  out = []
  try:
    for line_no, row in jsonl.read_jsonl(path):
      if len(out) >= limit:
        break
      where = f"{path}:{line_no}"
      if not isinstance(row.get("chosen"), str) or not isinstance(row.get("rejected"), str):
        fail("data", f"{where}: a row needs string 'chosen' and 'rejected' fields")
      ref = None if row.get("reference") is None else str(row["reference"])
      if "prompt" in row:
        out.append((str(row["prompt"]), row["chosen"], row["rejected"], ref))
      else:
        prompt, chosen, rejected = split_transcripts(row["chosen"], row["rejected"], where=where)
        out.append((prompt, chosen, rejected, ref))
  except (jsonl.JsonlError, ValueError) as e:
    fail("data", str(e))
  if not out:
    fail("data", f"{path!r} holds no pairs")
  return out


def evaluate(judge: judge_lib.Judge, pairs: list[tuple[str, str, str, str | None]], *, template: str,
             verdicts: tuple[str, str]) -> dict:
  """The judge's figures on ``pairs`` (module docstring)."""
  texts = []
  for q, chosen, rejected, ref in pairs:
    texts.append(template.format(question=q, a=chosen, b=rejected, reference=ref))
    texts.append(template.format(question=q, a=rejected, b=chosen, reference=ref))
  p = judge.first_verdict_probs(texts, verdicts).reshape(len(pairs), 2)
  ok = ~np.isnan(p).any(axis=1)
  p = p[ok]
  pref = 0.5 * (p[:, 0] + 1.0 - p[:, 1])                 # P(chosen > rejected), both orders
  wins = (pref > 0.5) + 0.5 * (pref == 0.5)
  chosen_first, chosen_second = p[:, 0] > 0.5, p[:, 1] < 0.5
  return {"pairs": int(ok.sum()), "skipped": int((~ok).sum()),
          "pair_accuracy": float(wins.mean()) if len(p) else float("nan"),
          "position_bias_rate": float((chosen_first != chosen_second).mean()) if len(p) else float("nan"),
          "first_position_rate": float((p > 0.5).mean()) if len(p) else float("nan")}


def define_flags() -> None:
  flags.DEFINE_string("judge", None, "the judge: a Hugging Face checkpoint folder (config.json, safetensors, tokenizer)")
  flags.DEFINE_string("data", None, "folder with <split>.jsonl[.gz] preference pairs (HH-RLHF layout)")
  flags.DEFINE_string("split", "test", "which file of --data")
  flags.DEFINE_integer("num_pairs", 200, "how many pairs (the first ones of the file)")
  flags.DEFINE_string("template", judge_lib.PAIRWISE_TEMPLATE, "the judge prompt, with {question}, {a}, {b}")
  flags.DEFINE_list("verdicts", ["A", "B"], "the two verdict strings (single tokens), the first meaning 'A is better'")
  flags.DEFINE_integer("max_len", 1024, "judge prompts longer than this many tokens are skipped")
  flags.DEFINE_enum("add_bos", "default", ["default", "true", "false"],
                    "BOS before each judge prompt: the tokenizer's default, or always / never (true for a judge an "
                    "rlj SFT job trained with data.add_bos)")


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  if not f["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if not f.judge or not os.path.isfile(os.path.join(f.judge, "config.json")):
    fail("judge", f"{f.judge!r} is not a Hugging Face checkpoint folder (no config.json)")
  if not f.data or not os.path.isdir(f.data):
    fail("data", f"{f.data!r} is not a folder")
  from rlj.data import prompts
  template = prompts.decode_escapes(f.template)     # \n typed on a command line is a newline
  try:
    judge_lib.check_template(template, judge_lib.PAIRWISE_SLOTS)
  except judge_lib.JudgeError as e:
    fail("template", str(e))
  pairs = read_pairs(f.data, f.split, f.num_pairs)
  if "reference" in judge_lib.template_slots(template) and any(p[3] is None for p in pairs):
    fail("template", f"it has a {{reference}} slot, but rows of {f.data!r} ({f.split}) have no 'reference' field; "
         f"add one per row or drop the slot")
  try:
    judge = judge_lib.Judge.load(f.judge, max_len=f.max_len,
                                 add_bos=None if f.add_bos == "default" else f.add_bos == "true")
    judge.verdict_ids(f.verdicts)
  except judge_lib.JudgeError as e:
    fail("verdicts", str(e))
  except (ValueError, FileNotFoundError, KeyError) as e:
    fail("judge", f"{f.judge!r}: {e}")
  m = evaluate(judge, pairs, template=template, verdicts=tuple(f.verdicts))
  print(f"judge {f.judge} on {m['pairs']} pairs of {f.data} ({f.split}; {m['skipped']} skipped, over "
        f"{f.max_len} tokens): pair accuracy {m['pair_accuracy']:.3f}, position-bias rate "
        f"{m['position_bias_rate']:.3f}, first-position rate {m['first_position_rate']:.3f}", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
