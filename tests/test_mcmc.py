"""Annealed MCMC samplers: invariance of known targets, hand-computed Metropolis ratios,
per-example acceptance, ULA's step-size bias, and the product toy with exact scores."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdiff_jax import schedules, toys
from cdiff_jax.methods import guidance
from cdiff_jax.sampling import Sampler, mcmc


GAUSS_S05 = toys.GaussianMixture(((0.0, 0.0),), ((0.5, 0.5),), (1.0,))  # N(0, 0.25 I)


def _energy_grad_of(log_prob):
  """x -> (E, grad E) of a per-example log-density, by autodiff."""

  def energy_grad(x):
    energy, vjp = jax.vjp(lambda x_: -log_prob(x_), x)
    return energy, vjp(jnp.ones_like(energy))[0]

  return energy_grad


# Two well-separated Gaussian modes of unequal weight: a non-Gaussian target whose
# moments are known exactly.
MIXTURE = toys.GaussianMixture(((-1.0, 0.0), (1.0, 0.5)), ((0.3, 0.4), (0.5, 0.3)), (0.3, 0.7))


def _moments(x):
  return np.concatenate([x.mean(0), (x ** 2).mean(0), [(x[:, 0] * x[:, 1]).mean()]])


def _exact_moments(mix):
  means, stds, w = mix.arrays
  m1 = (w[:, None] * means).sum(0)
  m2 = (w[:, None] * (means ** 2 + stds ** 2)).sum(0)
  cross = (w * means[:, 0] * means[:, 1]).sum()
  return np.concatenate([m1, m2, [cross]])


@pytest.mark.parametrize('kind,step', [('mala', 0.03), ('hmc', 0.15)])
def test_mala_and_hmc_leave_a_gaussian_mixture_invariant(kind, step):
  """Chains started from exact samples stay exact samples: their moments must match the
  target's to Monte Carlo accuracy after many steps. A wrong proposal density (2 eta^2
  instead of 4 eta) or a cancelled kinetic energy moves them by many standard errors."""
  n = 4000
  x0 = jnp.asarray(MIXTURE.sample(np.random.default_rng(0), n))
  energy_grad = _energy_grad_of(MIXTURE.log_prob)
  run = jax.jit(lambda x, key: mcmc.run_chain(kind, energy_grad, x, step, 150, key,
                                              num_leapfrog=3, damping=0.5))
  x, _, acc = run(x0, jax.random.key(1))
  x = np.asarray(x)
  exact = _exact_moments(MIXTURE)
  # Standard errors of the moments of n independent exact draws (each chain's marginal
  # is the target at every step if the kernel is invariant).
  ref = MIXTURE.sample(np.random.default_rng(2), 200_000)
  feats = np.concatenate([ref, ref ** 2, ref[:, :1] * ref[:, 1:]], axis=1)
  se = feats.std(0) / math.sqrt(n)
  assert 0.3 < float(acc.mean()) < 0.999, 'step size makes the test uninformative'
  assert np.all(np.abs(_moments(x) - exact) < 4.5 * se), (_moments(x), exact, se)
  # The chains moved: this is not a test of a kernel that rejects everything.
  assert np.mean(np.linalg.norm(x - np.asarray(x0), axis=1)) > 0.1


def test_uhmc_has_the_leapfrog_shadow_variance_while_hmc_has_none():
  """Unadjusted HMC on N(0, s^2 I) with leapfrog step h samples exp(-H~) exactly, with the
  leapfrog's conserved energy H~ = |p|^2 / 2 + (1 - h^2 / (4 s^2)) |x|^2 / (2 s^2) (the
  momentum refresh keeps p ~ N(0, I)): the position variance is s^2 / (1 - h^2 / (4 s^2)),
  4/3 s^2 at h = s. HMC's Metropolis test removes the bias. Chains start from exact samples
  with stationary momentum; a U-HMC move that returned its start would stay at s^2. (Two
  leapfrog steps: three of h = s turn the oscillator by exactly pi, x -> -x, every move.)"""
  s2, h, n = 0.25, 0.5, 4000
  energy_grad = _energy_grad_of(GAUSS_S05.log_prob)
  x0 = jnp.asarray(GAUSS_S05.sample(np.random.default_rng(0), n))
  p0 = jax.random.normal(jax.random.key(5), x0.shape)
  shadow = s2 / (1.0 - h ** 2 / (4 * s2))
  se = math.sqrt(2.0 / (2 * n))  # relative standard error of a variance from 2n values
  for kind, want in (('uhmc', shadow), ('hmc', s2)):
    run = jax.jit(lambda x, p, key, kind=kind: mcmc.run_chain(
        kind, energy_grad, x, h, 200, key, num_leapfrog=2, damping=0.5, p=p))
    x, _, acc = run(x0, p0, jax.random.key(1))
    var = float(np.asarray(x, np.float64).var())
    assert abs(var / want - 1.0) < 4.5 * se, (kind, var, want)
    assert np.mean(np.linalg.norm(np.asarray(x) - np.asarray(x0), axis=1)) > 0.1
    if kind == 'uhmc':
      assert float(acc.min()) == 1.0
    else:
      assert 0.3 < float(acc.mean()) < 0.999


def test_uhmc_moves_continue_one_trajectory_without_refresh():
  """With no momentum refresh (damping 0) K U-HMC moves of L leapfrog steps are one
  leapfrog trajectory of K L steps: each move carries its end momentum into the next (a
  move that returned -p, a valid HMC involution, would turn back and undo the last)."""
  energy_grad = _energy_grad_of(GAUSS_S05.log_prob)
  x0 = jnp.asarray(GAUSS_S05.sample(np.random.default_rng(0), 500))
  p0 = jax.random.normal(jax.random.key(1), x0.shape)
  x, p, _ = mcmc.run_chain('uhmc', energy_grad, x0, 0.1, 2, jax.random.key(2),
                           num_leapfrog=3, damping=0.0, p=p0)
  x6, p6, _, _ = mcmc.leapfrog(energy_grad, x0, p0, energy_grad(x0)[1], 0.1, 6)
  np.testing.assert_allclose(np.asarray(x), np.asarray(x6), atol=1e-5)
  np.testing.assert_allclose(np.asarray(p), np.asarray(p6), atol=1e-5)
  assert float(jnp.abs(x - x0).mean()) > 0.1


def test_annealed_uhmc_starts_from_the_stationary_momentum():
  """AnnealedMCMC draws the initial momentum from N(0, I): on a flat potential one U-HMC
  move of L leapfrog steps of size h shifts x by h L p (p ~ N(0, I) after a refresh of
  damping d ~ 0), against the same sampler with no MCMC step (same keys otherwise). A zero
  initial momentum would leave only sqrt(d) of it."""
  flat = mcmc.Potential(lambda params, x, t, c: (jnp.zeros(x.shape[0]), jnp.zeros_like(x)))
  sched = schedules.DDPMSchedule()
  h, steps = 0.2, 3
  kw = dict(kind='uhmc', num_steps=1, step_size=h, step_schedule='constant',
            num_leapfrog=steps, damping=1e-6, denoise=False)
  x1, _ = mcmc.AnnealedMCMC(flat, sched, (2,), steps_per_level=1, **kw)(
      None, jax.random.key(0), 4000)
  x0, _ = mcmc.AnnealedMCMC(flat, sched, (2,), steps_per_level=0, **kw)(
      None, jax.random.key(0), 4000)
  shift = np.asarray(x1 - x0) / (h * steps)
  assert abs(shift.mean()) < 0.05 and abs(shift.std() - 1.0) < 0.05, shift.std()


def test_ula_bias_shows_at_large_step_while_mala_has_none():
  """On N(0, s^2 I), ULA with step eta has the stationary variance s^2 / (1 - eta / (2 s^2))
  (4/3 s^2 at eta = s^2 / 2); MALA corrects it to s^2."""
  s2 = 0.25
  energy_grad = _energy_grad_of(GAUSS_S05.log_prob)
  x0 = jnp.asarray(GAUSS_S05.sample(np.random.default_rng(0), 4000))
  eta = 0.5 * s2
  var = {}
  for kind in ('ula', 'mala'):
    x, _, _ = jax.jit(lambda x, k, kind=kind: mcmc.run_chain(kind, energy_grad, x, eta, 60, k))(
        x0, jax.random.key(3))
    var[kind] = float(np.var(np.asarray(x)))
  assert abs(var['ula'] / s2 - 4 / 3) < 0.06, var
  assert abs(var['mala'] / s2 - 1.0) < 0.05, var


def _quartic(x):
  """E(x) = x^2 / 2 + 0.1 x^4 (summed over coordinates), per example."""
  return jnp.sum(0.5 * x ** 2 + 0.1 * x ** 4, axis=-1)


def _quartic_grad(x):
  return x + 0.4 * x ** 3


def test_mala_acceptance_probability_matches_hand_computation():
  x, x_prop, eta = 0.3, 1.5, 0.5
  e = lambda v: 0.5 * v ** 2 + 0.1 * v ** 4
  g = lambda v: v + 0.4 * v ** 3
  # By hand: log q(b | a) = -(b - a + eta g(a))^2 / (4 eta).
  log_q_fwd = -(x_prop - x + eta * g(x)) ** 2 / (4 * eta)
  log_q_bwd = -(x - x_prop + eta * g(x_prop)) ** 2 / (4 * eta)
  expected = e(x) - e(x_prop) + log_q_bwd - log_q_fwd

  energy_grad = lambda v: (_quartic(v), _quartic_grad(v))
  xb = jnp.asarray([[x]])
  noise = (x_prop - x + eta * g(x)) / math.sqrt(2 * eta)  # makes the proposal x_prop
  _, _, _, _, log_alpha = mala_out = mcmc.mala_step(
      energy_grad, xb, _quartic(xb), _quartic_grad(xb), eta, jax.random.key(0),
      noise=jnp.asarray([[noise]]))
  np.testing.assert_allclose(float(log_alpha[0]), expected, rtol=1e-5, atol=1e-6)
  # Pencil and paper: E(0.3) = 0.04581, E(1.5) = 1.63125, g(0.3) = 0.3108, g(1.5) = 2.85;
  # log q fwd = -1.3554^2 / 2, log q bwd = -0.225^2 / 2  ->  log alpha = -0.69220.
  assert math.isclose(expected, -0.69220, abs_tol=1e-4)
  del mala_out


def test_hmc_acceptance_probability_matches_hand_computation():
  """One leapfrog step by hand; H uses the momentum *before* the leapfrog."""
  x, p, step = 0.4, 1.2, 0.5
  g = lambda v: v + 0.4 * v ** 3
  e = lambda v: 0.5 * v ** 2 + 0.1 * v ** 4
  p_half = p - 0.5 * step * g(x)
  x1 = x + step * p_half
  p1 = p_half - 0.5 * step * g(x1)
  expected = (e(x) + 0.5 * p ** 2) - (e(x1) + 0.5 * p1 ** 2)

  energy_grad = lambda v: (_quartic(v), _quartic_grad(v))
  xb, pb = jnp.asarray([[x]]), jnp.asarray([[p]])
  x_new, p_new, _, _ = mcmc.leapfrog(energy_grad, xb, pb, _quartic_grad(xb), step, 1)
  np.testing.assert_allclose([float(x_new[0, 0]), float(p_new[0, 0])], [x1, p1], rtol=1e-6)
  log_alpha = mcmc.hmc_log_accept(_quartic(xb), pb, _quartic(x_new), p_new)
  np.testing.assert_allclose(float(log_alpha[0]), expected, rtol=1e-5, atol=1e-7)
  # The kernel itself: damping -> 0 keeps the momentum, so its ratio is the same one.
  *_, log_alpha_kernel = mcmc.hmc_step(energy_grad, xb, pb, _quartic(xb), _quartic_grad(xb),
                                       step, 1, 1e-12, jax.random.key(0))
  np.testing.assert_allclose(float(log_alpha_kernel[0]), expected, rtol=1e-4, atol=1e-6)
  assert abs(expected) > 1e-3  # a non-trivial energy error, so a cancelled K would show


def test_acceptance_is_per_example():
  """A batch where one proposal is terrible: only that example is rejected."""
  energy_grad = lambda v: (_quartic(v), _quartic_grad(v))
  x = jnp.zeros((8, 2))
  noise = jnp.full((8, 2), 0.1).at[3].set(1.0)
  # Example 3 proposes with a huge step: the reverse move is then wildly improbable.
  eta = jnp.full((8,), 0.01).at[3].set(5.0)
  x_new, e_new, g_new, accept, log_alpha = mcmc.mala_step(
      energy_grad, x, _quartic(x), _quartic_grad(x), eta, jax.random.key(0), noise=noise)
  accept = np.asarray(accept)
  assert not accept[3] and float(log_alpha[3]) < -100
  assert accept[np.arange(8) != 3].all()
  np.testing.assert_array_equal(np.asarray(x_new[3]), 0.0)
  assert np.all(np.asarray(x_new[np.arange(8) != 3]) != 0.0)
  # The energy and gradient carried to the next step are those of the state kept: the
  # rejected example's own (a proposal's would enter its next ratio and proposal).
  np.testing.assert_allclose(np.asarray(e_new), np.asarray(_quartic(x_new)), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(g_new), np.asarray(_quartic_grad(x_new)), rtol=1e-6)

  # HMC: one example takes a leapfrog step far beyond the stable size, so its trajectory
  # explodes; the others still move.
  p = jnp.full((8, 2), 0.5).at[5].set(3.0)
  step = jnp.full((8,), 0.1).at[5].set(2.0)
  x_h, p_h, e_h, g_h, acc_h, log_alpha_h = mcmc.hmc_step(
      energy_grad, x, p, _quartic(x), _quartic_grad(x), step, 3, 1e-6, jax.random.key(1))
  assert float(log_alpha_h[5]) < -100
  acc_h = np.asarray(acc_h)
  assert not acc_h[5] and acc_h[np.arange(8) != 5].all()
  np.testing.assert_array_equal(np.asarray(x_h[5]), 0.0)
  np.testing.assert_allclose(np.asarray(e_h), np.asarray(_quartic(x_h)), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(g_h), np.asarray(_quartic_grad(x_h)), rtol=1e-6)
  assert float(p_h[5, 0]) < -2.9  # rejected: momentum flipped (generalized HMC)


def test_metropolis_samplers_refuse_score_only_models():
  pot = mcmc.Potential(lambda p, x, t, c: (jnp.zeros(x.shape[0]), x), has_energy=False)
  with pytest.raises(ValueError, match='parameterization'):
    mcmc.AnnealedMCMC(pot, schedules.DDPMSchedule(), (2,), kind='hmc')
  mcmc.AnnealedMCMC(pot, schedules.DDPMSchedule(), (2,), kind='uhmc')  # allowed


def test_mcmc_beats_reverse_diffusion_on_the_product_toy():
  """Ring of 8 Gaussians AND a vertical bar, exact component scores at every noise level:
  reverse diffusion with the summed score is biased (the product of noised densities is
  not the noised product); annealed MALA and HMC correct it. Judged by the mean exact
  log-likelihood of the samples under the composed target."""
  sched = schedules.DDPMSchedule()
  bench = toys.benchmarks()['product']
  comps = guidance.analytic_components([c.log_prob for c in bench.components], sched)
  pot = guidance.combine(comps, 'product', bench.weights)
  n, levels = 1000, 50
  ll = lambda x: float(np.mean(np.asarray(bench.target.log_prob(jnp.asarray(x)))))
  exact_ll = ll(bench.target.sample(np.random.default_rng(0), 4000))
  diffusion = Sampler(mcmc.eps_fn_from_potential(pot, sched), sched, (2,), sampler='ancestral',
                      num_steps=levels, num_chunks=1)
  ll_diffusion = ll(diffusion(None, jax.random.key(0), n))
  results = {}
  for kind, step in (('mala', 0.5), ('hmc', 0.5)):
    sampler = mcmc.AnnealedMCMC(pot, sched, (2,), kind=kind, num_steps=levels,
                                steps_per_level=5, step_size=step)
    x, info = sampler(None, jax.random.key(0), n)
    acc = np.asarray(info['accept_rate'])
    assert acc.shape == (levels,) and np.all((acc > 0.2) & (acc <= 1.0))
    results[kind] = ll(x)
  assert ll_diffusion < exact_ll - 0.5, (ll_diffusion, exact_ll)
  for kind, value in results.items():
    assert value > ll_diffusion + 0.25, (kind, value, ll_diffusion, exact_ll)


def test_nan_ratios_reject():
  """A NaN log-ratio (an overflowing energy) rejects; a ratio of +inf or 0 accepts."""
  log_alpha = jnp.asarray([jnp.nan, 0.0, jnp.inf, jnp.nan, -jnp.inf])
  for seed in range(5):
    np.testing.assert_array_equal(np.asarray(mcmc.metropolis(jax.random.key(seed), log_alpha)),
                                  [False, True, True, False, False])
  # A MALA proposal into a region where the energy is NaN is rejected: x stays.
  energy_grad = lambda v: (jnp.where(v[:, 0] > 0.5, jnp.nan, _quartic(v)), _quartic_grad(v))
  x = jnp.zeros((4, 1))
  x_new, _, _, accept, _ = mcmc.mala_step(energy_grad, x, _quartic(x), _quartic_grad(x), 0.1,
                                          jax.random.key(0), noise=jnp.full((4, 1), 3.0))
  assert not np.asarray(accept).any()
  np.testing.assert_array_equal(np.asarray(x_new), 0.0)


def test_annealed_step_sizes_follow_the_noise_level_of_each_level():
  """step_schedule='sigma': eta_i = step_size sigma(t_i)^2 (ULA/MALA), eps_i = step_size
  sigma(t_i) (leapfrog), at the level t_i the MCMC runs at (info['times'])."""
  sched = schedules.DDPMSchedule()
  pot = mcmc.Potential(lambda p, x, t, c: (_quartic(x), _quartic_grad(x)))
  for kind, power in (('mala', 2), ('ula', 2), ('hmc', 1), ('uhmc', 1)):
    sampler = mcmc.AnnealedMCMC(pot, sched, (2,), kind=kind, num_steps=5, steps_per_level=1,
                                step_size=0.3)
    times = np.asarray(sched.time_grid(5))[1:]
    np.testing.assert_allclose(sampler.step_sizes, 0.3 * np.asarray(sched.sigma(times)) ** power,
                               rtol=1e-6)
  _, info = sampler(None, jax.random.key(0), 2)
  np.testing.assert_allclose(info['times'], times, rtol=1e-6)
  np.testing.assert_allclose(info['step_size'], 0.3 * np.asarray(sched.sigma(times)), rtol=1e-6)
  const = mcmc.AnnealedMCMC(pot, sched, (2,), num_steps=5, step_size=0.3, step_schedule='constant')
  np.testing.assert_allclose(const.step_sizes, 0.3)


def test_annealed_mcmc_targets_the_noise_level_it_stepped_to():
  """With many MALA steps per level, the output (no final denoising) is distributed as the
  noised data at the last level t_n: for data N(0, s0^2 I), N(0, (alpha^2 s0^2 + sigma^2) I)."""
  sched = schedules.DDPMSchedule()
  s0 = 0.2

  def fn(params, x, t, cond):
    v = (sched.alpha(t) * s0) ** 2 + sched.sigma(t) ** 2
    return jnp.sum(0.5 * x ** 2, -1) / v, x / v[:, None]

  times = np.asarray(sched.time_grid(2))
  v = np.asarray((sched.alpha(times) * s0) ** 2 + sched.sigma(times) ** 2)
  assert v[1] > 10 * v[2]  # the last two levels are far apart
  sampler = mcmc.AnnealedMCMC(mcmc.Potential(fn), sched, (2,), kind='mala', num_steps=2,
                              steps_per_level=150, step_size=0.01, step_schedule='constant',
                              denoise=False)
  x, info = sampler(None, jax.random.key(0), 2000)
  assert np.all(np.asarray(info['accept_rate']) > 0.5)
  assert abs(float(np.var(np.asarray(x))) / v[2] - 1.0) < 0.1, (np.var(np.asarray(x)), v)


def test_no_acceptance_rate_when_no_mcmc_step_is_proposed():
  """steps_per_level=0 is plain reverse diffusion: MALA and HMC propose nothing, so they
  report no acceptance rate (an earlier version reported 1.0 at every level)."""
  sched = schedules.DDPMSchedule()
  pot = mcmc.Potential(lambda p, x, t, c: (_quartic(x), _quartic_grad(x)))
  for kind in ('mala', 'hmc'):
    _, info = mcmc.AnnealedMCMC(pot, sched, (2,), kind=kind, num_steps=3,
                                steps_per_level=0)(None, jax.random.key(0), 4)
    assert 'accept_rate' not in info
    _, info = mcmc.AnnealedMCMC(pot, sched, (2,), kind=kind, num_steps=3,
                                steps_per_level=1, step_size=0.01)(None, jax.random.key(0), 4)
    assert np.asarray(info['accept_rate']).shape == (3,)


def test_clip_keeps_the_reverse_diffusion_prediction_in_range_not_the_mcmc_steps():
  """Point-mass data at x0 = 2: the exact potential ||x - alpha 2||^2 / 2 sigma^2 predicts
  x0 = 2 from any x. ``clip=1`` (``sample.clip``) keeps that prediction at 1 in the
  reverse-diffusion steps and the final denoising, so every sample is exactly 1 (2 without
  clip); the Langevin steps between sample the unclipped potential, so without the final
  denoising the samples lie around alpha 2, not alpha 1, at the last level."""
  sched = schedules.DDPMSchedule()
  c = 2.0

  def fn(params, x, t, cond):
    a, s = sched.alpha(t)[:, None], sched.sigma(t)[:, None]
    return jnp.sum((x - a * c) ** 2, -1) / (2 * s[:, 0] ** 2), (x - a * c) / s ** 2

  pot = mcmc.Potential(fn)
  kw = dict(kind='ula', num_steps=10, steps_per_level=2, step_size=0.05)
  for clip, want in ((1.0, 1.0), (None, c)):
    x, _ = mcmc.AnnealedMCMC(pot, sched, (3,), clip=clip, **kw)(None, jax.random.key(0), 500)
    np.testing.assert_allclose(np.asarray(x), want, rtol=1e-5, err_msg=str(clip))
  # Many Langevin steps at the last level: the chain forgets the clipped diffusion steps.
  t_last = sched.time_grid(2)[-1]
  x, _ = mcmc.AnnealedMCMC(pot, sched, (3,), kind='ula', num_steps=2, steps_per_level=300,
                           step_size=0.02, clip=1.0, denoise=False)(None, jax.random.key(1), 2000)
  assert abs(float(np.mean(np.asarray(x))) - float(sched.alpha(t_last)) * c) < 0.05
