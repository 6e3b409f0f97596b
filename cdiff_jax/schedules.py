"""Noise schedules of variance-preserving diffusions.

Every schedule maps continuous time ``t`` in [0, 1] to ``alpha_t`` and ``sigma_t`` with
``alpha_t**2 + sigma_t**2 = 1`` and ``x_t = alpha_t x_0 + sigma_t eps``. The discrete DDPM
schedule is the piecewise log-linear interpolation of its ``alphabar`` grid, so at the
grid times ``t_i = i / T`` it is exactly DDPM, and the SDE samplers can still use it.

Schedules are frozen dataclasses: hashable, so they can be static arguments of jitted
functions, and their methods are pure jnp functions of ``t``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

# log-SNR is clipped here so that alpha_t and sigma_t stay representable in float32.
LOG_SNR_MAX = 20.0


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Base class. Subclasses define ``log_alpha2`` (log alphabar) and ``beta``."""

  # Smallest time used for training and as the end point of samplers; continuous
  # schedules have sigma_0 = 0, where the eps-parameterization is ill defined.
  t_min: float = 1e-3
  # Discrete schedules set T; 0 means continuous time.
  num_steps: int = 0

  def log_alpha2(self, t):
    raise NotImplementedError

  def beta(self, t):
    """beta(t) = -d/dt log alphabar(t), the SDE's drift and diffusion rate."""
    return -jax.vmap(jax.grad(self.log_alpha2))(jnp.ravel(t)).reshape(jnp.shape(t))

  def alpha(self, t):
    return jnp.exp(0.5 * self.log_alpha2(t))

  def sigma(self, t):
    return jnp.sqrt(-jnp.expm1(self.log_alpha2(t)))

  def alpha_sigma(self, t):
    return self.alpha(t), self.sigma(t)

  def log_snr(self, t):
    la2 = self.log_alpha2(t)
    return la2 - jnp.log(-jnp.expm1(la2))

  def sample_t(self, rng, shape, stratified: bool = False):
    """Training times: uniform on [t_min, 1], or uniform on the grid if discrete.

    ``stratified``: one uniform offset u and u_i = frac(u + i * golden ratio) for the i-th
    example (a low-discrepancy sequence, as VDM's antithetic times): every u_i is still
    uniform, but any contiguous run of examples covers [0, 1) evenly, so the mean loss of
    each group of a grouped batch (and of each device's shard) has much less variance.
    """
    if stratified:
      n = int(np.prod(shape))
      u = jax.random.uniform(rng, ())
      u = jnp.mod(u + jnp.arange(n, dtype=jnp.float32) * 0.6180339887498949, 1.0).reshape(shape)
    else:
      u = jax.random.uniform(rng, shape)
    if self.num_steps:
      i = jnp.minimum(jnp.floor(u * self.num_steps).astype(jnp.int32), self.num_steps - 1) + 1
      return i.astype(jnp.float32) / self.num_steps
    return self.t_min + (1.0 - self.t_min) * u

  def t_from_log_snr(self, log_snr, iters: int = 40):
    """Inverse of ``log_snr`` on [t_min, 1] (bisection; log-SNR is decreasing in t)."""
    lo = jnp.full(jnp.shape(log_snr), self.t_min if not self.num_steps else 1.0 / self.num_steps)
    hi = jnp.ones(jnp.shape(log_snr))

    def body(_, bounds):
      lo, hi = bounds
      mid = 0.5 * (lo + hi)
      above = self.log_snr(mid) > log_snr  # mid is too early
      return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iters, body, (lo, hi))
    return 0.5 * (lo + hi)

  def time_grid(self, num_steps: int):
    """Decreasing times ``1 = t_0 > ... > t_n`` for an n-step sampler, ending at ``t_min``
    (continuous schedules) or at the first grid time 1/T (a discrete schedule of T steps,
    whose times all lie on its grid: DDIM's sub-sequence).
    """
    if self.num_steps:
      idx = np.linspace(self.num_steps, 1, num_steps + 1).round().astype(np.int64)
      if len(np.unique(idx)) != len(idx):
        raise ValueError(
            f'{num_steps} sampling steps need {num_steps + 1} distinct grid times, more than '
            f'the {self.num_steps} of the discrete schedule; use sample.num_steps < '
            f'diffusion.num_steps ({self.num_steps - 1} moves plus the final denoising is '
            'the full DDPM chain).')
      return jnp.asarray(idx / self.num_steps, jnp.float32)
    return jnp.linspace(1.0, self.t_min, num_steps + 1, dtype=jnp.float32)


@dataclasses.dataclass(frozen=True)
class VPSchedule(Schedule):
  """Continuous VP-SDE: beta(t) = beta_min + t (beta_max - beta_min)."""

  beta_min: float = 0.1
  beta_max: float = 20.0

  def log_alpha2(self, t):
    t = jnp.asarray(t, jnp.float32)
    return -(0.5 * t**2 * (self.beta_max - self.beta_min) + t * self.beta_min)

  def beta(self, t):
    return self.beta_min + jnp.asarray(t, jnp.float32) * (self.beta_max - self.beta_min)


@dataclasses.dataclass(frozen=True)
class DDPMSchedule(Schedule):
  """Discrete DDPM: T steps, linear betas; log alphabar interpolated between grid times."""

  num_steps: int = 1000
  beta_start: float = 1e-4
  beta_end: float = 0.02

  def betas(self) -> np.ndarray:
    return np.linspace(self.beta_start, self.beta_end, self.num_steps, dtype=np.float64)

  def _grid(self):
    # log alphabar at t_i = i / T for i = 0..T (alphabar_0 = 1).
    la2 = np.concatenate([[0.0], np.cumsum(np.log1p(-self.betas()))])
    return la2.astype(np.float32)

  def log_alpha2(self, t):
    grid = self._grid()
    return jnp.interp(jnp.asarray(t, jnp.float32),
                      jnp.linspace(0.0, 1.0, self.num_steps + 1), jnp.asarray(grid))

  def beta(self, t):
    # Piecewise-constant derivative of the interpolated log alphabar; at a grid time i / T
    # the interval below it, (i-1, i] (the one a reverse step from there crosses). The 1e-3
    # keeps float32 rounding of i / T * T (up to ~1e-4 above i) in that interval.
    grid = self._grid()
    rate = -np.diff(grid) * self.num_steps
    i = jnp.clip(jnp.ceil(jnp.asarray(t) * self.num_steps - 1e-3).astype(jnp.int32) - 1,
                 0, self.num_steps - 1)
    return jnp.asarray(rate)[i]


@dataclasses.dataclass(frozen=True)
class CosineSchedule(Schedule):
  """Nichol & Dhariwal's cosine schedule, log-SNR clipped to [-LOG_SNR_MAX, LOG_SNR_MAX]."""

  s: float = 0.008

  def _log_alpha2_raw(self, t):
    t = jnp.asarray(t, jnp.float32)
    f = lambda u: jnp.log(jnp.cos((u + self.s) / (1 + self.s) * math.pi / 2) ** 2)
    return f(t) - f(jnp.zeros_like(t))

  def log_alpha2(self, t):
    la2 = self._log_alpha2_raw(t)
    # Clip via log-SNR so alpha_1 stays positive: log alpha2 >= log sigmoid(-max).
    return jnp.maximum(la2, jax.nn.log_sigmoid(-LOG_SNR_MAX))


def get_schedule(config) -> Schedule:
  """Builds the schedule named by ``config.schedule`` ('ddpm', 'vp' or 'cosine')."""
  name = config.schedule
  if name == 'ddpm':
    return DDPMSchedule(num_steps=config.num_steps, beta_start=config.beta_start,
                        beta_end=config.beta_end)
  if name == 'vp':
    return VPSchedule(beta_min=config.beta_min, beta_max=config.beta_max,
                      t_min=config.t_min)
  if name == 'cosine':
    return CosineSchedule(t_min=config.t_min)
  raise ValueError(f"diffusion.schedule={name!r} is unknown; use 'ddpm', 'vp' or 'cosine'.")


def q_sample(schedule: Schedule, x0, t, eps):
  """Forward noising x_t = alpha_t x0 + sigma_t eps, t of shape (batch,)."""
  alpha, sigma = schedule.alpha_sigma(t)
  shape = (-1,) + (1,) * (x0.ndim - 1)
  return alpha.reshape(shape) * x0 + sigma.reshape(shape) * eps
