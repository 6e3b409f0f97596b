"""Plain denoising score matching, and the per-example loss every other method reuses.

``DSM`` trains on one group of examples. Its ``per_example_loss`` (class-conditional
with classifier-free label dropout when the model has classes) is the building block of
the constrained Lagrangian and of TIW-DSM, which only regroup and reweight its output.
DSM(ref) and DSM(obs) of the TIW-DSM paper are this method on a different data group.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cdiff_jax import losses
from cdiff_jax.models import ScoreModel


@dataclasses.dataclass(frozen=True, eq=False)
class DSM:
  model: ScoreModel
  weighting: str = 'eps'
  num_classes: int = 0          # > 0: class-conditional model; label num_classes is null
  class_dropout: float = 0.0    # classifier-free guidance: P(label -> null) in training
  batch_size: int = 128
  stratified_t: bool = True     # low-discrepancy t per batch (see Schedule.sample_t)

  def data_groups(self, dataset, train_indices: np.ndarray):
    """[(name, indices, batch size)] of the training batch."""
    return [('train', train_indices, self.batch_size)]

  def init_extras(self, rng, params):
    del rng, params
    return {}

  def labels(self, batch, rng):
    """Conditioning labels: None for unconditional models, else labels with CFG dropout."""
    if not self.num_classes:
      return None
    y = batch['label']
    if self.class_dropout > 0:
      drop = jax.random.bernoulli(rng, self.class_dropout, y.shape)
      y = jnp.where(drop, self.num_classes, y)
    return y

  def per_example_loss(self, params, batch, rng, x0=None, t_lo=None):
    """(loss vector (batch,), aux with x_t, t, eps) of the DSM loss on ``batch``; ``t_lo``
    optionally restricts each example's times to [t_lo, 1]."""
    rng_noise, rng_label, rng_dropout = jax.random.split(rng, 3)
    y = self.labels(batch, rng_label)
    eps_fn = lambda x, t: self.model.eps(params, x, t, y, train=True, rng=rng_dropout)
    x0 = batch['image'] if x0 is None else x0
    return losses.dsm_loss(eps_fn, x0, rng_noise, self.model.schedule, self.weighting,
                           self.stratified_t, t_lo)

  def loss(self, params, extras, batch, rng):
    del extras
    per_example, _ = self.per_example_loss(params, batch, rng)
    return per_example.mean(), {'metrics': {}}

  def update_extras(self, extras, aux, step, rng):
    del aux, step, rng
    return extras, {}
