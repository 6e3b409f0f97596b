"""Annealed MCMC samplers for composed diffusion models: ULA, MALA, U-HMC and HMC.

Why: a product (AND) of diffusion models is not the reverse process of any diffusion, so
reverse diffusion with a summed score is biased. At every noise level ``t_i`` of the
sampler's time grid we first take one ancestral reverse-diffusion step with the composed
score, then ``K`` MCMC steps that target the composed density ``p_t(x) ~ exp(-E(x, t))``
at that level (Du et al., "Reduce, Reuse, Recycle"). Metropolis-adjusted kernels need the
energy itself, so MALA and HMC need an energy-parameterized model (or an analytic one).

Everything works on a ``Potential``: ``fn(params, x, t, cond) -> (energy (B,), grad_x
energy (B, ...))``. Energy and gradient always come from one function, so a composed
energy and its gradient cannot disagree (see ``cdiff_jax.methods.guidance``).

Kernels (``x`` has a batch axis; every decision is per example):

* ULA:   ``x' = x - eta g(x) + sqrt(2 eta) xi``.
* MALA:  the ULA proposal, accepted with probability ``min(1, exp(log_alpha))``,
  ``log_alpha = E(x) - E(x') + log q(x | x') - log q(x' | x)`` and
  ``q(x' | x) = N(x'; x - eta g(x), 2 eta I)``, i.e. ``-||x' - x + eta g(x)||^2 / (4 eta)``.
* U-HMC: partial momentum refresh ``p <- sqrt(1 - d) p + sqrt(d) xi`` (``d`` = damping,
  1 = full refresh), ``L`` leapfrog steps of size ``eps``, always accepted.
* HMC:   the same moves with a Metropolis test on ``H = E(x) + ||p||^2 / 2``, where the
  kinetic energy of the start is taken from the refreshed momentum *before* the leapfrog
  (a value, never an alias that the leapfrog updates). A rejected move restores ``x`` and
  flips ``p`` (generalized HMC), which keeps the partial refresh exact.

Step sizes per level: ``step_schedule='sigma'`` scales with the noise level (``eta =
step_size * sigma_t^2`` for ULA/MALA, ``eps = step_size * sigma_t`` for the leapfrog: both
are lengths squared / lengths of the noised density); ``'constant'`` uses ``step_size``.
The 'sigma' rule assumes the noised density's width follows sigma_t, as it does for data
much narrower than 1 at low noise (images, the 2-D benchmarks); for data spread ~1 or
more the last levels' steps (sigma_t -> 0) barely move: use 'constant' there, or raise
``step_size``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import chex
import jax
import jax.numpy as jnp

from cdiff_jax import losses, parallel
from cdiff_jax import schedules as schedules_lib
from cdiff_jax.models import unet
from cdiff_jax.sampling import diffusion

KINDS = ('ula', 'mala', 'uhmc', 'hmc')
STEP_SCHEDULES = ('sigma', 'constant')


@dataclasses.dataclass(frozen=True)
class Potential:
  """``fn(params, x, t, cond) -> (energy (B,), grad_x energy like x)``.

  ``has_energy=False``: ``fn`` returns a meaningless energy (score-only models); only the
  unadjusted samplers (ULA, U-HMC) and reverse diffusion may use it.
  """

  fn: Callable
  has_energy: bool = True


def potential_from_model(model) -> Potential:
  """The potential of a ``ScoreModel``: its energy if it has one, else only its score.

  For MALA and HMC give a float32 network (``net.clone(dtype=jnp.float32)``; the
  parameters are float32 anyway): their Metropolis test compares energies of hundreds of
  nats to within a fraction of one, which bfloat16 rounds by nats at low noise.
  """

  def fn(params, x, t, cond):
    sigma = model.schedule.sigma(t).reshape((-1,) + (1,) * (x.ndim - 1))
    energy, eps = model.potential_terms(params, x, t, cond)
    return energy, eps / sigma

  return Potential(fn, has_energy=model.parameterization == 'energy')


def eps_fn_from_potential(potential: Potential, schedule: schedules_lib.Schedule) -> Callable:
  """``eps = sigma_t grad_x E``: plugs a (composed) potential into the core samplers."""

  def eps_fn(params, x, t, cond):
    sigma = schedule.sigma(t).reshape((-1,) + (1,) * (x.ndim - 1))
    return sigma * potential.fn(params, x, t, cond)[1]

  return eps_fn


# ----------------------------------------------------------------------------- kernels

def _sum_per_example(v):
  return jnp.sum(v.reshape(v.shape[0], -1), axis=-1)


def _per_example(v, x):
  """Scalar or (B,) -> broadcastable against x."""
  return jnp.broadcast_to(jnp.asarray(v, x.dtype), x.shape[:1]).reshape(
      (-1,) + (1,) * (x.ndim - 1))


def kinetic_energy(p):
  return 0.5 * _sum_per_example(p ** 2)


def mala_log_proposal(x_to, x_from, grad_from, eta):
  """log q(x_to | x_from) up to a constant that cancels in the MH ratio:
  ``-||x_to - x_from + eta g(x_from)||^2 / (4 eta)`` (the proposal variance is 2 eta)."""
  eta_b = _per_example(eta, x_to)
  return _sum_per_example(-(x_to - x_from + eta_b * grad_from) ** 2 / (4 * eta_b))


def mala_log_accept(x, energy, grad, x_prop, energy_prop, grad_prop, eta):
  """Per-example log MH ratio of a MALA move x -> x_prop."""
  return (energy - energy_prop + mala_log_proposal(x, x_prop, grad_prop, eta)
          - mala_log_proposal(x_prop, x, grad, eta))


def metropolis(key, log_alpha):
  """Per-example accept decisions: ``log u < log_alpha`` with one u per example."""
  u = jax.random.uniform(key, log_alpha.shape, minval=1e-12)
  # NaN ratios (an overflowing energy) reject.
  return jnp.log(u) < jnp.nan_to_num(log_alpha, nan=-jnp.inf)


def _select(accept, new, old):
  return jnp.where(accept.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)


def ula_step(energy_grad: Callable, x, grad, eta, key):
  """One ULA move; returns (x', energy', grad')."""
  noise = jax.random.normal(key, x.shape, x.dtype)
  eta_b = _per_example(eta, x)
  x_new = x - eta_b * grad + jnp.sqrt(2 * eta_b) * noise
  energy_new, grad_new = energy_grad(x_new)
  return x_new, energy_new, grad_new


def mala_step(energy_grad: Callable, x, energy, grad, eta, key, noise=None):
  """One MALA move per example; returns (x, energy, grad, accepted (B,), log_alpha (B,)).

  ``noise`` (default: drawn from ``key``) is the proposal's standard normal draw; tests
  pass it to construct particular proposals.
  """
  key_noise, key_accept = jax.random.split(key)
  if noise is None:
    noise = jax.random.normal(key_noise, x.shape, x.dtype)
  eta_b = _per_example(eta, x)
  x_prop = x - eta_b * grad + jnp.sqrt(2 * eta_b) * noise
  energy_prop, grad_prop = energy_grad(x_prop)
  log_alpha = mala_log_accept(x, energy, grad, x_prop, energy_prop, grad_prop, eta)
  accept = metropolis(key_accept, log_alpha)
  return (_select(accept, x_prop, x), jnp.where(accept, energy_prop, energy),
          _select(accept, grad_prop, grad), accept, log_alpha)


def leapfrog(energy_grad: Callable, x, p, grad, step, num_steps: int):
  """``num_steps`` leapfrog steps; returns (x, p, energy, grad) at the end.

  One gradient evaluation per step: the last one is reused as the next step's first.
  """
  step_b = _per_example(step, x)

  def body(carry, _):
    x, p, _, grad = carry
    p = p - 0.5 * step_b * grad
    x = x + step_b * p
    energy, grad = energy_grad(x)
    p = p - 0.5 * step_b * grad
    return (x, p, energy, grad), None

  init = (x, p, jnp.zeros((x.shape[0],), x.dtype), grad)
  (x, p, energy, grad), _ = jax.lax.scan(body, init, None, length=num_steps)
  return x, p, energy, grad


def hmc_log_accept(energy, p, energy_new, p_new):
  """Per-example log MH ratio ``H(x, p) - H(x', p')`` with ``H = E + ||p||^2 / 2``."""
  return (energy + kinetic_energy(p)) - (energy_new + kinetic_energy(p_new))


def hmc_step(energy_grad: Callable, x, p, energy, grad, step, num_leapfrog: int,
             damping: float, key, metropolis_adjust: bool = True):
  """Partial momentum refresh, ``num_leapfrog`` leapfrog steps, optional MH test.

  Returns (x, p, energy, grad, accepted (B,), log_alpha (B,)). Without the MH test (U-HMC)
  every move is accepted and log_alpha is 0.
  """
  key_p, key_accept = jax.random.split(key)
  xi = jax.random.normal(key_p, p.shape, p.dtype)
  p = jnp.sqrt(1.0 - damping) * p + jnp.sqrt(damping) * xi
  x_new, p_new, energy_new, grad_new = leapfrog(energy_grad, x, p, grad, step, num_leapfrog)
  if not metropolis_adjust:
    ones = jnp.ones((x.shape[0],), bool)
    return x_new, p_new, energy_new, grad_new, ones, jnp.zeros((x.shape[0],), x.dtype)
  log_alpha = hmc_log_accept(energy, p, energy_new, p_new)
  accept = metropolis(key_accept, log_alpha)
  return (_select(accept, x_new, x), _select(accept, p_new, -p),
          jnp.where(accept, energy_new, energy), _select(accept, grad_new, grad),
          accept, log_alpha)


def run_chain(kind: str, energy_grad: Callable, x, step, num_steps: int, key,
              num_leapfrog: int = 3, damping: float = 1.0, p=None):
  """``num_steps`` moves of one kernel at a fixed target.

  Returns (x, p, mean acceptance per step (num_steps,)). The building block of the
  annealed sampler, and what the invariance tests run. ``p=None`` starts U-HMC / HMC at
  zero momentum, which the first refresh replaces only in part when ``damping < 1``; to
  start at the stationary momentum, pass ``p = jax.random.normal(key, x.shape)`` (as
  ``AnnealedMCMC`` does).
  """
  if kind not in KINDS:
    raise ValueError(f'mcmc kind {kind!r} is unknown; use one of {KINDS}.')
  energy, grad = energy_grad(x)
  if jnp.shape(energy) != x.shape[:1]:
    raise ValueError(f'the energy function returned an energy of shape {jnp.shape(energy)} '
                     f'for x of shape {x.shape}; it must return one energy per example, '
                     f'shape {x.shape[:1]}.')
  losses.check_like(grad, x, 'the energy function (its gradient)')
  p = jnp.zeros_like(x) if p is None else p

  def body(carry, k):
    x, p, energy, grad = carry
    key_k = jax.random.fold_in(key, k)
    if kind == 'ula':
      x, energy, grad = ula_step(energy_grad, x, grad, step, key_k)
      acc = jnp.ones((x.shape[0],), bool)
    elif kind == 'mala':
      x, energy, grad, acc, _ = mala_step(energy_grad, x, energy, grad, step, key_k)
    else:
      x, p, energy, grad, acc, _ = hmc_step(energy_grad, x, p, energy, grad, step,
                                            num_leapfrog, damping, key_k,
                                            metropolis_adjust=kind == 'hmc')
    return (x, p, energy, grad), acc.astype(jnp.float32).mean()

  (x, p, _, _), acc = jax.lax.scan(body, (x, p, energy, grad), jnp.arange(num_steps))
  return x, p, acc


# ----------------------------------------------------------------------------- annealed

class SettingError(ValueError):
  """An ``AnnealedMCMC`` setting out of range: the argument (``field``), its ``value`` and
  the ``fix``, so that a command line or a config check can name its own flag or field."""

  def __init__(self, field: str, value, fix: str):
    super().__init__(f'mcmc.{field}={value!r}: {fix}')
    self.field, self.value, self.fix = field, value, fix


def check_settings(kind: str, steps_per_level: int, step_size: float, num_leapfrog: int,
                   damping: float, has_energy: bool, step_schedule: str = 'sigma') -> None:
  """Raises ``SettingError`` for the first setting of ``AnnealedMCMC`` it cannot run with."""
  if kind not in KINDS:
    raise SettingError('kind', kind, f'use one of {", ".join(KINDS)}.')
  if step_schedule not in STEP_SCHEDULES:
    raise SettingError('step_schedule', step_schedule,
                       f'use one of {", ".join(STEP_SCHEDULES)}.')
  if kind in ('mala', 'hmc') and not has_energy and steps_per_level:
    raise SettingError('kind', kind, "its Metropolis test needs energies, and the model is "
                       "score-only: train with model.parameterization='energy', or use "
                       "'ula' or 'uhmc'.")
  for field, value, ok, fix in (
      ('steps_per_level', steps_per_level, steps_per_level >= 0, 'give 0 or more.'),
      ('step_size', step_size, step_size > 0, 'give a positive number.'),
      ('num_leapfrog', num_leapfrog, num_leapfrog >= 1, 'give 1 or more.'),
      ('damping', damping, 0.0 < damping <= 1.0,
       'give a number in (0, 1] (1: a full momentum refresh).')):
    if not ok:
      raise SettingError(field, value, fix)


class AnnealedMCMC:
  """Reverse diffusion interleaved with K MCMC steps per noise level, compiled.

  ``sampler(params, rng, num_samples, cond=None) -> (samples, info)``; ``info`` holds
  ``times`` (the levels), ``step_size`` (per level) and, for MALA and HMC with K > 0,
  ``accept_rate`` (per level: mean over the batch and the K steps).

  ``steps_per_level=0`` is plain ancestral reverse diffusion with the same potential.
  ``clip``: as for ``Sampler`` (``sample.clip``), the reverse-diffusion steps between the
  levels and the final denoising keep their prediction of x_0 in [-clip, clip]; the MCMC
  steps sample the potential as it is. None (default): no clipping (low-dimensional data).
  ``cpu_onednn``: as for ``Sampler`` (oneDNN kernels on CPU). ``loop_friendly_grads``: trace
  the network's 3x3 convolutions with ``unet.loop_friendly_conv``, whose gradients XLA:CPU
  runs fast inside the sampler's loop (same values); None (default): on CPU only.
  """

  def __init__(self, potential: Potential, schedule: schedules_lib.Schedule, shape: tuple,
               kind: str = 'mala', num_steps: int = 100, steps_per_level: int = 10,
               step_size: float = 0.05, step_schedule: str = 'sigma', num_leapfrog: int = 3,
               damping: float = 0.5, denoise: bool = True, mesh=None, cpu_onednn: bool = True,
               loop_friendly_grads: bool | None = None, clip: float | None = None):
    check_settings(kind, steps_per_level, step_size, num_leapfrog, damping,
                   potential.has_energy, step_schedule)
    self.kind = kind
    self.steps_per_level = steps_per_level
    self.shape = tuple(shape)
    self.mesh = mesh
    if loop_friendly_grads is None:  # energy gradients inside the scan: see unet.py
      loop_friendly_grads = unet.loop_friendly_default(mesh)
    self.loop_friendly_grads = loop_friendly_grads
    times = schedule.time_grid(num_steps)
    self.times = times
    sigmas = schedule.sigma(times[1:])
    is_langevin = kind in ('ula', 'mala')
    if step_schedule == 'sigma':
      sizes = step_size * (sigmas ** 2 if is_langevin else sigmas)
    else:
      sizes = jnp.full_like(sigmas, step_size)
    self.step_sizes = sizes
    step = diffusion.make_step(eps_fn_from_potential(potential, schedule), schedule, 'ancestral',
                               clip=clip)
    out_sharding = parallel.batch_sharding(mesh) if mesh is not None else None

    def run(params, cond, rng, n):
      rng_init, rng_p, rng_loop = jax.random.split(rng, 3)
      x = jax.random.normal(rng_init, (n,) + self.shape)
      if mesh is not None:
        x = jax.lax.with_sharding_constraint(x, out_sharding)
      p = jax.random.normal(rng_p, x.shape)

      def level(carry, i):
        x, p = carry
        key = jax.random.fold_in(rng_loop, i)
        key_diff, key_mcmc = jax.random.split(key)
        x = step(params, cond, x, times[i], times[i + 1], key_diff)
        if not steps_per_level:
          return (x, p), jnp.float32(1.0)
        t = jnp.full((x.shape[0],), times[i + 1])
        energy_grad = lambda x_: potential.fn(params, x_, t, cond)
        x, p, acc = run_chain(kind, energy_grad, x, sizes[i], steps_per_level, key_mcmc,
                              num_leapfrog, damping, p)
        return (x, p), acc.mean()

      (x, _), acc = jax.lax.scan(level, (x, p), jnp.arange(len(times) - 1))
      if denoise:
        x = diffusion.denoise(eps_fn_from_potential(potential, schedule), schedule, params,
                              cond, x, times[-1], clip)
      return x, acc

    self._run = parallel.inference_jit(run, cpu_onednn, static_argnums=3)

  def lower(self, params, num_samples: int, cond=None):
    """The sampler's program lowered for ``num_samples`` samples, traced as a call traces it;
    ``.compile()`` it to compile ahead of time."""
    with unet.loop_friendly_conv_grads(self.loop_friendly_grads):
      return self._run.lower(params, cond, jax.random.key(0), num_samples)

  def __call__(self, params, rng, num_samples: int, cond=None):
    if self.mesh is not None:
      parallel.check_batch_size(num_samples, self.mesh, 'number of samples')
    with unet.loop_friendly_conv_grads(self.loop_friendly_grads):
      x, acc = self._run(params, cond, rng, num_samples)
    chex.assert_shape(x, (num_samples,) + self.shape)
    info = dict(times=self.times[1:], step_size=self.step_sizes)
    if self.kind in ('mala', 'hmc') and self.steps_per_level:  # 0 steps: nothing proposed
      info['accept_rate'] = acc
    return x, info


__all__ = ['KINDS', 'Potential', 'AnnealedMCMC', 'SettingError', 'check_settings',
           'potential_from_model', 'eps_fn_from_potential', 'ula_step', 'mala_step',
           'mala_log_accept', 'mala_log_proposal', 'hmc_step', 'hmc_log_accept', 'leapfrog',
           'kinetic_energy', 'metropolis', 'run_chain']
