"""Every sampler, given the exact eps of a Gaussian, reproduces its mean and covariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdiff_jax import parallel, schedules
from cdiff_jax.sampling import Sampler

MU = np.array([1.0, -0.5], np.float32)
COV = np.array([[0.5, 0.3], [0.3, 0.4]], np.float32)


def gaussian_eps(schedule):
  """Exact eps(x_t, t) = sigma_t Cov_t^{-1} (x - alpha_t mu) of x_0 ~ N(MU, COV)."""
  def eps_fn(params, x, t, cond):
    del params, cond
    a, s = schedule.alpha(t), schedule.sigma(t)
    cov_t = a[:, None, None] ** 2 * COV + s[:, None, None] ** 2 * jnp.eye(2)
    diff = x - a[:, None] * MU
    return s[:, None] * jnp.linalg.solve(cov_t, diff[..., None])[..., 0]
  return eps_fn


@pytest.mark.parametrize('sampler,num_steps,schedule', [
    ('ancestral', 200, schedules.DDPMSchedule()),
    ('ddim', 50, schedules.DDPMSchedule()),
    ('ddim', 100, schedules.VPSchedule()),
    ('euler_maruyama', 500, schedules.VPSchedule()),
    ('heun', 50, schedules.VPSchedule()),
    ('heun', 50, schedules.CosineSchedule()),
])
def test_sampler_reproduces_gaussian(sampler, num_steps, schedule):
  mesh = parallel.make_mesh()
  s = Sampler(gaussian_eps(schedule), schedule, (2,), sampler=sampler, num_steps=num_steps,
              eta=0.0, mesh=mesh)
  n = 20_000
  x = np.asarray(s(None, jax.random.key(0), n))
  assert x.shape == (n, 2)
  np.testing.assert_allclose(x.mean(0), MU, atol=0.03)
  np.testing.assert_allclose(np.cov(x.T), COV, atol=0.04)


def test_wrong_eps_is_detected():
  # The same check fails for a sampler fed a wrong score (a covariance twice too large).
  schedule = schedules.VPSchedule()
  def wrong(params, x, t, cond):
    a, s = schedule.alpha(t), schedule.sigma(t)
    return s[:, None] * (x - a[:, None] * MU) / (a[:, None] ** 2 * 1.0 + s[:, None] ** 2)
  x = np.asarray(Sampler(wrong, schedule, (2,), 'ddim', 50)(None, jax.random.key(0), 5000))
  assert np.abs(np.cov(x.T) - COV).max() > 0.2


def test_unknown_sampler_message():
  with pytest.raises(ValueError, match='sample.sampler'):
    Sampler(gaussian_eps(schedules.VPSchedule()), schedules.VPSchedule(), (2,), 'euler')


def test_lowered_programs_are_the_sampler():
  # Sampler.lower (used to measure compile time ahead of time) lowers the very programs a
  # call runs: run by hand, chunk by chunk, they give the call's samples.
  schedule = schedules.VPSchedule()
  s = Sampler(gaussian_eps(schedule), schedule, (2,), 'ddim', 20, mesh=parallel.make_mesh())
  n, rng = 16, jax.random.key(3)
  init, run, finish = [low.compile() for low in s.lower(None, n)]
  rng_init, rng_loop = jax.random.split(rng)
  x = init(rng_init)
  for lo, hi in zip(s.bounds[:-1], s.bounds[1:]):
    x = run(None, None, x, rng_loop, lo, hi)
  np.testing.assert_allclose(np.asarray(finish(None, None, x)),
                             np.asarray(s(None, rng, n)), rtol=1e-6, atol=1e-6)
