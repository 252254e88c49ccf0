"""A frozen judge language model served as a reward: pairwise win rates and rubric items (``rewards.pairwise_judge``).

The judge is any Hugging Face checkpoint the policy loader reads (``models.hf``), placed on the job's mesh with the
same sharding rules, with its own tokenizer and chat template. A reward call

1. renders one judge prompt per judged item from a ``str.format`` template (pairwise: ``{question}``, ``{a}``,
   ``{b}``; rubric: ``{question}``, ``{response}``, ``{item}``; ``{question}`` is the example's own prompt text
   (``questions``, not the policy's rendered prompt with its format or chat template); either may add
   ``{reference}``, the row's reference answer from the data: the reference-guided judge of "Judging LLM-as-a-Judge
   with MT-Bench and Chatbot Arena" (arXiv:2306.05685), which "No Free Labels" (arXiv:2503.05061) finds a judge
   needs on questions it cannot answer itself), inside the judge's chat template as a user turn when it has one
   (``chat=True``), else as plain text;
2. encodes them (BOS as the tokenizer adds it), left-pads them into rows of a length bucket (powers of two up to
   ``max_len``) and runs the jitted forward in fixed chunks of ``chunk_rows`` rows, projecting only the last
   position to logits: one compilation per length bucket, no host loop over pairs;
3. reads P(first verdict) from the two verdict tokens' logits and combines them on device.

A prompt longer than ``max_len`` tokens is not truncated (that would cut the completion being judged): its verdict
is NaN, so the rows it concerns are missing, and ``Judge.skipped`` counts them (with a warning).

Usage:
  judge = Judge.load(path, mesh=mesh, rules=rules)
  fn = pairwise_reward_fn(judge, verdicts=("A", "B"), opponents=0)        # fn(prompts, completions, group_size=G)
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models.transformer import Transformer
from rewards import pairwise_judge
from rlj import logprobs

_log = logging.getLogger(__name__)

PAIRWISE_TEMPLATE = ("Which response answers the question better?\n\nQuestion: {question}\n\nResponse A: {a}\n\n"
                     "Response B: {b}\n\nAnswer with one letter, A or B.")
RUBRIC_TEMPLATE = ("Question: {question}\n\nResponse: {response}\n\n{item}\nAnswer Yes or No.")


PAIRWISE_SLOTS = ("question", "a", "b")
RUBRIC_SLOTS = ("question", "response", "item")
OPTIONAL_SLOTS = ("reference",)   # the row's reference answer (``answers``), for reference-guided judging


class JudgeError(ValueError):
  """A judge that cannot be used as configured (one line: what and the fix)."""


def template_slots(template: str) -> set[str]:
  """The ``{name}`` slots of a ``str.format`` template."""
  import string
  try:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
  except ValueError as e:
    raise JudgeError(f"template {template[:60]!r}...: {e} (write a literal brace as {{{{ or }}}})") from None


def check_template(template: str, slots: Sequence[str]) -> None:
  """Raises ``JudgeError`` unless ``template`` has each of ``slots`` and nothing but them and ``OPTIONAL_SLOTS``."""
  used = template_slots(template)
  unknown, missing = sorted(used - set(slots) - set(OPTIONAL_SLOTS)), sorted(set(slots) - used)
  if unknown or missing:
    raise JudgeError(f"template slots: it has {sorted(used)}, a judge prompt needs exactly {list(slots)} "
                     f"(optionally {list(OPTIONAL_SLOTS)}) "
                     f"({'unknown ' + str(unknown) if unknown else 'missing ' + str(missing)})")


def _references(template: str, answers, n: int) -> list:
  """Per-row values of the ``{reference}`` slot: the rows' ``answers`` when the template names it, else ""."""
  if "reference" not in template_slots(template):
    return [""] * n
  if answers is None or len(answers) != n:
    raise ValueError(f"the judge template has a {{reference}} slot but the reward call got "
                     f"{'no' if answers is None else len(answers)} answers for {n} rows")
  return [str(a) for a in answers]


@dataclasses.dataclass
class Judge:
  """A loaded judge: its model, params (on the mesh), tokenizer and the jitted last-position logits."""
  model: Any
  params: Any
  tokenizer: Any
  path: str = ""
  max_len: int = 1024
  chunk_rows: int = 16
  chat: bool = True
  add_bos: bool | None = None     # None: what the tokenizer adds to a plain text (chat templates write their own)
  skipped: int = 0

  @classmethod
  def load(cls, path: str, *, mesh=None, rules=None, **kwargs) -> "Judge":
    """Reads the checkpoint folder ``path`` (config.json, safetensors, tokenizer files) onto ``mesh``."""
    from models import hf
    from rlj import sharding
    from rlj.data import tokenizer as tok_lib
    tok = tok_lib.load(path)
    shard = None
    if mesh is not None:
      shard = lambda names, shapes: sharding.tree_shardings(names, shapes, mesh, rules or sharding.DEFAULT_RULES)  # noqa
    mc, params = hf.load_hf_checkpoint(path, shardings=shard)
    return cls(Transformer(mc), params, tok, path=str(path), **kwargs)

  def __post_init__(self):
    model = self.model

    def last_logits(params, tokens, mask, ids):
      logits, _ = model.apply({"params": params}, tokens, logprobs.positions_from_mask(mask), mask,
                              logits_at=slice(-1, None))
      return logits[:, -1][:, ids]                                   # [rows, 2]: the verdict tokens only

    self._logits = jax.jit(last_logits)

  # ------------------------------------------------------------------------------------------------- tokens
  def verdict_ids(self, verdicts: Sequence[str]) -> tuple[int, int]:
    """The ids of the two verdict strings; each must be one token of the judge's tokenizer."""
    return self.verdict_ids_of(self.tokenizer, verdicts, self.path)

  @staticmethod
  def verdict_ids_of(tokenizer, verdicts: Sequence[str], path: str = "") -> tuple[int, int]:
    """``verdict_ids`` for a tokenizer alone (the launcher checks verdicts before loading the judge)."""
    if len(verdicts) != 2 or verdicts[0] == verdicts[1]:
      raise JudgeError(f"verdicts {list(verdicts)}: give two different strings, e.g. ('A', 'B')")
    ids = []
    for v in verdicts:
      tid, enc = tokenizer.single_token(v)
      if tid is None:
        raise JudgeError(f"verdict {v!r} is {len(enc)} tokens {enc} of the judge's tokenizer ({path}), not one; "
                         f"pick verdict strings that are single tokens (e.g. 'A' / 'B', or ' A' / ' B')")
      ids.append(tid)
    return ids[0], ids[1]

  def render(self, text: str) -> str:
    """``text`` as a user turn of the judge's chat template (with the generation prompt), or as it is."""
    if self.chat and self.tokenizer.chat_template is not None:
      return self.tokenizer.chat_template.render([{"role": "user", "content": text}], add_generation_prompt=True)
    return text

  def encode(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of the rendered prompts; BOS as ``add_bos`` says (None: the tokenizer's default for plain text,
    none inside a chat template, which writes its own). A judge trained by an rlj SFT job saw BOS + prompt when
    its ``data.add_bos`` was on: pass ``add_bos=True`` for it."""
    if self.add_bos is not None:
      add_bos = self.add_bos and self.tokenizer.bos_id is not None
    else:
      add_bos = bool(getattr(self.tokenizer, "add_bos_default", False)) and self.tokenizer.bos_id is not None
      if self.chat and self.tokenizer.chat_template is not None:
        add_bos = False
    return [self.tokenizer.encode(self.render(t), add_bos=add_bos) for t in texts]

  # ------------------------------------------------------------------------------------------------- scores
  def first_verdict_probs(self, texts: Sequence[str], verdicts: Sequence[str]) -> np.ndarray:
    """P(first verdict) [M] float32 for M judge prompts; NaN for a prompt longer than ``max_len`` tokens."""
    ids = jnp.asarray(self.verdict_ids(verdicts), jnp.int32)
    encoded = self.encode(texts)
    out = np.full(len(encoded), np.nan, np.float32)
    fits = [i for i, e in enumerate(encoded) if len(e) <= self.max_len]
    if len(fits) < len(encoded):
      self.skipped += len(encoded) - len(fits)
      _log.warning("judge %s: %d of %d prompts exceed max_len=%d tokens; their verdicts are missing (NaN)",
                   self.path, len(encoded) - len(fits), len(encoded), self.max_len)
    if not fits:
      return out
    length = _bucket(max(len(encoded[i]) for i in fits), self.max_len)
    pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
    n = self.chunk_rows
    rows = -(-len(fits) // n) * n
    tokens = np.full((rows, length), pad, np.int32)
    mask = np.zeros((rows, length), np.int32)
    for r, i in enumerate(fits):      # left padding: the last position is every row's last prompt token
      tokens[r, length - len(encoded[i]):] = encoded[i]
      mask[r, length - len(encoded[i]):] = 1
    mask[len(fits):, -1] = 1          # filler rows: one real token, results dropped
    two = [self._logits(self.params, tokens[s:s + n], mask[s:s + n], ids) for s in range(0, rows, n)]
    z = np.concatenate(jax.device_get(two))[:len(fits)]
    out[fits] = np.asarray(jax.nn.sigmoid(z[:, 0] - z[:, 1]), np.float32)
    return out


def _bucket(length: int, max_len: int) -> int:
  """The smallest power of two >= ``length`` (at least 64), capped at ``max_len``."""
  b = 64
  while b < length:
    b *= 2
  return min(b, max_len) if length <= max_len else length


def _shown(prompts, questions):
  """The question texts a judge is shown: the examples' own prompts (``questions``, which the RL loop passes: the
  data's prompt without the policy's prompt format or chat template) when given, else the prompts as called."""
  return prompts if questions is None else questions


def pairwise_reward_fn(judge: Judge, *, template: str = PAIRWISE_TEMPLATE, verdicts: Sequence[str] = ("A", "B"),
                       opponents: int = 0, hard: bool = False):
  """Pref-GRPO win rates from the judge: ``fn(prompts, completions, *, group_size, **_) -> [N]`` (module docstring
  of ``rewards.pairwise_judge``). Every judged pair is scored in both orders; ``opponents`` k > 0 judges each
  completion against k others on the circular schedule."""
  verdict_ids = judge.verdict_ids(verdicts)     # a multi-token verdict fails here, when the reward is built
  del verdict_ids
  compiled = {}   # group size -> (its pairs, the jitted win rates over them)

  def programs(g: int):
    if g not in compiled:
      pairs = pairwise_judge.circular_pairs(g, opponents)
      compiled[g] = pairs, jax.jit(functools.partial(pairwise_judge.win_rates, pairs=pairs, group_size=g, hard=hard))
    return compiled[g]

  def fn(prompts, completions, *, group_size: int | None = None, answers=None, questions=None, **_) -> np.ndarray:
    prompts = _shown(prompts, questions)
    n = len(completions)
    if not group_size or group_size < 2 or n % group_size:
      raise ValueError(f"a pairwise judge compares the completions of a prompt: {n} rows do not split into groups "
                       f"of group_size={group_size} >= 2")
    g = int(group_size)
    pairs, win_rates = programs(g)
    refs = _references(template, answers, n)
    texts = []
    for b in range(n // g):
      question, ref = prompts[b * g], refs[b * g]
      for i, j in pairs:
        ci, cj = completions[b * g + i], completions[b * g + j]
        texts.append(template.format(question=question, a=ci, b=cj, reference=ref))
        texts.append(template.format(question=question, a=cj, b=ci, reference=ref))
    p = judge.first_verdict_probs(texts, verdicts).reshape(n // g, len(pairs), 2)
    prefs = pairwise_judge.debiased(p[..., 0], p[..., 1])
    return np.asarray(win_rates(prefs), np.float32).reshape(-1)

  fn.judge = judge
  return fn


def rubric_reward_fn(judge: Judge, *, items: Sequence[str] | str, weights: Sequence[float] | None = None,
                     template: str = RUBRIC_TEMPLATE, verdicts: Sequence[str] = ("Yes", "No")):
  """A rubric's score per completion: the judge's P(first verdict) for each item, weighted
  (``rewards.pairwise_judge.rubric_score``): ``fn(prompts, completions, **_) -> [N]``.

  ``items="data"``: each row's own rubric, the ``rubrics`` the reward call gets (per row, the JSON list of
  ``{"item", "weight"}`` that a ``data.source=rubric`` dataset carries, ``rlj.data.jsonl.rubric_record``); a
  row's score is then sum_i w_i p_i / sum_i w_i over its own items."""
  judge.verdict_ids(verdicts)
  if isinstance(items, str):
    if items != "data":
      raise JudgeError(f"items {items!r}: give a list of questions, or 'data' for each example's own rubric")
    if weights is not None:
      raise JudgeError("weights: with items='data' each rubric item carries its own weight; drop kwargs.weights")
    return _data_rubric_fn(judge, template, verdicts)
  items = [str(i) for i in items]
  if not items:
    raise JudgeError("a rubric judge needs at least one item (kwargs.items)")
  weights = [1.0] * len(items) if weights is None else [float(w) for w in weights]
  if len(weights) != len(items) or min(weights) < 0 or sum(weights) <= 0:
    raise JudgeError(f"weights {weights}: give one non-negative weight per item ({len(items)}), not all 0")

  def fn(prompts, completions, *, answers=None, questions=None, **_) -> np.ndarray:
    prompts = _shown(prompts, questions)
    refs = _references(template, answers, len(completions))
    texts = [template.format(question=q, response=c, item=item, reference=r)
             for q, c, r in zip(prompts, completions, refs) for item in items]
    p = judge.first_verdict_probs(texts, verdicts).reshape(len(completions), len(items))
    return np.asarray(pairwise_judge.rubric_score(jnp.asarray(p), jnp.asarray(weights)), np.float32)

  fn.judge = judge
  return fn


def _data_rubric_fn(judge: Judge, template: str, verdicts: Sequence[str]):
  """``rubric_reward_fn`` with ``items="data"``: every row's items from its ``rubrics`` (JSON strings)."""
  import json

  def fn(prompts, completions, *, rubrics=None, answers=None, questions=None, **_) -> np.ndarray:
    prompts = _shown(prompts, questions)
    n = len(completions)
    if rubrics is None or len(rubrics) != n:
      raise ValueError("a rubric judge with items='data' reads each example's rubric, but the reward call got "
                       f"{'none' if rubrics is None else len(rubrics)} for {n} rows; use data.source=rubric")
    refs = _references(template, answers, n)
    rows = [json.loads(r) if isinstance(r, str) else r for r in rubrics]
    texts = [template.format(question=q, response=c, item=it["item"], reference=ref)
             for q, c, ref, row in zip(prompts, completions, refs, rows) for it in row]
    flat = judge.first_verdict_probs(texts, verdicts)
    width = max((len(row) for row in rows), default=0)   # rows padded to the longest rubric: weight 0, P 0
    p, w = np.zeros((n, width), np.float32), np.zeros((n, width), np.float32)
    start = 0
    for r, row in enumerate(rows):
      p[r, :len(row)] = flat[start:start + len(row)]
      w[r, :len(row)] = [float(it.get("weight", 1.0)) for it in row]
      start += len(row)
    # NaN where an item's prompt was too long (its P is NaN)
    return np.asarray(pairwise_judge.rubric_score(jnp.asarray(p), jnp.asarray(w)), np.float32)

  fn.judge = judge
  return fn
