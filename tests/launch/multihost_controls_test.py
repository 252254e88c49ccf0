"""DAPO dynamic sampling and the adaptive KL controller in a two-process job: every process samples its own prompts,
the keep decisions come from the gathered rewards, so the job equals one process with four devices (the setup and
tolerances of ``multihost_test``): the same extra rollouts, filtered and filler groups, beta and params."""
import numpy as np
import pytest

from tests.launch import multihost_test as mh

CONTROLS = ["--config.train.dynamic_sampling.enabled=True", "--config.train.dynamic_sampling.max_extra_rollouts=2",
            "--config.algo.kwargs.kl_coef=0.04", "--config.algo.kl_control.target=0.001",
            "--config.algo.kl_control.horizon=100"]


@pytest.mark.slow
def test_two_processes_agree_with_one_under_dynamic_sampling_and_kl_control(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  procs = mh._launch(one, processes=1, devices_per_process=4, total_steps=3,  # pylint: disable=protected-access
                     overrides=mh._overrides(1, 3) + CONTROLS)  # pylint: disable=protected-access
  procs += mh._launch(two, processes=2, devices_per_process=2, total_steps=3,  # pylint: disable=protected-access
                      overrides=mh._overrides(2, 3) + CONTROLS)  # pylint: disable=protected-access
  mh._wait(procs)  # pylint: disable=protected-access
  m1, m2 = mh._metrics(one), mh._metrics(two)  # pylint: disable=protected-access
  assert [r["step"] for r in m1] == [r["step"] for r in m2] == [1, 2, 3]
  for r1, r2 in zip(m1, m2):
    assert r1.keys() == r2.keys()
    for k in r1:
      np.testing.assert_allclose(r2[k], r1[k], err_msg=f"step {r1['step']} {k}", **mh.METRIC_TOL)
  assert sum(r["dynamic_sampling/extra_rollouts"] for r in m1) > 0
  assert sum(r["dynamic_sampling/groups_filtered"] for r in m1) > 0
  assert len({r["kl_control/beta"] for r in m1}) == 3
  mh._assert_params_close(mh._params(two, 3), mh._params(one, 3), **mh.PARAM_TOL)  # pylint: disable=protected-access
