"""Matmul FLOPs of a traced program with its loops expanded.

XLA's cost analysis of a compiled program counts the body of a loop once: for our models the layer
``nn.scan`` (L blocks), the micro-batch ``lax.scan`` of the train step and the sampler's decode
``while_loop`` each contribute one iteration, so ``compiled.cost_analysis()["flops"]`` is far below the work
done. This module walks the program's jaxpr instead and counts every ``dot_general`` as
2 * (batch dims) * M * N * K FLOPs, multiplying a scan body by its length (a ``while_loop`` body by the
``while_trips`` given). Higher-order primitives (``pjit``, ``remat``, ``custom_vjp``, ``cond``) are entered;
``cond`` counts its most expensive branch. Element-wise work (softmax, norms, the optimizer) is not counted:
for transformer steps it is a few percent of the matmuls.
"""
from __future__ import annotations

import math
from typing import Any

from jax.extend import core as jex_core


def _dot_flops(eqn) -> int:
  lhs, rhs = (v.aval for v in eqn.invars[:2])
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  contract = math.prod(lhs.shape[i] for i in lc)
  batch = math.prod(lhs.shape[i] for i in lb)
  lhs_free = math.prod(d for i, d in enumerate(lhs.shape) if i not in lc and i not in lb)
  rhs_free = math.prod(d for i, d in enumerate(rhs.shape) if i not in rc and i not in rb)
  return 2 * batch * lhs_free * rhs_free * contract


def _sub_jaxprs(eqn):
  for v in eqn.params.values():
    for x in (v if isinstance(v, (tuple, list)) else (v,)):
      if isinstance(x, jex_core.ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, jex_core.Jaxpr):
        yield x


def jaxpr_flops(jaxpr, *, while_trips: int = 1) -> int:
  """Matmul FLOPs of ``jaxpr`` (a Jaxpr or ClosedJaxpr) with loops expanded."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "scan":
      total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"], while_trips=while_trips)
    elif name == "while":
      total += while_trips * jaxpr_flops(eqn.params["body_jaxpr"], while_trips=while_trips)
    elif name == "cond":
      total += max(jaxpr_flops(b, while_trips=while_trips) for b in eqn.params["branches"])
    else:
      total += sum(jaxpr_flops(j, while_trips=while_trips) for j in _sub_jaxprs(eqn))
  return total


def traced_flops(jitted, *args: Any, while_trips: int = 1) -> int:
  """Global matmul FLOPs of one call of ``jitted`` (a ``jax.jit`` function) on abstract ``args``."""
  return jaxpr_flops(jitted.trace(*args).jaxpr, while_trips=while_trips)

