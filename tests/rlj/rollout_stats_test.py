"""Rollout summaries (lengths, cut fraction, the sampler's entropy) and the reference-KL diagnostic of rows
whose loss has no KL term, against hand-built rollouts and exact values of small categorical distributions."""
import jax.numpy as jnp
import numpy as np

from rlj import rl_algos, rollout_stats

EOS, STOP, PAD = 1, 7, 0


def test_lengths_and_the_fraction_cut_at_max_new_tokens():
  completion = np.array([[5, 6, EOS, PAD],      # stopped early
                         [5, 6, 5, 6],          # four tokens, no stop: cut
                         [5, 6, 5, STOP],       # stops on its last allowed token: not cut
                         [5, EOS, PAD, PAD]])
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]], np.float32)
  got = rollout_stats.completion_lengths(completion, mask, max_new_tokens=4, stop_ids=(EOS, STOP))
  assert got == {"response_len/mean": (3 + 4 + 4 + 2) / 4, "response_len/max": 4.0,
                 "response_len/truncated_frac": 0.25}


def _categorical_samples(p, n, seed=0):
  rng = np.random.default_rng(seed)
  return rng.choice(len(p), size=n, p=p)


def test_sampler_entropy_estimates_the_sampling_distributions_entropy():
  p = np.array([0.5, 0.25, 0.125, 0.125])
  exact = -(p * np.log(p)).sum()
  y = _categorical_samples(p, 20000).reshape(200, 100)
  logp = np.log(p)[y]
  mask = np.ones_like(logp)
  mask[:, 90:] = 0
  logp[:, 90:] = 0.0                                  # the sampler's log-probs are 0 past the mask
  np.testing.assert_allclose(rollout_stats.sampler_entropy(logp, mask), exact, rtol=0.02)


def test_reference_kl_estimates_kl_to_the_reference_and_dno_counts_valid_pairs_only():
  p = np.array([0.6, 0.3, 0.1])
  r = np.array([0.2, 0.5, 0.3])
  exact = (p * np.log(p / r)).sum()
  y = _categorical_samples(p, 40000).reshape(4, 10000)
  logp, ref = np.log(p)[y].astype(np.float32), np.log(r)[y].astype(np.float32)
  mask = np.ones_like(logp)
  got = float(rl_algos.reference_kl(jnp.asarray(logp), jnp.asarray(ref), jnp.asarray(mask)))
  np.testing.assert_allclose(got, exact, rtol=0.03)

  # DNO: rows (0, 1) are a valid pair, rows (2, 3) an invalid one whose reference is far off.
  ref_far = ref.copy()
  ref_far[2:] -= 5.0
  batch = {"ref_logp": jnp.asarray(ref_far), "mask": jnp.asarray(mask), "pair_valid": jnp.asarray([1.0, 0.0]),
           "pair_scores": jnp.asarray([[1.0, 0.0], [0.0, 0.0]])}
  _, metrics = rl_algos.dno_objective(jnp.asarray(logp), batch, beta=0.1)
  want = float(rl_algos.reference_kl(jnp.asarray(logp[:2]), jnp.asarray(ref[:2]), jnp.asarray(mask[:2])))
  np.testing.assert_allclose(float(metrics["kl"]), want, rtol=1e-5)


def test_finished_row_fraction_counts_decode_steps_on_stopped_rows():
  """A slow loop over the decode steps: a row is stopped at step s once its length is <= s."""
  lengths = np.array([64, 7, 30, 64, 1, 0, 45, 12])
  steps = lengths.max()
  idle = sum(1 for s in range(steps) for n in lengths if n <= s)
  got = rollout_stats.finished_row_steps(lengths)["decode/finished_row_frac"]
  assert got == idle / (len(lengths) * steps)
  even = np.linspace(0.1, 1.0, 10) * 64       # the spread: lengths evenly from 10% to 100% of T
  assert abs(rollout_stats.finished_row_steps(even)["decode/finished_row_frac"] - 0.45) < 1e-9
  assert rollout_stats.finished_row_steps(np.array([5, 5]))["decode/finished_row_frac"] == 0.0
  assert rollout_stats.finished_row_steps(np.zeros(3))["decode/finished_row_frac"] == 0.0


def test_overlong_filtering_zeroes_the_cut_rows_as_the_device_function_does():
  from algorithms import dapo  # pylint: disable=g-import-not-at-top
  completion = np.array([[5, 6, EOS, PAD], [5, 6, 5, 6], [5, 6, 5, STOP], [5, 6, 6, 5]])
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]], np.float32)
  cut = rollout_stats.truncated(completion, mask, max_new_tokens=4, stop_ids=(EOS, STOP))
  np.testing.assert_array_equal(cut, [False, True, False, True])
  got = rollout_stats.overlong_filtered(mask, cut)
  np.testing.assert_array_equal(got, np.asarray(dapo.mask_truncated(jnp.asarray(mask), jnp.asarray(~cut))))
  np.testing.assert_array_equal(got[[0, 2]], mask[[0, 2]])
  assert got.dtype == mask.dtype and not got[[1, 3]].any()
