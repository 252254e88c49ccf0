"""Helpers of the transformers-parity tests (hf_test.py, families_test.py): logits of both implementations, the
(checkpoint, config, params, logits) record of one family, and a checkpoint copy with edited tensors."""
import json
import os

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from models import hf
from models.transformer import Transformer


def hf_logits(model, tokens, mask, positions):
  """transformers' logits [B, S, V] (float32 numpy) of a torch model on numpy inputs."""
  import torch
  with torch.no_grad():
    out = model(input_ids=torch.tensor(np.asarray(tokens), dtype=torch.long), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(np.asarray(positions), dtype=torch.long))
  return out.logits.float().numpy()


def our_logits(config, params, tokens, mask, positions):
  fn = jax.jit(lambda p, t, m, pos: Transformer(config).apply({"params": p}, t, pos, m)[0])
  return np.asarray(fn(params, tokens, mask, positions))


def family_record(name, model, directory, inputs):
  """``(name, hf model, checkpoint dir, our config, our params, our logits on inputs)``: ``model`` saved by
  transformers into ``directory`` and loaded by ``models.hf``."""
  model.save_pretrained(directory)
  config, params = hf.load_hf_checkpoint(directory)
  return name, model, directory, config, params, our_logits(config, params, *inputs)


def rewrite_checkpoint(src, dst, edit):
  """A copy of the single-file checkpoint ``src`` in ``dst`` with ``edit(tensors)`` applied; returns ``dst``."""
  os.makedirs(dst)
  with open(os.path.join(src, "config.json")) as fh:
    cfg = json.load(fh)
  with open(os.path.join(dst, "config.json"), "w") as fh:
    json.dump(cfg, fh)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  edit(tensors)
  save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  return dst
