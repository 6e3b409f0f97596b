"""Schedules against their closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdiff_jax import schedules

T = np.linspace(0.001, 1.0, 37).astype(np.float32)


def test_vp_closed_form():
  s = schedules.VPSchedule(beta_min=0.1, beta_max=20.0)
  t64 = T.astype(np.float64)
  log_mean_coeff = -0.25 * t64**2 * (20.0 - 0.1) - 0.5 * t64 * 0.1  # score_sde formula
  np.testing.assert_allclose(s.alpha(T), np.exp(log_mean_coeff), rtol=1e-5)
  np.testing.assert_allclose(s.sigma(T), np.sqrt(1 - np.exp(2 * log_mean_coeff)), rtol=1e-4)
  np.testing.assert_allclose(s.beta(T), 0.1 + T * (20.0 - 0.1), rtol=1e-6)


def test_ddpm_matches_cumprod_on_grid():
  s = schedules.DDPMSchedule()
  betas = np.linspace(1e-4, 0.02, 1000)
  alphabar = np.cumprod(1 - betas)
  i = np.array([1, 2, 10, 500, 999, 1000])
  np.testing.assert_allclose(s.alpha(i / 1000.0) ** 2, alphabar[i - 1], rtol=2e-5)
  # beta(t) in continuous time: T * beta_i (to first order) inside step i.
  np.testing.assert_allclose(s.beta((i - 0.5) / 1000.0), -1000 * np.log1p(-betas[i - 1]), rtol=1e-4)


def test_cosine_closed_form_and_clip():
  s = schedules.CosineSchedule()
  f = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
  tt = T[T < 0.9]
  np.testing.assert_allclose(s.alpha(tt) ** 2, f(tt) / f(0.0), rtol=1e-4)
  assert float(s.log_snr(1.0)) >= -schedules.LOG_SNR_MAX - 1e-3
  assert np.isfinite(np.asarray(s.sigma(1.0)))


@pytest.mark.parametrize('s', [schedules.VPSchedule(), schedules.DDPMSchedule(),
                               schedules.CosineSchedule()], ids=lambda s: type(s).__name__)
def test_variance_preserving_and_beta_is_log_derivative(s):
  np.testing.assert_allclose(s.alpha(T) ** 2 + s.sigma(T) ** 2, 1.0, atol=1e-6)
  np.testing.assert_allclose(s.log_snr(T), np.log(s.alpha(T) ** 2 / s.sigma(T) ** 2), rtol=1e-4,
                             atol=1e-4)
  # beta(t) = -d log alphabar / dt, by central differences away from DDPM's grid kinks.
  t = np.array([0.2037, 0.5013, 0.7519], np.float64)
  h = 1e-4
  fd = -(np.asarray(s.log_alpha2(t + h), np.float64) - np.asarray(s.log_alpha2(t - h), np.float64)) / (2 * h)
  np.testing.assert_allclose(s.beta(t), fd, rtol=2e-2)


@pytest.mark.parametrize('num_steps', [10, 1000, 4000])
def test_t_from_log_snr_inverts_log_snr_down_to_the_first_grid_time(num_steps):
  """The inverse covers [1/T, 1] for any T (ELBO-weighted training draws times through it),
  also below the continuous schedules' t_min = 1e-3 when T > 1000."""
  s = schedules.DDPMSchedule(num_steps=num_steps)
  t = np.array([1, 2, 7, num_steps // 2, num_steps]) / num_steps
  np.testing.assert_allclose(s.t_from_log_snr(s.log_snr(jnp.asarray(t, jnp.float32))), t,
                             rtol=1e-4)


def test_time_grid():
  g = schedules.DDPMSchedule().time_grid(50)
  assert g[0] == 1.0 and np.isclose(g[-1], 1 / 1000) and np.all(np.diff(g) < 0)
  np.testing.assert_allclose(np.asarray(g) * 1000, np.round(np.asarray(g) * 1000), atol=1e-3)
  with pytest.raises(ValueError, match='num_steps'):
    schedules.DDPMSchedule(num_steps=10).time_grid(20)
  # The full chain: T - 1 moves over the grid times T..1 (then the final denoising).
  full = np.asarray(schedules.DDPMSchedule(num_steps=10).time_grid(9)) * 10
  np.testing.assert_allclose(full, np.arange(10, 0, -1), atol=1e-5)
  with pytest.raises(ValueError, match='sample.num_steps < diffusion.num_steps'):
    schedules.DDPMSchedule(num_steps=10).time_grid(10)


def test_ddpm_beta_at_grid_times_is_the_interval_below():
  """beta(i / T) is the rate of (i-1, i] at every grid time, float32 rounding of i / T
  included (ceil(t T) - 1 alone picked the interval above at 5 of the 1000 times)."""
  s = schedules.DDPMSchedule()
  grid = np.asarray(s._grid(), np.float64)
  rate = -np.diff(grid) * s.num_steps
  i = np.arange(1, s.num_steps + 1)
  t = jnp.asarray(i / s.num_steps, jnp.float32)
  np.testing.assert_array_equal(np.asarray(s.beta(t)), rate.astype(np.float32)[i - 1])
  # Inside an interval the rate is that interval's.
  mid = jnp.asarray((i - 0.5) / s.num_steps, jnp.float32)
  np.testing.assert_array_equal(np.asarray(s.beta(mid)), rate.astype(np.float32)[i - 1])
  v = schedules.VPSchedule(t_min=1e-3).time_grid(10)
  assert v.shape == (11,) and np.isclose(v[-1], 1e-3)


def test_q_sample_moments():
  s = schedules.VPSchedule()
  x0 = jnp.full((20000, 1), 2.0)
  t = jnp.full((20000,), 0.3)
  eps = jax.random.normal(jax.random.key(0), x0.shape)
  xt = schedules.q_sample(s, x0, t, eps)
  a, sig = float(s.alpha(0.3)), float(s.sigma(0.3))
  assert abs(float(xt.mean()) - 2 * a) < 0.02
  assert abs(float(xt.std()) - sig) < 0.02


def test_unknown_schedule_message():
  import ml_collections
  with pytest.raises(ValueError, match="diffusion.schedule='linear'"):
    schedules.get_schedule(ml_collections.ConfigDict({'schedule': 'linear'}))


@pytest.mark.parametrize('stratified', [False, True])
def test_discrete_training_times_are_uniform_on_the_grid(stratified):
  """DDPM training times are the grid times i / T for i = 1..T (never t = 0), equally often."""
  s = schedules.DDPMSchedule(num_steps=10)
  n = 20_000
  t = np.asarray(s.sample_t(jax.random.key(4), (n,), stratified=stratified), np.float64)
  i = np.round(t * 10)
  np.testing.assert_allclose(t * 10, i, atol=1e-4)
  counts = np.bincount(i.astype(np.int64), minlength=11)
  assert counts[0] == 0 and len(counts) == 11, counts
  # 1/10 each; the sampling noise of a frequency is 0.002.
  np.testing.assert_allclose(counts[1:] / n, 0.1, atol=0.01)
