"""README's examples of the losses run as printed: every python block that imports ``algorithms`` is executed,
in order, in one namespace (the jax.jit block continues the first), and its jitted losses equal the eager ones."""
import os
import re

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("fast_compile")

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _blocks() -> list[str]:
  with open(README, encoding="utf-8") as f:
    blocks = re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.S | re.M)
  first = next(i for i, b in enumerate(blocks) if "from algorithms import" in b)
  return blocks[first:first + 2]


@pytest.fixture(scope="module")
def namespace():
  blocks = _blocks()
  assert len(blocks) == 2 and "jax.jit" in blocks[1], "the eager block and its jax.jit continuation"
  ns = {}
  for i, block in enumerate(blocks):
    exec(compile(block, f"README.md python block {i}", "exec"), ns)  # noqa: S102
  return ns


def test_the_blocks_run_and_give_finite_losses_and_gradients(namespace):
  ns = namespace
  assert np.isfinite(float(ns["loss"]))
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(ns["grads"]))
  assert bool(ns["valid"].any()), "the DNO example picks at least one pair"


def test_jitted_losses_equal_the_eager_ones(namespace):
  ns = namespace
  grpo, kl = ns["grpo"], ns["kl"]
  args = (ns["logp"], ns["old_logp"], ns["ref_logp"], ns["adv"], ns["mask"])
  eager, _ = grpo.loss(*args, clip_eps=0.2, clip_eps_high=0.28, agg="token_mean", kl_coef=0.04,
                       num_tokens=ns["global_num_tokens"])
  jitted, _ = ns["grpo_loss"](*args, kl_coef=0.04, num_tokens=ns["global_num_tokens"])
  np.testing.assert_allclose(jitted, eager, rtol=1e-6)
  np.testing.assert_allclose(ns["advantages"](ns["accuracy"], scale="batch"),
                             grpo.advantages(ns["accuracy"], scale="batch"), rtol=1e-6)
  np.testing.assert_allclose(ns["per_token_kl"], kl.estimate(ns["logp"], ns["ref_logp"], "k3"), rtol=1e-6)
  (step_loss, _), _ = ns["train_step"](ns["params"])
  (eager_step, _), _ = jax.value_and_grad(ns["objective"], has_aux=True)(ns["params"])
  np.testing.assert_allclose(step_loss, eager_step, rtol=1e-6)
