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


def weighted_sq_error(eps_hat, eps_target, t, schedule, weighting: str = 'eps'):
  """(batch,) loss from predictions and targets of shape (batch, ...)."""
  sq = jnp.square(eps_hat.astype(jnp.float32) - eps_target.astype(jnp.float32))
  sq = sq.reshape(sq.shape[0], -1)
  per_example = sq.sum(-1) if weighting == 'elbo' else sq.mean(-1)
  return time_weight(schedule, t, weighting) * per_example


def noise_batch(rng, x0, schedule):
  """Draws (t, eps) and returns (x_t, t, eps) for a batch x0."""
  rng_t, rng_eps = jax.random.split(rng)
  t = schedule.sample_t(rng_t, (x0.shape[0],))
  eps = jax.random.normal(rng_eps, x0.shape, x0.dtype)
  return schedules_lib.q_sample(schedule, x0, t, eps), t, eps


def dsm_loss(eps_fn: Callable, x0, rng, schedule, weighting: str = 'eps', **model_kwargs):
  """Per-example DSM loss of ``eps_fn(x_t, t, **model_kwargs)`` on clean data x0.

  Returns (loss of shape (batch,), aux) where aux holds x_t, t and eps for methods that
  need them (TIW-DSM computes its score correction at the same x_t).
  """
  x_t, t, eps = noise_batch(rng, x0, schedule)
  eps_hat = eps_fn(x_t, t, **model_kwargs)
  return weighted_sq_error(eps_hat, eps, t, schedule, weighting), dict(x_t=x_t, t=t, eps=eps)


def group_means(values, group, num_groups: int):
  """Mean of ``values`` over the examples of each group id in [0, num_groups).

  One one-hot contraction instead of a Python loop of masks: the batch stays one array,
  so it can be sharded over devices and still reduces in one collective.
  """
  onehot = jax.nn.one_hot(group, num_groups, dtype=values.dtype)
  sums = onehot.T @ values
  counts = onehot.sum(0)
  return sums / jnp.maximum(counts, 1.0)
