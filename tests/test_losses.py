"""The DSM loss is minimized by the exact eps; weightings and grouping are what they claim."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdiff_jax import losses, schedules


def exact_eps_gaussian(schedule, mu, var):
  """E[eps | x_t] for x_0 ~ N(mu, var) (1-D): -sigma_t * score of N(a mu, a^2 var + s^2)."""
  def eps(x, t):
    a, s = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
    return s * (x - a * mu) / (a ** 2 * var + s ** 2)
  return eps


def test_exact_eps_minimizes_dsm_loss():
  s = schedules.VPSchedule()
  mu, var = 1.5, 0.25
  x0 = mu + jnp.sqrt(var) * jax.random.normal(jax.random.key(1), (200_000, 1))
  eps_star = exact_eps_gaussian(s, mu, var)
  rng = jax.random.key(2)
  base = float(losses.dsm_loss(eps_star, x0, rng, s)[0].mean())
  for scale, shift in [(1.1, 0.0), (0.9, 0.0), (1.0, 0.05), (1.0, -0.05)]:
    pert = lambda x, t: scale * eps_star(x, t) + shift
    other = float(losses.dsm_loss(pert, x0, rng, s)[0].mean())
    assert other > base + 1e-4, (scale, shift, other, base)


def test_regression_of_eps_on_xt_recovers_exact_coefficients():
  # At fixed t the minimizer of E||f(x_t) - eps||^2 over affine f is the exact E[eps|x_t].
  s = schedules.DDPMSchedule()
  mu, var = -0.5, 0.8
  n = 400_000
  x0 = mu + np.sqrt(var) * np.random.default_rng(0).standard_normal(n)
  eps = np.random.default_rng(1).standard_normal(n)
  t = 0.4
  a, sg = float(s.alpha(t)), float(s.sigma(t))
  xt = a * x0 + sg * eps
  slope, intercept = np.polyfit(xt, eps, 1)
  d = a ** 2 * var + sg ** 2
  assert abs(slope - sg / d) < 0.01 and abs(intercept - (-sg * a * mu / d)) < 0.01


def test_elbo_weight_is_half_minus_dlogsnr_dt():
  s = schedules.VPSchedule()
  t = jnp.array([0.1, 0.5, 0.9])
  dlogsnr = jax.vmap(jax.grad(lambda u: s.log_snr(u)))(t)
  np.testing.assert_allclose(losses.time_weight(s, t, 'elbo'), -0.5 * dlogsnr, rtol=1e-4)
  np.testing.assert_allclose(losses.time_weight(s, t, 'eps'), 1.0)


def test_loss_is_per_example_and_elbo_sums_dims():
  s = schedules.VPSchedule()
  eps_hat = jnp.zeros((3, 4, 4, 1))
  eps = jnp.ones((3, 4, 4, 1)) * jnp.array([1.0, 2.0, 3.0])[:, None, None, None]
  t = jnp.array([0.5, 0.5, 0.5])
  mean = losses.weighted_sq_error(eps_hat, eps, t, s, 'eps')
  np.testing.assert_allclose(mean, [1.0, 4.0, 9.0])
  elbo = losses.weighted_sq_error(eps_hat, eps, t, s, 'elbo')
  np.testing.assert_allclose(elbo, 16 * np.array([1.0, 4.0, 9.0]) * losses.time_weight(s, t, 'elbo'),
                             rtol=1e-6)


def test_group_means():
  v = jnp.array([1.0, 2.0, 3.0, 10.0, 20.0, 5.0])
  g = jnp.array([0, 0, 0, 1, 1, 2])
  np.testing.assert_allclose(losses.group_means(v, g, 4), [2.0, 15.0, 5.0, 0.0])


def test_elbo_importance_sampling_is_unbiased_and_lower_variance():
  # E over t of the ELBO integrand: log-SNR-uniform sampling with a constant weight must
  # agree with uniform t and the weight -0.5 dlogSNR/dt, with a smaller variance.
  s = schedules.VPSchedule()
  # ||eps - E[eps|x_t]||^2 for unit-Gaussian data is alpha_t^2 in expectation; it does not
  # vanish at t -> 0, where the 1/t growth of the ELBO weight makes a heavy tail.
  err = lambda t: s.alpha(t) ** 2 + 0.01
  n = 400_000
  t_is, w_is = losses.sample_time(jax.random.key(0), n, s, 'elbo')
  t_u = s.sample_t(jax.random.key(1), (n,))
  est_is = w_is * err(t_is)
  est_u = losses.time_weight(s, t_u, 'elbo') * err(t_u)
  assert float(est_is.mean()) == pytest.approx(float(est_u.mean()), rel=0.01)
  assert float(est_is.std()) < 0.5 * float(est_u.std())
  assert float(t_is.min()) >= s.t_min - 1e-6 and float(t_is.max()) <= 1.0
  # t_from_log_snr inverts log_snr.
  t = jnp.array([0.01, 0.3, 0.9])
  np.testing.assert_allclose(s.t_from_log_snr(s.log_snr(t)), t, rtol=1e-4)


def test_stratified_times_cover_every_group():
  s = schedules.VPSchedule()
  t = np.asarray(s.sample_t(jax.random.key(3), (512,), stratified=True))
  for chunk in (t[:64], t[64:128], t[300:428]):
    hist = np.histogram(chunk, bins=4, range=(s.t_min, 1.0))[0]
    # Even coverage within any contiguous run: within 4 of each other (the golden-ratio
    # sequence); independent uniform times pass this for all three runs 0.1% of the time.
    assert hist.max() - hist.min() <= 4, hist


def test_time_window_estimates_the_window_integral():
  # sum over the window [t_lo, 1] of w(t) f(t) dt, by the importance weights of sample_time.
  f = lambda t: 1.0 + jnp.sin(3 * t)
  for sched in (schedules.VPSchedule(), schedules.DDPMSchedule()):
    for weighting in ('eps', 'elbo'):
      n = 200_000
      t_lo = jnp.full((n,), 0.3)
      t, w = losses.sample_time(jax.random.key(0), n, sched, weighting, t_lo=t_lo)
      assert float(t.min()) >= 0.3 - 1e-6
      grid = jnp.linspace(0.3, 1.0, 20001)
      tw = losses.time_weight(sched, grid, weighting)
      t_min = 1 / sched.num_steps if sched.num_steps else sched.t_min
      scale = 1.0 / (1.0 - t_min) if weighting == 'eps' else 1.0  # eps: mean over the range
      exact = float(jnp.trapezoid(tw * f(grid), grid)) * scale
      assert float((w * f(t)).mean()) == pytest.approx(exact, rel=0.02), (sched, weighting)
      # Without a window the 'eps' weight is exactly 1 (the plain simple loss).
      _, w_full = losses.sample_time(jax.random.key(1), 8, sched, 'eps')
      np.testing.assert_allclose(w_full, 1.0)


@pytest.mark.parametrize('sched', [schedules.VPSchedule(), schedules.DDPMSchedule(num_steps=10)],
                         ids=lambda s: type(s).__name__)
def test_window_at_or_below_t_min_is_the_whole_range(sched):
  """A window from t_min or below is the whole range: 'eps' weight 1, 'elbo' as unwindowed."""
  # (Constrained training passes t_lo = 0 for its unwindowed examples.)
  n = 4096
  t_min = 1.0 / sched.num_steps if sched.num_steps else sched.t_min
  for lo in (t_min, 0.0):
    t, w = losses.sample_time(jax.random.key(0), n, sched, 'eps', t_lo=jnp.full((n,), lo))
    np.testing.assert_allclose(w, 1.0, rtol=1e-6)
    assert float(t.min()) >= t_min - 1e-6 and float(t.max()) <= 1.0
    t, w = losses.sample_time(jax.random.key(0), n, sched, 'elbo', t_lo=jnp.full((n,), lo))
    _, w_full = losses.sample_time(jax.random.key(0), n, sched, 'elbo')
    np.testing.assert_allclose(w, w_full, rtol=1e-6)
    assert np.isfinite(np.asarray(w)).all() and float(t.min()) >= t_min - 1e-6


def test_discrete_window_is_uniform_on_its_grid_times():
  """Window [0.3, 1] on a T = 10 grid: t = i / 10, i = 3..10, equally often, weight 8 / 10."""
  s = schedules.DDPMSchedule(num_steps=10)
  n = 16_000
  t, w = losses.sample_time(jax.random.key(5), n, s, 'eps', t_lo=jnp.full((n,), 0.3))
  t = np.asarray(t, np.float64)
  i = np.round(t * 10)
  np.testing.assert_allclose(t * 10, i, atol=1e-4)
  counts = np.bincount(i.astype(np.int64), minlength=11)
  assert counts[:3].sum() == 0 and len(counts) == 11, counts
  np.testing.assert_allclose(counts[3:] / n, 1 / 8, atol=0.012)  # noise 0.0026
  np.testing.assert_allclose(w, 0.8, rtol=1e-6)


@pytest.mark.parametrize('weighting', ['eps', 'elbo'])
def test_stratified_window_and_elbo_times_cover_every_group(weighting):
  """Stratified window times (uniform in t) and ELBO times (in log-SNR) cover every group evenly."""
  s = schedules.VPSchedule()
  n = 512
  t_lo = jnp.full((n,), 0.3) if weighting == 'eps' else None
  t, _ = losses.sample_time(jax.random.key(6), n, s, weighting, stratified=True, t_lo=t_lo)
  if weighting == 'eps':
    u = (np.asarray(t) - 0.3) / 0.7
  else:  # back to the uniform variable through the log-SNR
    hi, lo = float(s.log_snr(s.t_min)), float(s.log_snr(1.0))
    u = (hi - np.asarray(s.log_snr(t))) / (hi - lo)
  for chunk in (u[:64], u[64:128], u[300:428]):
    hist = np.histogram(chunk, bins=4, range=(0.0, 1.0))[0]
    assert hist.max() - hist.min() <= 4, hist  # as in test_stratified_times_cover_every_group


def test_dsm_loss_applies_the_time_weight():
  """With eps_hat = 0 the mean DSM loss is the integral of the time weight times E||eps||^2."""
  # 'elbo': 0.5 (logSNR(t_min) - logSNR(1)) * dim; 'eps' on the window [0.3, 1]: the
  # window's share (1 - 0.3) / (1 - t_min) of the whole range.
  s = schedules.VPSchedule()
  n, dim = 20_000, 2
  x0 = jax.random.normal(jax.random.key(7), (n, dim))
  zero = lambda x, t: jnp.zeros_like(x)
  elbo, aux = losses.dsm_loss(zero, x0, jax.random.key(8), s, 'elbo')
  expected = 0.5 * (float(s.log_snr(s.t_min)) - float(s.log_snr(1.0))) * dim
  assert float(elbo.mean()) == pytest.approx(expected, rel=0.03)
  assert aux['weight'].shape == (n,)
  window, _ = losses.dsm_loss(zero, x0, jax.random.key(9), s, 'eps', t_lo=jnp.full((n,), 0.3))
  assert float(window.mean()) == pytest.approx(0.7 / (1 - s.t_min), rel=0.03)


def test_outputs_of_the_wrong_shape_are_refused_by_name():
  """An eps (or energy gradient) of another shape than x broadcast silently into a loss or
  a sample; the loss, the samplers and the MCMC chains now refuse it while tracing."""
  from cdiff_jax.sampling import Sampler, mcmc
  sched = schedules.DDPMSchedule()
  x0 = jnp.ones((8, 2))
  with pytest.raises(ValueError, match=r'eps_fn\(x_t, t\) returned shape \(8, 1\)'):
    losses.dsm_loss(lambda x, t: x[:, :1], x0, jax.random.key(0), sched)
  with pytest.raises(ValueError, match=r'eps_fn\(params, x, t, cond\) returned shape \(4, 1\)'):
    Sampler(lambda p, x, t, c: x[:, :1], sched, (2,), 'ddim', 5)(None, jax.random.key(0), 4)
  with pytest.raises(ValueError, match=r'its gradient\) returned shape \(4, 1\)'):
    mcmc.run_chain('ula', lambda x: (jnp.sum(x, -1), x[:, :1]), jnp.ones((4, 2)), 0.1, 2,
                   jax.random.key(0))
  with pytest.raises(ValueError, match=r'one energy per example, shape \(4,\)'):
    mcmc.run_chain('mala', lambda x: (jnp.sum(x), x), jnp.ones((4, 2)), 0.1, 2,
                   jax.random.key(0))


@pytest.mark.parametrize('weighting', ['eps', 'elbo'])
@pytest.mark.parametrize('sched', [schedules.DDPMSchedule(), schedules.VPSchedule()])
def test_one_window_start_for_every_example_gives_per_example_weights(weighting, sched):
  """t_lo given once (a scalar) is every example's window start: the same times and one
  weight per example, as with the per-example array (the weight came back a scalar)."""
  key = jax.random.key(0)
  t1, w1 = losses.sample_time(key, 8, sched, weighting, t_lo=0.3)
  t2, w2 = losses.sample_time(key, 8, sched, weighting, t_lo=jnp.full((8,), 0.3))
  assert t1.shape == w1.shape == (8,)
  np.testing.assert_array_equal(t1, t2)
  np.testing.assert_array_equal(w1, w2)
