"""Observation turns as token ids: the only text a multi-turn rollout ever tokenizes after the prompt.

The model's turns are kept exactly as sampled; an observation (a tool's result, an environment's message) is
wrapped in turn markers and tokenized on its own, then appended. Two ways to wrap it:

- ``plain``: a ``str.format`` template with an ``{observation}`` slot, e.g.
  ``"<tool_response>{observation}</tool_response>"`` (for models that were not trained with a chat template).
- ``chat``: the checkpoint's chat template. Rendering ``[user, assistant A, <role> O]`` with the generation prompt
  and ``[user, assistant A]`` shows what the template writes after the assistant's content: its end-of-turn
  marker (which the model sampled itself as its stop token), then the observation's turn markers around ``O``,
  then the next assistant header. That text, with O replaced by the observation, is the observation turn. It is
  worked out once, from sentinel messages, so no earlier turn is ever rendered again (a template that rewrites
  earlier turns, as reasoning templates do with past thinking, cannot change tokens the model sampled).
"""
from __future__ import annotations

from typing import Sequence

_ASSISTANT, _OBSERVATION = "\x00RLJ-ASSISTANT\x00", "\x00RLJ-OBSERVATION\x00"


class ObservationError(ValueError):
  """A template that cannot wrap observations (one line)."""


class ObservationFormat:
  """Observation text -> token ids of its turn (module docstring).

  Args:
    tokenizer: the policy's tokenizer (``encode``, ``id_to_piece``).
    template: ``plain`` template with an ``{observation}`` slot; None to use ``chat_template``.
    chat_template: a ``rlj.data.chat.ChatTemplate``.
    role: the chat role observations are given ("tool"; "user" for templates without a tool role).
    end_ids: the ids that end a model turn (their text is what the template writes after an assistant message).
  """

  def __init__(self, tokenizer, *, template: str | None = None, chat_template=None, role: str = "tool",
               end_ids: Sequence[int] = ()):
    self.tokenizer = tokenizer
    if template is not None:
      if "{observation}" not in template:
        raise ObservationError(f"observation template {template!r} has no {{observation}} slot")
      self.before, self.after = template.split("{observation}", 1)
      self.kind = "plain"
      return
    if chat_template is None:
      raise ObservationError("give a plain observation template or the checkpoint's chat template")
    self.kind = "chat"
    self.before, self.after = _chat_parts(chat_template, role,
                                          [tokenizer.id_to_piece(int(i)) for i in end_ids])

  def text(self, observation: str) -> str:
    return f"{self.before}{observation}{self.after}"

  def encode(self, observation: str) -> list[int]:
    """The observation turn's ids (no BOS)."""
    return list(self.tokenizer.encode(self.text(observation)))


def _chat_parts(template, role: str, end_pieces: Sequence[str]) -> tuple[str, str]:
  """(text before, text after) the observation in an observation turn rendered by ``template``."""
  from rlj.data.chat import ChatTemplateError
  convo = [{"role": "user", "content": "question"}, {"role": "assistant", "content": _ASSISTANT}]
  try:
    full = template.render(convo + [{"role": role, "content": _OBSERVATION}], add_generation_prompt=True)
  except ChatTemplateError as e:
    raise ObservationError(f"the chat template cannot render a {role!r} turn after an assistant turn ({e}); set "
                           f"the observation role to one it takes (e.g. 'user')") from None
  at, obs = full.find(_ASSISTANT), full.find(_OBSERVATION)
  if at < 0 or obs < at:
    raise ObservationError(f"the chat template does not keep the assistant's content and then the {role!r} turn "
                           f"in order; it cannot be continued turn by turn")
  between = full[at + len(_ASSISTANT):obs]
  marker = max((p for p in end_pieces if p and between.startswith(p)), key=len, default=None)
  if marker is None:
    raise ObservationError(f"after an assistant turn the chat template writes {between[:40]!r}, which starts with "
                           f"none of the model's stop tokens {list(end_pieces)}; add the template's end-of-turn "
                           f"token to sampler.stop_tokens")
  return between[len(marker):], full[obs + len(_OBSERVATION):]
