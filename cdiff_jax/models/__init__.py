"""Networks and the ``ScoreModel`` that turns a network into eps/score/energy functions."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cdiff_jax import schedules as schedules_lib
from cdiff_jax.models.classifier import ConvClassifier
from cdiff_jax.models.mlp import MLPScore
from cdiff_jax.models.unet import UNet

PARAMETERIZATIONS = ('eps', 'energy')


@dataclasses.dataclass(frozen=True, eq=False)
class ScoreModel:
  """A network read as eps_theta(x_t, t, y), or as an energy E_theta(x_t, t, y).

  ``parameterization='eps'``: the network output is eps_theta.
  ``parameterization='energy'``: E(x, t) = 1/2 ||f(x, t)||^2 with f = net / sqrt(sigma_t);
  the score is -grad_x E and eps_theta = sigma_t grad_x E. The 1/sqrt(sigma_t) scaling is
  fixed (not learned): it keeps the network's output O(1) while the score grows like
  1/sigma_t at small t. Energies make Metropolis corrections and true mixtures possible.
  """

  net: nn.Module
  schedule: schedules_lib.Schedule
  parameterization: str = 'eps'

  def __post_init__(self):
    if self.parameterization not in PARAMETERIZATIONS:
      raise ValueError(f'model.parameterization={self.parameterization!r} is unknown; '
                       f'use one of {PARAMETERIZATIONS}.')

  def init(self, rng, x, t, y=None):
    t = _per_example(t, x)
    return self.net.init({'params': rng, 'dropout': rng}, x, t, y, train=False)['params']

  def _apply(self, params, x, t, y, train, rng):
    rngs = {'dropout': rng} if (train and rng is not None) else None
    return self.net.apply({'params': params}, x, t, y, train=train, rngs=rngs)

  def energy(self, params, x, t, y=None, train=False, rng=None):
    """Per-example energy, shape (batch,). Only for the energy parameterization."""
    if self.parameterization != 'energy':
      raise ValueError("energy() needs model.parameterization='energy'.")
    t = _per_example(t, x)
    f = self._apply(params, x, t, y, train, rng)
    sigma = self.schedule.sigma(t).reshape((-1,) + (1,) * (x.ndim - 1))
    return 0.5 * jnp.sum((f ** 2 / sigma).reshape(x.shape[0], -1), axis=-1)

  def energy_and_eps(self, params, x, t, y=None, train=False, rng=None):
    """(energy (batch,), eps (batch, ...)) from one forward and one backward pass."""
    t = _per_example(t, x)
    energy, vjp = jax.vjp(lambda x_: self.energy(params, x_, t, y, train, rng), x)
    # Examples do not interact (GroupNorm, no batch statistics), so pulling back a vector
    # of ones gives every example's own input-gradient.
    (grad,) = vjp(jnp.ones_like(energy))
    sigma = self.schedule.sigma(t).reshape((-1,) + (1,) * (x.ndim - 1))
    return energy, sigma * grad

  def potential_terms(self, params, x, t, y=None):
    """(energy (batch,), eps) as the samplers' potentials use them: a score-only (eps)
    model has no energy and gives zeros (no Metropolis test can use them)."""
    if self.parameterization == 'energy':
      return self.energy_and_eps(params, x, t, y)
    return jnp.zeros((x.shape[0],), jnp.float32), self.eps(params, x, t, y)

  def eps(self, params, x, t, y=None, train=False, rng=None):
    """eps_theta(x_t, t, y); ``t``: one time per example (batch,), or one for all."""
    t = _per_example(t, x)
    if self.parameterization == 'eps':
      return self._apply(params, x, t, y, train, rng)
    return self.energy_and_eps(params, x, t, y, train, rng)[1]

  def score(self, params, x, t, y=None):
    t = _per_example(t, x)
    sigma = self.schedule.sigma(t).reshape((-1,) + (1,) * (x.ndim - 1))
    return -self.eps(params, x, t, y) / sigma


def _per_example(t, x):
  """Times of shape (batch,): a scalar (one time for every example) is broadcast."""
  t = jnp.asarray(t, jnp.float32)
  if t.shape not in ((), x.shape[:1]):
    raise ValueError(f't has shape {t.shape}; give one time per example, shape '
                     f'{x.shape[:1]}, or one time for all.')
  return jnp.broadcast_to(t, x.shape[:1])


def build_net(model_config, num_classes: int = 0, dtype: Any = jnp.float32) -> nn.Module:
  """The network named by ``model_config.name`` ('unet' or 'mlp')."""
  mc = model_config
  if mc.name == 'unet':
    return UNet(ch=mc.ch, ch_mult=tuple(mc.ch_mult), num_res_blocks=mc.num_res_blocks,
                attn_levels=tuple(mc.attn_levels), num_heads=mc.num_heads,
                num_groups=mc.num_groups, dropout=mc.dropout, num_classes=num_classes,
                dtype=dtype, zero_init_out=mc.get('parameterization', 'eps') == 'eps')
  if mc.name == 'mlp':
    return MLPScore(hidden=mc.hidden, depth=mc.depth, num_classes=num_classes, dtype=dtype)
  raise ValueError(f"model.name={mc.name!r} is unknown; use 'unet' or 'mlp'.")


__all__ = ['ConvClassifier', 'MLPScore', 'UNet', 'ScoreModel', 'build_net']
