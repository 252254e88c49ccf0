"""Test setup: 8 simulated CPU devices, set before jax is imported, and strict rank promotion."""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update("jax_numpy_rank_promotion", "raise")

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def fast_compile():
  """Tiny models: XLA's optimisation passes cost more than they save. Use per module with
  ``pytestmark = pytest.mark.usefixtures("fast_compile")``; the setting is restored after the module."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: takes more than ~10 s on 2 CPU cores (deselected by default)")
