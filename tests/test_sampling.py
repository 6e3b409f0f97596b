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


def _point_mass_eps(schedule, m):
  """Exact eps(x_t, t) = (x - alpha_t m) / sigma_t of x_0 = m (a point mass)."""
  def eps_fn(params, x, t, cond):
    del params, cond
    return (x - schedule.alpha(t)[:, None] * m) / schedule.sigma(t)[:, None]
  return eps_fn


@pytest.mark.parametrize('sampler', ['ddim', 'ancestral'])
def test_clipped_step_is_the_step_toward_the_clipped_x0(sampler):
  """With clip = 1 the step for data at x_0 = 2 is the unclipped step for data at x_0 = 1."""
  # (The predicted x_0 is clipped to 1 and eps recomputed from it.)
  from cdiff_jax.sampling import diffusion
  schedule = schedules.DDPMSchedule()
  clipped = diffusion.make_step(_point_mass_eps(schedule, 2.0), schedule, sampler, clip=1.0)
  plain = diffusion.make_step(_point_mass_eps(schedule, 1.0), schedule, sampler)
  x = jax.random.normal(jax.random.key(0), (64, 2))
  for t, s in [(1.0, 0.9), (0.5, 0.3), (0.1, 0.02)]:
    key = jax.random.key(1)
    np.testing.assert_allclose(clipped(None, None, x, t, s, key), plain(None, None, x, t, s, key),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('t,s', [(0.02, 0.019), (0.2, 0.15), (0.6, 0.3)])
def test_ancestral_step_draws_from_the_ddpm_posterior(t, s):
  """For point-mass data the ancestral step draws from the DDPM posterior q(x_s | x_t, x_0)."""
  # Mean (alpha_{t|s} sigma_s^2 x_t + alpha_s sigma_{t|s}^2 x_0) / sigma_t^2, variance
  # sigma_{t|s}^2 sigma_s^2 / sigma_t^2, with alpha_{t|s} = alpha_t / alpha_s and
  # sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2 (Ho et al. 2020, eq. 7).
  from cdiff_jax.sampling import diffusion
  schedule = schedules.DDPMSchedule()
  m, x_t, n = 0.7, 0.3, 40_000
  step = diffusion.make_step(_point_mass_eps(schedule, m), schedule, 'ancestral')
  x_s = np.asarray(step(None, None, jnp.full((n, 1), x_t), t, s, jax.random.key(2)), np.float64)
  a_t, s_t, a_s, s_s = (float(f(u)) for u in (t, s) for f in (schedule.alpha, schedule.sigma))
  a_ts = a_t / a_s
  var_ts = s_t ** 2 - a_ts ** 2 * s_s ** 2
  mean = (a_ts * s_s ** 2 * x_t + a_s * var_ts * m) / s_t ** 2
  var = var_ts * s_s ** 2 / s_t ** 2
  assert abs(x_s.mean() - mean) < 5 * np.sqrt(var / n) + 1e-5
  assert x_s.var() == pytest.approx(var, rel=0.05)  # sampling noise 0.7%


@pytest.mark.parametrize('eta', [0.0, 0.5])
def test_ddim_step_with_eta_has_the_ddim_mean_and_variance(eta):
  """Song et al. (2021), eq. 12, for point-mass data (eps = (x_t - alpha_t x_0) / sigma_t):
  x_s = alpha_s x_0 + sqrt(sigma_s^2 - c^2) eps + c z with c^2 = eta^2 times the DDPM
  posterior variance. At eta = 0.5 the variance is a quarter of the ancestral step's (an eta
  not squared would give half)."""
  from cdiff_jax.sampling import diffusion
  schedule = schedules.DDPMSchedule()
  m, x_t, n, t, s = 0.7, 0.3, 40_000, 0.6, 0.3
  step = diffusion.make_step(_point_mass_eps(schedule, m), schedule, 'ddim', eta=eta)
  x_s = np.asarray(step(None, None, jnp.full((n, 1), x_t), t, s, jax.random.key(3)), np.float64)
  a_t, s_t, a_s, s_s = (float(f(u)) for u in (t, s) for f in (schedule.alpha, schedule.sigma))
  post_var = (s_t ** 2 - (a_t / a_s) ** 2 * s_s ** 2) * s_s ** 2 / s_t ** 2
  c2 = eta ** 2 * post_var
  mean = a_s * m + np.sqrt(s_s ** 2 - c2) * (x_t - a_t * m) / s_t
  assert abs(x_s.mean() - mean) < 5 * np.sqrt(c2 / n) + 1e-5
  if eta:
    assert x_s.var() == pytest.approx(c2, rel=0.05)  # sampling noise 0.7%
  else:
    assert x_s.var() < 1e-10


def test_euler_maruyama_step_has_the_reverse_sde_coefficients_at_t():
  """One Euler-Maruyama step of the reverse SDE from t to s = t - dt, point-mass data
  (score = -eps / sigma_t): mean x + (beta(t) x / 2 + beta(t) score) dt, variance
  beta(t) dt, the coefficients at the step's start t (at s, beta(0.3) / beta(0.6) ~ 1/2)."""
  from cdiff_jax.sampling import diffusion
  schedule = schedules.VPSchedule()
  m, x_t, n, t, s = 0.7, 0.3, 40_000, 0.6, 0.3
  step = diffusion.make_step(_point_mass_eps(schedule, m), schedule, 'euler_maruyama')
  x_s = np.asarray(step(None, None, jnp.full((n, 1), x_t), t, s, jax.random.key(4)), np.float64)
  a_t, s_t, beta = float(schedule.alpha(t)), float(schedule.sigma(t)), float(schedule.beta(t))
  score = -(x_t - a_t * m) / s_t ** 2
  dt = t - s
  mean, var = x_t + (0.5 * beta * x_t + beta * score) * dt, beta * dt
  assert abs(x_s.mean() - mean) < 5 * np.sqrt(var / n)
  assert x_s.var() == pytest.approx(var, rel=0.05)  # sampling noise 0.7%


def _gaussian_flow(schedule, x, t, s):
  """Exact probability-flow ODE map from t to s of x_0 ~ N(MU, COV): x_s - alpha_s MU =
  Cov_s^{1/2} Cov_t^{-1/2} (x_t - alpha_t MU), Cov_u = alpha_u^2 COV + sigma_u^2 I."""
  w, v = np.linalg.eigh(COV.astype(np.float64))
  a_t, s_t, a_s, s_s = (float(f(u)) for u in (t, s) for f in (schedule.alpha, schedule.sigma))
  m = v @ np.diag(np.sqrt((a_s ** 2 * w + s_s ** 2) / (a_t ** 2 * w + s_t ** 2))) @ v.T
  return a_s * MU + (np.asarray(x, np.float64) - a_t * MU) @ m.T


def test_heun_solves_the_probability_flow_ode_to_second_order():
  """Heun's steps match the exact Gaussian ODE flow, with error ~1/n^2 (Euler's would be ~1/n)."""
  from cdiff_jax.sampling import diffusion
  schedule = schedules.VPSchedule()
  step = jax.jit(diffusion.make_step(gaussian_eps(schedule), schedule, 'heun'))
  x1 = jax.random.normal(jax.random.key(0), (256, 2))
  err = {}
  for n in (20, 40):
    times = np.asarray(schedule.time_grid(n))
    x = x1
    for i in range(n):
      x = step(None, None, x, times[i], times[i + 1], None)
    err[n] = np.abs(np.asarray(x) - _gaussian_flow(schedule, x1, times[0], times[-1])).max()
  assert err[40] < 0.006 and err[20] / err[40] > 3.0, err


def test_unknown_sampler_message():
  with pytest.raises(ValueError, match='sample.sampler'):
    Sampler(gaussian_eps(schedules.VPSchedule()), schedules.VPSchedule(), (2,), 'euler')
  # No steps: refused (it returned the denoised noise of t = 1 as samples).
  with pytest.raises(ValueError, match='num_steps=0: a sampler takes 1 or more steps'):
    Sampler(gaussian_eps(schedules.VPSchedule()), schedules.VPSchedule(), (2,), 'ddim', 0)
  # What the config refuses, refused for the library's callers too: an eta outside [0, 1]
  # sampled silently, no samples raised a ZeroDivisionError.
  for eta in (5.0, -0.5, float('nan')):
    with pytest.raises(ValueError, match=rf'eta={eta}: DDIM\'s noise must lie in \[0, 1\]'):
      Sampler(gaussian_eps(schedules.VPSchedule()), schedules.VPSchedule(), (2,), 'ddim', 4,
              eta=eta)
  s = Sampler(gaussian_eps(schedules.VPSchedule()), schedules.VPSchedule(), (2,), 'ddim', 4,
              mesh=parallel.make_mesh())
  with pytest.raises(ValueError, match='num_samples=0: draw 1 or more samples'):
    s(None, jax.random.key(0), 0)


def test_lowered_programs_are_the_sampler():
  # Sampler.lower (used to measure compile time ahead of time) lowers the very programs a
  # call runs: run by hand, chunk by chunk, they give the call's samples.
  schedule = schedules.VPSchedule()
  s = Sampler(gaussian_eps(schedule), schedule, (2,), 'ddim', 20, mesh=parallel.make_mesh())
  n, rng = 16, jax.random.key(3)
  init, run, finish = [low.compile() for low in s.lower(None, n)]
  rng_init, rng_loop = jax.random.split(rng)
  x = init(rng_init)
  for lo in s.bounds[:-1]:
    x = run(None, None, x, rng_loop, lo)
  np.testing.assert_allclose(np.asarray(finish(None, None, x)),
                             np.asarray(s(None, rng, n)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('num_steps,num_chunks,chunks', [(20, 10, 10), (999, 10, 9), (7, 3, 1),
                                                         (12, 5, 4), (1, 10, 1)])
def test_sampler_chunks_loop_a_static_number_of_steps(num_steps, num_chunks, chunks):
  # Equal chunks, so the compiled loop has a known trip count (traced bounds gave XLA a
  # while loop of unknown length, whose condition a GPU reads back every step); the chunks
  # still cover every step once, and the samples do not depend on how they are chunked.
  schedule = schedules.VPSchedule()
  s = Sampler(gaussian_eps(schedule), schedule, (2,), 'ancestral', num_steps,
              num_chunks=num_chunks)
  assert len(s.bounds) - 1 == chunks and s.bounds[-1] == num_steps
  assert set(np.diff(s.bounds)) == {num_steps // chunks}
  hlo = s.lower(None, 4)[1].compile().as_text()
  if num_steps // chunks > 1:   # (a loop of one step is inlined)
    assert f'"known_trip_count":{{"n":"{num_steps // chunks}"}}' in hlo
  one = Sampler(gaussian_eps(schedule), schedule, (2,), 'ancestral', num_steps, num_chunks=1)
  np.testing.assert_allclose(np.asarray(s(None, jax.random.key(0), 4)),
                             np.asarray(one(None, jax.random.key(0), 4)), rtol=1e-6, atol=1e-6)


def _small_unet():
  from cdiff_jax.models.unet import UNet
  net = UNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), num_groups=4,
             dropout=0.0)
  x = jnp.zeros((2, 8, 8, 1))
  params = net.init(jax.random.key(0), x, jnp.zeros((2,)))['params']
  # Non-zero last convolutions, so that every layer shapes the output.
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape),
                        params)
  return net, params


def _onednn_in(lowered) -> bool:
  """Whether the compiled program calls oneDNN; also checks that no YNNPACK fusion holds a
  convolution when it does (the second of parallel.INFERENCE_CPU_OPTIONS)."""
  import re
  text = lowered.compile().as_text()
  bodies = {m.group(1): m.group(2) for m in
            re.finditer(r'^%([\w.\-]+) \(.*?\) -> .*? \{\n(.*?)\n\}', text, re.M | re.S)}
  ynn = [bodies.get(c, '') for c in re.findall(r'%ynn_fusion[\w.]* = .*?calls=%([\w.\-]+)', text)]
  onednn = '__onednn$' in text
  if onednn:
    assert not any('convolution(' in body for body in ynn)
  return onednn


def test_sampler_cpu_onednn_option_changes_the_kernels_not_the_samples():
  # On CPU the sampler's network programs compile with oneDNN convolutions (parallel.py);
  # with cpu_onednn=False with XLA's own. Same samples up to float32 rounding.
  net, params = _small_unet()
  eps_fn = lambda p, x, t, c: net.apply({'params': p}, x, t)
  schedule = schedules.DDPMSchedule()
  out = {}
  for onednn in (True, False):
    s = Sampler(eps_fn, schedule, (8, 8, 1), 'ddim', 10, cpu_onednn=onednn)
    _, run, finish = s.lower(params, 8)
    if jax.default_backend() == 'cpu':
      assert _onednn_in(run) == _onednn_in(finish) == onednn
    out[onednn] = np.asarray(s(params, jax.random.key(1), 8))
  scale = np.abs(out[False]).max()
  assert scale > 0.1
  np.testing.assert_allclose(out[True], out[False], rtol=0, atol=1e-5 * scale)


def test_samplers_run_inside_a_users_jit_and_vmap():
  """A sampler called inside the caller's jax.jit or vmap is part of that program (the
  oneDNN compiler options apply to whole programs only; nested, they were an error) and
  draws the same samples as called on its own."""
  from cdiff_jax.sampling import mcmc
  schedule = schedules.DDPMSchedule()
  s = Sampler(gaussian_eps(schedule), schedule, (2,), 'ddim', 10)
  alone = np.asarray(s(None, jax.random.key(0), 4))
  np.testing.assert_allclose(np.asarray(jax.jit(lambda k: s(None, k, 4))(jax.random.key(0))),
                             alone, atol=1e-5)
  keys = jax.random.split(jax.random.key(1), 3)
  batched = np.asarray(jax.vmap(lambda k: s(None, k, 4))(keys))
  np.testing.assert_allclose(batched[1], np.asarray(s(None, keys[1], 4)), atol=1e-5)
  pot = mcmc.Potential(lambda p, x, t, c: (0.5 * jnp.sum(x ** 2, -1), x))
  annealed = mcmc.AnnealedMCMC(pot, schedule, (2,), kind='mala', num_steps=5, steps_per_level=2)
  np.testing.assert_allclose(
      np.asarray(jax.jit(lambda k: annealed(None, k, 4)[0])(jax.random.key(2))),
      np.asarray(annealed(None, jax.random.key(2), 4)[0]), atol=1e-5)


def _energy_potential(net):
  """E(x) = |net(x, t)|^2 / 2 with its input gradient: an energy network for the samplers."""
  from cdiff_jax.sampling import mcmc

  def fn(p, x, t, c):
    energy = lambda x_: 0.5 * jnp.sum(net.apply({'params': p}, x_, t) ** 2, axis=(1, 2, 3))
    e, vjp = jax.vjp(energy, x)
    return e, vjp(jnp.ones_like(e))[0]
  return mcmc.Potential(fn)


def test_mcmc_cpu_onednn_option_changes_the_kernels_not_the_samples():
  # The same for annealed MCMC, whose steps take input gradients of an energy network.
  from cdiff_jax.sampling import mcmc
  net, params = _small_unet()
  potential = _energy_potential(net)

  out = {}
  for onednn in (True, False):
    sampler = mcmc.AnnealedMCMC(potential, schedules.DDPMSchedule(), (8, 8, 1),
                                kind='mala', num_steps=5, steps_per_level=2, step_size=0.05,
                                denoise=False, cpu_onednn=onednn)
    x, info = sampler(params, jax.random.key(2), 8)
    if jax.default_backend() == 'cpu':
      assert _onednn_in(sampler.lower(params, 8)) == onednn
    out[onednn] = (np.asarray(x), np.asarray(info['accept_rate']))
  scale = np.abs(out[False][0]).max()
  np.testing.assert_allclose(out[True][0], out[False][0], rtol=0, atol=1e-5 * scale)
  np.testing.assert_allclose(out[True][1], out[False][1], atol=1e-6)


def test_mcmc_differentiates_with_loop_friendly_convolutions_on_cpu():
  # On CPU the annealed sampler traces the network with unet.loop_friendly_conv by default
  # (XLA:CPU's own convolution gradients are 20-50x slower inside its loop): the stride-2
  # convolution's input gradient becomes a forward convolution of a zero-upsampled array
  # instead of lax's input-dilated one. Same samples either way.
  from cdiff_jax.sampling import mcmc
  net, params = _small_unet()
  potential = _energy_potential(net)

  out, dilated = {}, {}
  for friendly in (None, False):
    sampler = mcmc.AnnealedMCMC(potential, schedules.DDPMSchedule(), (8, 8, 1),
                                kind='ula', num_steps=4, steps_per_level=2, step_size=0.05,
                                denoise=False, cpu_onednn=False, loop_friendly_grads=friendly)
    dilated[friendly] = 'lhs_dilate = [2, 2]' in sampler.lower(params, 8).as_text()
    out[friendly] = np.asarray(sampler(params, jax.random.key(2), 8)[0])
  assert dilated == {None: jax.default_backend() != 'cpu', False: True}
  np.testing.assert_allclose(out[None], out[False], rtol=0,
                             atol=1e-5 * np.abs(out[False]).max())
