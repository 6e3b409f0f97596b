"""Reverse-diffusion samplers: ancestral DDPM, DDIM(eta), reverse-SDE Euler-Maruyama and the
probability-flow ODE with Heun's method.

All samplers take ``eps_fn(params, x, t, cond) -> eps`` (a pure function; guidance and
composition are built into it by ``cdiff_jax.methods.guidance``), walk the decreasing time
grid ``1 = t_0 > ... > t_n = t_min`` of the schedule and finish with the denoising step
``x_0 = (x - sigma eps) / alpha`` at ``t_n`` (for DDPM that is the usual last step).

The loop runs on device (``lax.fori_loop``), split into a few chunks only so that a progress
bar can advance; each chunk is the same compiled program, of a fixed number of steps (the
number of chunks divides ``num_steps``), so the compiled loop has a known trip count (on a
GPU, XLA then runs it without reading the loop condition back to the host every step).
With a mesh, the samples are sharded over the ``data`` axis.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from cdiff_jax import losses, parallel
from cdiff_jax import schedules as schedules_lib

SAMPLERS = ('ancestral', 'ddim', 'euler_maruyama', 'heun')


def _bcast(v, x):
  return jnp.broadcast_to(v, (x.shape[0],)).reshape((-1,) + (1,) * (x.ndim - 1))


def _x0_from_eps(x, eps, alpha, sigma, clip):
  x0 = (x - sigma * eps) / alpha
  return jnp.clip(x0, -clip, clip) if clip else x0


def make_step(eps_fn: Callable, schedule: schedules_lib.Schedule, sampler: str,
              eta: float = 0.0, clip: float | None = None) -> Callable:
  """One transition ``(params, cond, x, t, s, key) -> x_s`` from time t to s < t."""
  if sampler not in SAMPLERS:
    raise ValueError(f'sample.sampler={sampler!r} is unknown; use one of {SAMPLERS}.')

  def eps_at(params, cond, x, t):
    eps = eps_fn(params, x, jnp.full((x.shape[0],), t), cond)
    losses.check_like(eps, x, 'eps_fn(params, x, t, cond)')
    return eps

  def ddim_like(params, cond, x, t, s, key, eta_):
    a_t, s_t = _bcast(schedule.alpha(t), x), _bcast(schedule.sigma(t), x)
    a_s, s_s = _bcast(schedule.alpha(s), x), _bcast(schedule.sigma(s), x)
    eps = eps_at(params, cond, x, t)
    x0 = _x0_from_eps(x, eps, a_t, s_t, clip)
    if clip:  # Keep eps consistent with the clipped x0.
      eps = (x - a_t * x0) / s_t
    # Variance of the DDPM posterior q(x_s | x_t, x_0), scaled by eta^2.
    a_ts2 = (a_t / a_s) ** 2
    post_var = (s_t ** 2 - a_ts2 * s_s ** 2) * s_s ** 2 / s_t ** 2
    c2 = eta_ ** 2 * post_var
    noise = jax.random.normal(key, x.shape, x.dtype)
    return a_s * x0 + jnp.sqrt(jnp.maximum(s_s ** 2 - c2, 0.0)) * eps + jnp.sqrt(c2) * noise

  def euler_maruyama(params, cond, x, t, s, key):
    beta = _bcast(schedule.beta(t), x)
    score = -eps_at(params, cond, x, t) / _bcast(schedule.sigma(t), x)
    dt = t - s
    noise = jax.random.normal(key, x.shape, x.dtype)
    return x + (0.5 * beta * x + beta * score) * dt + jnp.sqrt(beta * dt) * noise

  def heun(params, cond, x, t, s, key):
    del key

    def drift(x_, u):  # dx/du of the probability-flow ODE
      beta = _bcast(schedule.beta(u), x_)
      return -0.5 * beta * (x_ - eps_at(params, cond, x_, u) / _bcast(schedule.sigma(u), x_))

    d1 = drift(x, t)
    x_euler = x + (s - t) * d1
    return x + 0.5 * (s - t) * (d1 + drift(x_euler, s))

  if sampler == 'ancestral':
    return functools.partial(ddim_like, eta_=1.0)
  if sampler == 'ddim':
    return functools.partial(ddim_like, eta_=eta)
  return euler_maruyama if sampler == 'euler_maruyama' else heun


def denoise(eps_fn, schedule, params, cond, x, t, clip=None):
  """E[x_0 | x_t] under the model (Tweedie): the samplers' final step."""
  tt = jnp.full((x.shape[0],), t)
  a, s = _bcast(schedule.alpha(t), x), _bcast(schedule.sigma(t), x)
  eps = eps_fn(params, x, tt, cond)
  losses.check_like(eps, x, 'eps_fn(params, x, t, cond)')
  return _x0_from_eps(x, eps, a, s, clip)


class Sampler:
  """A compiled sampler. ``sampler(params, rng, num_samples, cond=None) -> samples``.

  ``cpu_onednn``: on CPU, compile the network's programs with oneDNN convolutions and
  single-dot YNNPACK fusions (``parallel.INFERENCE_CPU_OPTIONS``: 100-step DDIM 1.4-1.5x
  faster, same samples up to float32 rounding); False keeps the process's XLA options. Other
  backends ignore it. ``check_cond(cond, num_samples) -> cond``: checks (and may convert) a
  call's ``cond`` on the host before anything runs (e.g. ``Experiment.check_labels``)."""

  def __init__(self, eps_fn: Callable, schedule: schedules_lib.Schedule, shape: tuple,
               sampler: str = 'ddim', num_steps: int = 100, eta: float = 0.0,
               clip: float | None = None, mesh=None, num_chunks: int = 10,
               cpu_onednn: bool = True, check_cond: Callable | None = None):
    if num_steps < 1:
      raise ValueError(f'num_steps={num_steps}: a sampler takes 1 or more steps.')
    if sampler == 'ddim' and not 0.0 <= eta <= 1.0:  # (NaN fails too)
      raise ValueError(f'eta={eta}: DDIM\'s noise must lie in [0, 1] (0: deterministic, 1: as '
                       'much noise as ancestral sampling).')
    self._check_cond = check_cond
    self.schedule = schedule
    self.shape = tuple(shape)
    self.times = schedule.time_grid(num_steps)
    self.num_steps = num_steps
    self.mesh = mesh
    # Equal chunks (the most chunks up to num_chunks that divide num_steps): every call of
    # ``run`` loops a static number of steps.
    chunks = max(k for k in range(1, max(min(num_chunks, num_steps), 1) + 1)
                 if num_steps % k == 0)
    self.chunk_steps = num_steps // chunks
    self.bounds = [i * self.chunk_steps for i in range(chunks + 1)]
    step = make_step(eps_fn, schedule, sampler, eta, clip)
    times = self.times
    out_sharding = parallel.batch_sharding(mesh) if mesh is not None else None
    self._x_sharding = out_sharding

    def init(rng, n):
      x = jax.random.normal(rng, (n,) + self.shape)
      if mesh is not None:
        x = jax.lax.with_sharding_constraint(x, out_sharding)
      return x

    def run(params, cond, x, rng, lo):   # steps lo .. lo + chunk_steps - 1
      def body(j, x):
        i = lo + j
        return step(params, cond, x, times[i], times[i + 1], jax.random.fold_in(rng, i))
      return jax.lax.fori_loop(0, self.chunk_steps, body, x)

    def finish(params, cond, x):
      return denoise(eps_fn, schedule, params, cond, x, times[-1], clip)

    self._init = jax.jit(init, static_argnums=1)
    # On CPU the network's programs compile with oneDNN convolutions (parallel.py).
    self._run = parallel.inference_jit(run, cpu_onednn, donate_argnums=2)
    self._finish = parallel.inference_jit(finish, cpu_onednn)

  def lower(self, params, num_samples: int, cond=None) -> list:
    """The sampler's three programs (initial noise, a chunk of steps, the final denoising)
    lowered for ``num_samples`` samples; ``.compile()`` each to compile them ahead of time
    (e.g. to measure compile time; calls compile on first use all the same)."""
    rng = jax.random.key(0)
    x = jax.ShapeDtypeStruct((num_samples,) + self.shape, jnp.float32,
                             sharding=self._x_sharding)
    return [self._init.lower(rng, num_samples),
            self._run.lower(params, cond, x, rng, 0),
            self._finish.lower(params, cond, x)]

  def __call__(self, params, rng, num_samples: int, cond=None, progress: bool = False):
    if num_samples < 1:
      raise ValueError(f'num_samples={num_samples}: draw 1 or more samples.')
    if self.mesh is not None:
      parallel.check_batch_size(num_samples, self.mesh, 'number of samples')
    if self._check_cond is not None:
      cond = self._check_cond(cond, num_samples)
    rng_init, rng_loop = jax.random.split(rng)
    x = self._init(rng_init, num_samples)
    for lo in tqdm(self.bounds[:-1], desc='sampling', disable=not progress, leave=False):
      x = self._run(params, cond, x, rng_loop, lo)
    return self._finish(params, cond, x)


def sample(eps_fn, schedule, params, rng, shape, num_samples, cond=None, **kwargs):
  """One-off convenience wrapper around ``Sampler``."""
  return Sampler(eps_fn, schedule, shape, **kwargs)(params, rng, num_samples, cond)
