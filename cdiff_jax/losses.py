"""Per-example denoising score matching losses.

Every loss here returns a vector with one entry per example: the methods weight and group
those entries (Lagrangian of constrained training, importance weights of TIW-DSM), so the
reduction to a scalar always happens in the method, never here.

Conventions: eps-prediction, ``x_t = alpha_t x_0 + sigma_t eps``. The ``'eps'`` weighting
is the mean over dimensions of ``||eps_hat - eps||^2`` (DDPM's simple loss). The
``'elbo'`` weighting is the continuous-time negative ELBO in nats, up to a constant:
``0.5 * (-d logSNR/dt) * sum ||eps_hat - eps||^2`` with ``-d logSNR/dt = beta(t)/sigma_t^2``
for a VP process; its expected value differs from ``KL(q || p)`` by the entropy of q, which
is what makes KL thresholds of constrained training checkable in loss units.

The ELBO's weight grows like 1/t near t = 0, so with uniform t its Monte Carlo estimate has
a heavy tail. As in VDM, we sample the ELBO by importance: log-SNR uniform on its range
(``t = t(lambda)``), which makes the weight the constant ``0.5 (lambda_max - lambda_min)``:
the same expectation with a far smaller variance. ``sample_time`` returns (t, weight).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from cdiff_jax import schedules as schedules_lib

WEIGHTINGS = ('eps', 'elbo')


def time_weight(schedule: schedules_lib.Schedule, t, weighting: str):
  """Per-example factor that turns the squared eps error into the chosen loss."""
  if weighting == 'eps':
    return jnp.ones_like(t)
  if weighting == 'elbo':
    return 0.5 * schedule.beta(t) / schedule.sigma(t) ** 2
  raise ValueError(f'loss weighting {weighting!r} is unknown; use one of {WEIGHTINGS}.')


def sq_error(eps_hat, eps_target, weight, weighting: str = 'eps'):
  """(batch,) loss ``weight * ||eps_hat - eps_target||^2`` (mean over dimensions for 'eps',
  sum for 'elbo'), from predictions and targets of shape (batch, ...); ``weight`` comes
  from ``sample_time`` (or ``noise_batch_weighted``)."""
  sq = jnp.square(eps_hat.astype(jnp.float32) - eps_target.astype(jnp.float32))
  sq = sq.reshape(sq.shape[0], -1)
  per_example = sq.sum(-1) if weighting == 'elbo' else sq.mean(-1)
  return weight * per_example


def weighted_sq_error(eps_hat, eps_target, t, schedule, weighting: str = 'eps'):
  """As ``sq_error`` with the weight of *uniformly* sampled t (``time_weight``)."""
  return sq_error(eps_hat, eps_target, time_weight(schedule, t, weighting), weighting)


def sample_time(rng, n: int, schedule, weighting: str = 'eps', stratified: bool = False,
                t_lo=None):
  """(t, weight) of shape (n,): t from the training distribution of ``weighting``, and the
  per-example weight that makes ``weight * sq_error`` an unbiased estimate of the loss.

  ``t_lo`` (optional, per example or one for all): the example's loss covers only the
  window [t_lo, 1]; the weight then estimates the integral of the weighted loss over that
  window (the default window is the schedule's whole range, where the 'eps' weight is
  exactly 1).
  """
  if weighting == 'eps' and t_lo is None:  # the whole range: the schedule's own sampler
    return schedule.sample_t(rng, (n,), stratified), jnp.ones((n,), jnp.float32)
  t_min = 1.0 / schedule.num_steps if schedule.num_steps else schedule.t_min
  lo = jnp.broadcast_to(jnp.maximum(jnp.asarray(t_min if t_lo is None else t_lo, jnp.float32),
                                    t_min), (n,))
  u = _uniform(rng, n, stratified)
  if weighting == 'eps':
    if schedule.num_steps:  # uniform on the grid times i / T >= lo
      T = schedule.num_steps
      i_lo = jnp.ceil(lo * T - 1e-4)
      i = jnp.minimum(i_lo + jnp.floor(u * (T - i_lo + 1)), T)
      return i / T, (T - i_lo + 1) / T
    return lo + (1.0 - lo) * u, (1.0 - lo) / (1.0 - t_min)
  if weighting == 'elbo':
    lam_hi, lam_lo = schedule.log_snr(lo), schedule.log_snr(1.0)
    t = schedule.t_from_log_snr(lam_hi - u * (lam_hi - lam_lo))
    return t, (0.5 * (lam_hi - lam_lo)).astype(jnp.float32)
  raise ValueError(f'loss weighting {weighting!r} is unknown; use one of {WEIGHTINGS}.')


def _uniform(rng, n, stratified):
  if not stratified:
    return jax.random.uniform(rng, (n,))
  return jnp.mod(jax.random.uniform(rng, ()) + jnp.arange(n) * 0.6180339887498949, 1.0)


def noise_batch_weighted(rng, x0, schedule, weighting: str = 'eps', stratified: bool = False,
                         t_lo=None):
  """Draws times and noise: returns (x_t, t, eps, weight) for a batch x0."""
  rng_t, rng_eps = jax.random.split(rng)
  t, weight = sample_time(rng_t, x0.shape[0], schedule, weighting, stratified, t_lo)
  eps = jax.random.normal(rng_eps, x0.shape, x0.dtype)
  return schedules_lib.q_sample(schedule, x0, t, eps), t, eps, weight


def noise_batch(rng, x0, schedule, stratified: bool = False):
  """(x_t, t, eps) with t uniform (see ``Schedule.sample_t``)."""
  x_t, t, eps, _ = noise_batch_weighted(rng, x0, schedule, 'eps', stratified)
  return x_t, t, eps


def check_like(value, x, what: str) -> None:
  """Raises a ValueError naming ``what`` unless ``value`` has the shape of ``x`` (checked
  while tracing: a network's output of another shape would broadcast silently)."""
  if jnp.shape(value) != jnp.shape(x):
    raise ValueError(f'{what} returned shape {jnp.shape(value)} for x of shape {jnp.shape(x)}; '
                     'it must return one value per entry of x (the same shape).')


def dsm_loss(eps_fn: Callable, x0, rng, schedule, weighting: str = 'eps',
             stratified: bool = False, t_lo=None, **model_kwargs):
  """Per-example DSM loss of ``eps_fn(x_t, t, **model_kwargs)`` on clean data x0.

  Returns (loss of shape (batch,), aux) where aux holds x_t, t, eps and the time weight for
  methods that need them (TIW-DSM computes its score correction at the same x_t).
  ``t_lo``: optional per-example start of the time window (see ``sample_time``).
  """
  x_t, t, eps, weight = noise_batch_weighted(rng, x0, schedule, weighting, stratified, t_lo)
  eps_hat = eps_fn(x_t, t, **model_kwargs)
  check_like(eps_hat, x_t, 'eps_fn(x_t, t)')
  loss = sq_error(eps_hat, eps, weight, weighting)
  return loss, dict(x_t=x_t, t=t, eps=eps, weight=weight)


def group_means(values, group, num_groups: int):
  """Mean of ``values`` over the examples of each group id in [0, num_groups).

  One one-hot contraction instead of a Python loop of masks: the batch stays one array,
  so it can be sharded over devices and still reduces in one collective.
  """
  onehot = jax.nn.one_hot(group, num_groups, dtype=values.dtype)
  sums = onehot.T @ values
  counts = onehot.sum(0)
  return sums / jnp.maximum(counts, 1.0)
