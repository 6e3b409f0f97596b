"""TIW-DSM: an unbiased diffusion model from a large biased set and a small reference set.

Data: ``D_bias ~ p_bias`` (large) and ``D_ref ~ p_data`` (small, e.g. 5% or 10% of
``|D_bias|``); only which set an example came from is known. Every score minibatch mixes
the two at a fixed fraction ``pi`` from D_ref, so the examples follow
``p_obs = pi p_data + (1 - pi) p_bias``.

Discriminator: ``d(x_t, t)`` trained with the balanced, time-weighted BCE (reference = 1,
biased = 0) on inputs noised by the score model's forward process. Its optimum is
``d* = p_data_t / (p_data_t + p_bias_t)``, hence the ratio to the minibatch distribution

    w~_t(x) = p_data_t(x) / p_obs_t(x) = d / (pi d + (1 - pi) (1 - d))     (= 2d at pi = 1/2).

Loss, derived (score s = -eps / sigma_t, ``grad log p(x_t | x_0) = -eps / sigma_t``):
TIW-DSM minimizes ``E_obs[ w~_t(x_t) || s(x_t) - grad log p(x_t|x_0) - grad log w~_t(x_t) ||^2 ]``.
For every x_t its minimizer is ``grad log p_obs_t + grad log w~_t = grad log p_data_t``:
the weight makes the objective equal to DSM on p_data (for a model of limited capacity
it decides where errors cost), the correction moves the pointwise optimum. Multiplying the
bracket by ``-sigma_t``:

    || eps_theta(x_t, t) - (eps - sigma_t * grad_x log w~_t(x_t)) ||^2,   weighted by w~_t(x_t).

So the eps-target is corrected by MINUS ``sigma_t grad log w~`` (not ``-sigma_t^2 grad d``),
and each example's squared error is multiplied by its own scalar weight. The weight and the
correction come from the discriminator and are held fixed (no gradient) for the score update.
Temperature alpha: ``w~ -> w~^alpha`` and correction ``alpha grad log w~ = grad log w~^alpha``
(the objective for the density proportional to ``p_obs_t w~_t^alpha``); alpha = 0 is DSM(obs).

Variants (``config.method.variant``): ``dsm_ref`` (DSM on D_ref only), ``dsm_obs`` (the
same mixed minibatch, unweighted), ``iw`` (IW-DSM: weight ``w~(x_0)^alpha`` from a
discriminator of clean data, no correction), ``tiw``.

Composition: ``per_example_terms`` returns, per example, the squared error against the
corrected target, the weight, and the plain DSM loss at the same x_t; another method (the
constrained Lagrangian) can use ``weight * loss`` on the objective's examples as its
primal objective, and call ``update_discriminator`` in its ``update_extras``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Callable

import chex
import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cdiff_jax import checkpoint, losses, writers
from cdiff_jax.config import ConfigError, check_fields
from cdiff_jax.data import imbalance
from cdiff_jax.methods import noisy_classifier as nc
from cdiff_jax.methods.dsm import DSM

VARIANTS = ('dsm_ref', 'dsm_obs', 'iw', 'tiw')
BIASES = ('long_tail', 'attribute')
DISC_FEATURES = ('none', 'eval_classifier')
DISC_NETS = ('auto', 'conv', 'mlp')
# 2: IW-DSM's clean discriminator no longer takes a time weighting (under sigma2 the
# version-1 cache could hold an untrained one); the frozen feature extractor is in the key.
_CACHE_VERSION = 2


def default_config() -> ml_collections.ConfigDict:
  """``config.method`` of a TIW-DSM experiment (every field is a command-line knob)."""
  return ml_collections.ConfigDict(dict(
      name='tiw',
      variant='tiw',              # dsm_ref | dsm_obs | iw | tiw
      alpha=1.0,                  # weight temperature: w -> w^alpha, correction * alpha
      score_correction=True,      # tiw: False keeps only the time-dependent weight (ablation)
      # Biased / reference split of the training set (after config.data's class selection).
      bias='long_tail',           # long_tail | attribute
      imbalance_ratio=0.01,       # long_tail: n_last / n_first (CIFAR-10-LT: 0.01)
      class_order=(),             # long_tail: head-to-tail class order (empty: 0..C-1)
      attribute='',               # attribute: dataset attribute name ('' = the label)
      majority_value=1,           # attribute: the over-represented value
      majority_fraction=0.8,      # attribute: its share of the biased set
      ref_fraction=0.1,           # |D_ref| / |D_bias| (the paper: 0.05 or 0.1)
      split_seed=0,
      ref_batch_fraction=0.5,     # pi: share of D_ref in every score minibatch
      # Discriminator d(x_t, t).
      disc_net='auto',            # auto (conv for images, mlp for vectors) | conv | mlp
      disc_features='none',       # none (from scratch) | eval_classifier (head on frozen features)
      disc_ch=16, disc_ch_mult=(1, 2), disc_num_res_blocks=1, disc_dropout=0.1,  # conv
      disc_hidden=128, disc_depth=2,  # mlp, and the head on frozen features
      disc_pretrain_steps=500,    # first phase: T-BCE steps before score training
      disc_joint=False,           # also update it inside every score step
      disc_lr=3e-4, disc_weight_decay=1e-4, disc_batch_size=128,
      disc_time_weighting='uniform',  # lambda(t) of the T-BCE: uniform | sigma2 (not iw)
      disc_cache=True,            # reuse a pretrained discriminator across runs (same data/recipe)
  ))


# ----------------------------------------------------------------------------- the formulas


def log_density_ratio(logit, ref_batch_fraction: float):
  """log w~ = log p_data_t / p_obs_t from a balanced discriminator's logit.

  ``log d - log(pi d + (1 - pi)(1 - d))`` in log-sigmoids, finite for any finite logit
  (w~ lies in (0, 1/pi)).
  """
  pi = ref_batch_fraction
  log_d, log_1md = jax.nn.log_sigmoid(logit), jax.nn.log_sigmoid(-logit)
  return log_d - jnp.logaddexp(jnp.log(pi) + log_d, jnp.log1p(-pi) + log_1md)


def tiw_weights_and_correction(example_log_ratio: Callable, x, t, alpha: float,
                               correction: bool = True):
  """Per-example ``(log w~ (B,), weight w~^alpha (B,), alpha grad_x log w~ (like x))``.

  ``example_log_ratio(x_i, t_i) -> scalar`` is defined for one example and vmapped; its
  input-gradient is one backward pass over the batch. Both outputs are held fixed for the
  score update. ``correction=False`` returns None as the gradient (IW-DSM).
  """
  if correction:
    log_w, grad = nc.per_example_value_and_grad(example_log_ratio, x, t)
    grad = jax.lax.stop_gradient(alpha * grad)
  else:
    log_w, grad = jax.vmap(example_log_ratio)(x, t), None
  log_w = jax.lax.stop_gradient(log_w)
  # exp(alpha log w) rather than w ** alpha: alpha = 0 gives exactly 1.
  return log_w, jnp.exp(alpha * log_w), grad


def corrected_target(eps, t, schedule, grad_log_ratio):
  """eps-target of TIW-DSM: ``eps - sigma_t * grad_x log w~^alpha`` (see the docstring)."""
  sigma = schedule.sigma(t).reshape((-1,) + (1,) * (eps.ndim - 1))
  return eps - sigma * grad_log_ratio


def weighted_mean(per_example_loss, weights):
  """Mean over the batch of ``weights[i] * loss[i]``: one scalar weight per example."""
  chex.assert_rank([per_example_loss, weights], 1)
  chex.assert_equal_shape([per_example_loss, weights])
  return jnp.mean(weights * per_example_loss)


# ----------------------------------------------------------------------------- the method


@dataclasses.dataclass(frozen=True, eq=False)
class TIW:
  """DSM(ref), DSM(obs), IW-DSM and TIW-DSM over one grouped batch (groups bias, ref)."""

  dsm: DSM
  disc: nc.NoisyClassifier | None
  split_fn: Callable                       # (dataset, train indices) -> (bias idx, ref idx)
  variant: str = 'tiw'
  alpha: float = 1.0
  score_correction: bool = True            # False: weight only (an ablation; biased)
  batch_size: int = 128
  ref_batch_fraction: float = 0.5
  disc_tx: optax.GradientTransformation | None = None
  disc_lr: float = 0.0                     # disc_tx's learning rate, for messages
  disc_pretrain_steps: int = 500
  disc_joint: bool = False
  disc_batch_size: int = 128
  disc_time_weighting: str = 'uniform'
  frozen_features: Callable[[], Any] | None = None  # () -> frozen params of disc.feature_fn
  disc_cache: bool = False
  disc_signature: str = ''                 # recipe fields that key the pretrained cache
  seed: int = 0
  section: str = 'method'                  # where its fields live: config.<section>.disc_lr
  bias_group: int = 0                      # group ids in the batch (``data_groups`` order)
  ref_group: int = 1
  progress: bool = True
  _data: dict = dataclasses.field(default_factory=dict, repr=False)

  # --- batch layout

  @property
  def ref_batch(self) -> int:
    return int(round(self.ref_batch_fraction * self.batch_size))

  @property
  def bias_batch(self) -> int:
    return self.batch_size - self.ref_batch

  @property
  def pi(self) -> float:
    """The actual share of D_ref in a minibatch (what the ratio formula must use)."""
    return self.ref_batch / self.batch_size

  @property
  def uses_discriminator(self) -> bool:
    return self.variant in ('iw', 'tiw')

  @property
  def step_size_fields(self) -> tuple[str, ...]:
    """The config fields of the method's own steps, for a non-finite stop's message."""
    return (f'{self.section}.disc_lr',) if self.disc_joint and self.uses_discriminator else ()

  def data_groups(self, dataset, train_indices: np.ndarray):
    """[('bias', D_bias, B (1 - pi)), ('ref', D_ref, B pi)]; DSM(ref): [('ref', D_ref, B)]."""
    bias, ref = self.split_fn(dataset, train_indices)
    self._data.update(dataset=dataset, bias=bias, ref=ref)
    if self.variant == 'dsm_ref':
      return [('ref', ref, self.batch_size)]
    groups = [None, None]
    groups[self.bias_group] = ('bias', bias, self.bias_batch)
    groups[self.ref_group] = ('ref', ref, self.ref_batch)
    return groups

  # --- discriminator state

  def for_restore(self) -> 'TIW':
    """The method for a state restored from a checkpoint, which holds the trained
    discriminator: ``init_extras`` then builds only the state's layout, without the first
    phase's training."""
    return dataclasses.replace(self, disc_pretrain_steps=0)

  def init_extras(self, rng, params):
    """{'disc': {'params', 'opt_state' (joint), 'frozen' (head on features)}} or {}.

    With ``disc_pretrain_steps > 0`` the discriminator is trained here, before the first
    score step (the first phase), from the groups of ``data_groups``.
    """
    del params
    if not self.uses_discriminator:
      return {}
    if 'dataset' not in self._data:
      raise RuntimeError('TIW.init_extras needs the data: call data_groups(dataset, idx) first.')
    frozen = self.frozen_features() if self.frozen_features is not None else None
    rng_init, rng_fit = jax.random.split(rng)
    example_shape = self._data['dataset'].image_shape
    disc_params = self.disc.init(rng_init, example_shape, frozen)
    if self.disc_pretrain_steps:
      disc_params = self._pretrained(disc_params, frozen, rng_fit)
    state = {'params': disc_params}
    if self.disc_joint:
      state['opt_state'] = self.disc_tx.init(disc_params)
    if frozen is not None:
      state['frozen'] = frozen
    return {'disc': state}

  def _disc_loss(self, params, x0, is_ref, is_bias, rng, frozen):
    return nc.noised_bce_loss(self.disc, params, x0, is_ref, is_bias, rng,
                              self.dsm.model.schedule, self.disc_time_weighting,
                              clean=self.variant == 'iw', frozen=frozen)

  def _cache_path(self, steps: int, frozen=None) -> str:
    """``frozen``: the frozen feature extractor's parameters, hashed by value (a head
    trained on one classifier's features is no use on another's)."""
    ds = self._data['dataset']
    h = hashlib.sha256()
    h.update(json.dumps([_CACHE_VERSION, ds.name, len(ds), list(ds.image_shape), steps,
                         self.seed, self.variant == 'iw', self.disc_signature,
                         repr(self.disc.net), repr(self.dsm.model.schedule)]).encode())
    h.update(np.asarray(self._data['bias'], np.int64).tobytes())
    h.update(np.asarray(self._data['ref'], np.int64).tobytes())
    # The images it trains on, not only their number: a data set remade under the same name
    # (an .npz rewritten, another data_dir) must not find the old discriminator.
    used = np.concatenate([self._data['bias'], self._data['ref']])
    h.update(np.ascontiguousarray(ds.images[np.sort(used)]).tobytes())
    checkpoint.hash_pytree(h, frozen)
    root = os.environ.get('CDIFF_JAX_CACHE', os.path.expanduser('~/.cache/cdiff_jax'))
    return os.path.join(root, 'discriminators', f'{ds.name.replace("/", "_")}_{h.hexdigest()[:16]}')

  def _pretrained(self, params, frozen, rng):
    """The first phase: ``disc_pretrain_steps`` T-BCE steps on balanced batches."""
    path = self._cache_path(self.disc_pretrain_steps, frozen) if self.disc_cache else None
    if path and os.path.exists(path + '.msgpack'):
      with open(path + '.msgpack', 'rb') as f:
        return flax.serialization.from_bytes(params, f.read())
    ds, bias, ref = self._data['dataset'], self._data['bias'], self._data['ref']
    half = self.disc_batch_size // 2
    flags = np.concatenate([np.ones(half, bool), np.zeros(half, bool)])

    def batches(i):
      r = np.random.default_rng([self.seed, 7919, i])
      idx = np.concatenate([r.choice(ref, half), r.choice(bias, half)])
      return ds.get(idx)['image'], flags, ~flags

    loss_fn = lambda p, x0, is_ref, is_bias, key: self._disc_loss(p, x0, is_ref, is_bias, key,
                                                                  frozen)
    update = nc.make_update(loss_fn, self.disc_tx)
    params, _, summary = nc.fit(update, params, self.disc_tx.init(params), batches,
                                self.disc_pretrain_steps, rng, progress=self.progress,
                                desc='discriminator (T-BCE)')
    described = (f'T-BCE {summary["bce"]:.4f}, accuracy {summary["accuracy"]:.3f} '
                 f'(last 50 steps; chance: BCE {nc.CHANCE_BCE:.3f})')
    if not summary['bce'] <= nc.DIVERGED_BCE:  # NaN too
      # Its weights would then be 0 (or NaN) for every example: a score model that does not
      # train, with no non-finite loss to stop the run. Not cached.
      _fail('disc_lr', self.disc_lr, f'the discriminator diverged in its '
            f'{self.disc_pretrain_steps} pre-training steps ({described}); lower '
            f'{self.section}.disc_lr.', self.section)
    if self.progress:
      print(f'discriminator: {self.disc_pretrain_steps} steps, {described}')
    if path:
      writers.write_atomic(path + '.msgpack', flax.serialization.to_bytes(params))
    return params

  def example_log_ratio_fn(self, disc_state) -> Callable:
    """``(x_i, t_i) -> log w~`` of one example under the discriminator state."""
    frozen = disc_state.get('frozen')

    def example_log_ratio(x1, t1):
      logit = self.disc.example_logits(disc_state['params'], x1, t1, frozen)[0]
      return log_density_ratio(logit, self.pi)

    return example_log_ratio

  # --- losses

  def per_example_terms(self, params, extras, batch, rng, t_lo=None) -> dict:
    """Per-example pieces of the objective, all of shape (batch,) unless noted.

    ``loss``: squared error against the (corrected) target; ``weight``: the importance
    weight (1 for DSM(ref)/DSM(obs)); the objective is ``mean(weight * loss)``.
    ``dsm_loss``: the plain DSM loss at the same x_t and prediction (for constraint terms
    of a composed method). Also x0, x_t (like the images), t, log_ratio.
    The random stream is exactly ``DSM.per_example_loss``'s, so alpha = 0 reproduces
    DSM(obs) bit for bit.
    """
    schedule = self.dsm.model.schedule
    rng_noise, rng_label, rng_dropout = jax.random.split(rng, 3)
    y = self.dsm.labels(batch, rng_label)
    x0 = batch['image']
    # The same draw as DSM.per_example_loss (alpha = 0 must reproduce DSM(obs) bit for bit).
    x_t, t, eps, time_w = losses.noise_batch_weighted(rng_noise, x0, schedule,
                                                      self.dsm.weighting, self.dsm.stratified_t,
                                                      t_lo)
    n = x0.shape[0]
    target, log_w, weight = eps, jnp.zeros((n,)), jnp.ones((n,))
    if self.uses_discriminator:
      log_ratio = self.example_log_ratio_fn(extras['disc'])
      if self.variant == 'tiw':
        log_w, weight, grad = tiw_weights_and_correction(log_ratio, x_t, t, self.alpha,
                                                         self.score_correction)
        if self.score_correction:
          target = corrected_target(eps, t, schedule, grad)
      else:  # IW-DSM: the ratio of clean data, the same for every t of an example
        log_w, weight, _ = tiw_weights_and_correction(
            log_ratio, x0, jnp.zeros((n,)), self.alpha, correction=False)
    eps_hat = self.dsm.model.eps(params, x_t, t, y, train=True, rng=rng_dropout)
    loss = losses.sq_error(eps_hat, target, time_w, self.dsm.weighting)
    dsm_loss = (loss if target is eps else
                losses.sq_error(eps_hat, eps, time_w, self.dsm.weighting))
    chex.assert_shape([loss, weight, dsm_loss, log_w], (n,))
    return dict(loss=loss, weight=weight, dsm_loss=dsm_loss, log_ratio=log_w, x0=x0, x_t=x_t,
                t=t, eps=eps, eps_hat=eps_hat, target=target)

  def objective_per_example(self, params, extras, batch, rng):
    """(weight * loss (batch,), terms): the per-example objective of a composed method."""
    terms = self.per_example_terms(params, extras, batch, rng)
    return terms['weight'] * terms['loss'], terms

  def per_example_loss(self, params, batch, rng, extras, t_lo=None):
    """Drop-in for ``DSM.per_example_loss`` inside a composed method (the constrained
    Lagrangian): ``weight * loss`` on the examples of the bias and ref groups, the plain DSM
    loss on every other group (constraint sets are fitted as they are). Returns
    (vector (batch,), terms). ``extras`` is this method's own extras (``init_extras``).
    """
    terms = self.per_example_terms(params, extras, batch, rng, t_lo)
    g = batch['group']
    in_objective = (g == self.bias_group) | (g == self.ref_group)
    return jnp.where(in_objective, terms['weight'] * terms['loss'], terms['dsm_loss']), terms

  def loss(self, params, extras, batch, rng):
    terms = self.per_example_terms(params, extras, batch, rng)
    objective = weighted_mean(terms['loss'], terms['weight'])
    metrics = dict(dsm_loss=terms['dsm_loss'].mean())
    if self.uses_discriminator:
      g = batch['group']
      w_by_group = losses.group_means(terms['weight'], g, 2)
      metrics.update(weight_bias=w_by_group[self.bias_group],
                     weight_ref=w_by_group[self.ref_group],
                     weight_max=terms['weight'].max(),
                     # 1/n sum w^2 / (mean w)^2: how many examples the weights waste.
                     weight_ess=jnp.mean(terms['weight']) ** 2 / jnp.mean(terms['weight'] ** 2))
      if self.variant == 'tiw' and self.score_correction:
        # Size of the eps-target correction sigma_t |grad log w~^alpha| (rms per pixel).
        metrics['correction_rms'] = jnp.sqrt(jnp.mean(jnp.square(terms['target'] - terms['eps'])))
    aux = {'metrics': metrics}
    if self.disc_joint and self.uses_discriminator:
      aux['tiw'] = self.discriminator_batch(batch)
    return objective, aux

  def discriminator_batch(self, batch) -> dict:
    """What ``update_discriminator`` needs from a score batch (pass it on in aux['tiw'])."""
    return dict(x0=batch['image'], is_ref=batch['group'] == self.ref_group,
                is_bias=batch['group'] == self.bias_group)

  def update_discriminator(self, disc_state, disc_batch, rng):
    """One T-BCE step of the discriminator on the score batch's examples (joint mode)."""
    frozen = disc_state.get('frozen')
    loss_fn = lambda p, x0, is_ref, is_bias, key: self._disc_loss(p, x0, is_ref, is_bias, key,
                                                                  frozen)
    params, opt_state, m = nc.make_update(loss_fn, self.disc_tx)(
        disc_state['params'], disc_state['opt_state'], disc_batch['x0'], disc_batch['is_ref'],
        disc_batch['is_bias'], rng)
    new = dict(disc_state, params=params, opt_state=opt_state)
    return new, {'disc_bce': m['bce'], 'disc_accuracy': m['accuracy']}

  def host_metrics(self, summary: dict, step: int) -> list[str]:
    """Warnings from the logged figures: a discriminator trained with the score model
    (``disc_joint``) that diverged, or weights that vanish for every example (no score
    training). Its pre-training is checked where it ends (``_pretrained``)."""
    del step
    out = []
    bce = summary.get('disc_bce')
    if bce is not None and not float(bce) <= nc.DIVERGED_BCE:
      out.append(f'the discriminator diverged: its T-BCE over the last log interval is '
                 f'{float(bce):.4g} (chance {nc.CHANCE_BCE:.3f}), so its weights and score '
                 'correction are meaningless; lower method.disc_lr.')
    weights = [float(summary[k]) for k in ('weight_bias', 'weight_ref') if k in summary]
    if weights and not max(weights) >= 1e-3:
      out.append(f'the importance weights vanish (mean {max(weights):.3g} on the reference '
                 'and biased examples): the score model is hardly training; check the '
                 'discriminator (method.disc_lr, method.alpha).')
    return out

  def update_extras(self, extras, aux, step, rng):
    del step
    if not (self.disc_joint and self.uses_discriminator):
      return extras, {}
    disc, metrics = self.update_discriminator(extras['disc'], aux['tiw'], rng)
    return dict(extras, disc=disc), metrics


# ----------------------------------------------------------------------------- config


def _fail(field: str, value, fix: str, section: str = 'method'):
  raise ConfigError(f'config.{section}.{field}={value!r}: {fix}')


def validate(config, section: str = 'method') -> None:
  """Checks config.method of a TIW run; each message names the field and the fix.
  ``section``: where ``config`` keeps the fields in the user's config, for the messages
  (``'method.tiw'`` for the primal objective of constrained training, which passes a
  config whose ``method`` is that section)."""
  mc = config.method
  known = default_config().keys()
  check_fields(section, mc, known, sorted(set(known) - {'name'}),
               'cdiff_jax.methods.tiw.default_config()')
  fail = functools.partial(_fail, section=section)
  if mc.variant not in VARIANTS:
    fail('variant', mc.variant, f'must be one of {VARIANTS}.')
  if not mc.alpha >= 0:
    fail('alpha', mc.alpha, 'must be >= 0 (0 is DSM(obs), 1 the unbiased weighting).')
  if mc.bias not in BIASES:
    fail('bias', mc.bias, f'must be one of {BIASES}.')
  if not 0.0 < mc.imbalance_ratio <= 1.0:
    fail('imbalance_ratio', mc.imbalance_ratio, 'must lie in (0, 1] (e.g. 0.01 for CIFAR-10-LT).')
  if not 0.0 < mc.ref_fraction <= 1.0:
    fail('ref_fraction', mc.ref_fraction, 'must lie in (0, 1] (the paper uses 0.05 or 0.1).')
  if not 0.0 < mc.majority_fraction < 1.0:
    fail('majority_fraction', mc.majority_fraction, 'must lie in (0, 1).')
  if mc.split_seed < 0:   # numpy's generators take no negative seeds
    fail('split_seed', mc.split_seed, 'must be >= 0.')
  if not 0.0 < mc.ref_batch_fraction < 1.0:
    fail('ref_batch_fraction', mc.ref_batch_fraction, 'must lie in (0, 1) (0.5: half-half).')
  b = config.train.batch_size
  n_ref = int(round(mc.ref_batch_fraction * b))
  if mc.variant != 'dsm_ref' and not 0 < n_ref < b:
    fail('ref_batch_fraction', mc.ref_batch_fraction,
          f'gives {n_ref} of train.batch_size={b} examples from D_ref; both sets need >= 1.')
  if mc.disc_net not in DISC_NETS:
    fail('disc_net', mc.disc_net, f'must be one of {DISC_NETS}.')
  if mc.disc_net == 'mlp' and config.model.name == 'unet':
    fail('disc_net', mc.disc_net, "is for vector data (model.name=mlp); for images use "
          "'conv' or 'auto'.")
  label = config.data.get('label_attribute', 'Male')
  if mc.bias == 'attribute' and mc.attribute and mc.attribute != label and config.eval.enabled:
    fail('attribute', mc.attribute, f"the evaluation classifies data.label_attribute "
          f"({label!r}), so its class frequencies and TV would not measure the attribute this "
          f"split biases; set data.label_attribute='{mc.attribute}' and {section}.attribute='' "
          "(the label), or eval.enabled=False.")
  if mc.variant == 'tiw' and mc.score_correction and config.model.conditional:
    # The correction grad log w~_t(x_t) is the unconditional ratio's: added to a labelled
    # example's target, it moves the minimizer to grad log p_obs_t(x|y) + grad log w~_t(x),
    # which is not the score of p_data_t(x|y) (that would need a discriminator d(x_t, y, t)).
    raise ConfigError(
        'config.model.conditional=True: TIW-DSM corrects the score by the unconditional '
        'density ratio, which is wrong for a class-conditional model; set '
        f'model.conditional=False, or use {section}.variant=iw (its weight alone is right for '
        'labels that are a function of the image).')
  if mc.disc_features not in DISC_FEATURES:
    fail('disc_features', mc.disc_features, f'must be one of {DISC_FEATURES}.')
  if mc.disc_features == 'eval_classifier' and config.model.name != 'unet':
    fail('disc_features', mc.disc_features, 'needs an image dataset (model.name=unet).')
  if mc.disc_time_weighting not in nc.TIME_WEIGHTINGS:
    fail('disc_time_weighting', mc.disc_time_weighting, f'must be one of {nc.TIME_WEIGHTINGS}.')
  if mc.disc_pretrain_steps < 0:
    fail('disc_pretrain_steps', mc.disc_pretrain_steps, 'must be >= 0.')
  if mc.variant in ('iw', 'tiw') and mc.disc_pretrain_steps == 0 and not mc.disc_joint:
    fail('disc_pretrain_steps', 0, 'the discriminator would never be trained; set it > 0 '
          f'or set config.{section}.disc_joint=True.')
  if not mc.disc_lr > 0:
    fail('disc_lr', mc.disc_lr, 'must be positive.')
  if mc.disc_batch_size < 2 or mc.disc_batch_size % 2:
    fail('disc_batch_size', mc.disc_batch_size, 'must be a positive even number '
          '(half reference, half biased).')
  if not 0.0 <= mc.disc_dropout < 1.0:
    fail('disc_dropout', mc.disc_dropout, 'must lie in [0, 1).')
  if config.model.name == 'unet' and mc.disc_net != 'mlp':
    if mc.disc_ch < 1:  # 0 is a multiple of 8: a discriminator of zero-width layers
      fail('disc_ch', mc.disc_ch, 'must be positive.')
    for m in mc.disc_ch_mult:
      if (mc.disc_ch * m) % 8:
        fail('disc_ch', mc.disc_ch, f'disc_ch * disc_ch_mult ({mc.disc_ch} * {m}) must be a '
              'multiple of 8 (GroupNorm groups).')


def split_indices(method_config, dataset, train_indices, section: str = 'method'):
  """(D_bias, D_ref) indices of ``dataset`` from config.method's bias fields (``section``:
  where they are in the user's config, for the messages)."""
  mc = method_config
  try:
    if mc.bias == 'long_tail':
      order = tuple(mc.class_order) or None
      if order is not None:
        imbalance._check_classes(order, dataset.num_classes, f'config.{section}.class_order')
      return imbalance.long_tail_split(dataset.labels, dataset.num_classes, mc.imbalance_ratio,
                                       mc.ref_fraction, mc.split_seed, train_indices, order)
    if mc.attribute:
      if mc.attribute not in dataset.attributes:
        raise ConfigError(f'config.{section}.attribute={mc.attribute!r}: {dataset.name} has '
                          f'attributes {sorted(dataset.attributes)}; load it with '
                          f"--config.data.attributes=('{mc.attribute}',) (celeb_a), or use "
                          "'' for the label.")
      values = np.asarray(dataset.attributes[mc.attribute]).astype(np.int64)
    else:
      values = dataset.labels
    num_values = int(values.max()) + 1
    return imbalance.attribute_bias_split(values, num_values, mc.majority_value,
                                          mc.majority_fraction, mc.ref_fraction,
                                          mc.split_seed, train_indices)
  except ValueError as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f'config.{section} (bias={mc.bias!r}): {e}') from e


class _EvalClassifierFeatures:
  """Frozen penultimate features of the evaluation classifier (trained on clean images, so
  it is called at t = 0; the head gets the real t). The same classifier the run's
  evaluation labels with (``evaluation.classifier_for``). Loaded on first use."""

  def __init__(self, config):
    self.config = config
    self._clf = None

  @property
  def clf(self):
    if self._clf is None:
      from cdiff_jax import evaluation  # Local: trains/loads the classifier only when asked.
      self._clf = evaluation.classifier_for(self.config, progress=True)
    return self._clf

  def params(self):
    return self.clf.params

  def __call__(self, frozen, x, t):
    return self.clf.net.apply({'params': frozen}, x, jnp.zeros_like(t), return_features=True)[1]


# Read only after the first phase (joint updates) or not by the training at all: a
# discriminator pre-trained under one value is the same under the other.
_NOT_IN_PRETRAINING = ('disc_joint', 'disc_cache')


def _disc_signature(mc) -> str:
  """The fields of ``config.method`` that shape the pre-trained discriminator: its recipe
  (every ``disc_*`` field the first phase reads) and the split it is trained on."""
  return json.dumps({k: (list(v) if isinstance(v, tuple) else v)
                     for k, v in mc.to_dict().items()
                     if (k.startswith('disc_') and k not in _NOT_IN_PRETRAINING)
                     or k in ('bias', 'imbalance_ratio', 'ref_fraction', 'split_seed')},
                    sort_keys=True)


def build(config, model, num_classes: int, common: dict, section: str = 'method') -> TIW:
  """``section``: as for ``validate``."""
  mc = config.method
  dsm = DSM(model, batch_size=config.train.batch_size, **common)
  disc, frozen = None, None
  if mc.variant in ('iw', 'tiw'):
    kind = mc.disc_net
    if kind == 'auto':  # the score network's family tells images from vectors
      kind = 'conv' if config.model.name == 'unet' else 'mlp'
    feature_fn = None
    if mc.disc_features == 'eval_classifier':
      feature_fn = _EvalClassifierFeatures(config)
      frozen = feature_fn.params
    net = nc.build_net('head' if feature_fn is not None else kind, 1, ch=mc.disc_ch,
                       ch_mult=mc.disc_ch_mult, num_res_blocks=mc.disc_num_res_blocks,
                       dropout=mc.disc_dropout, hidden=mc.disc_hidden, depth=mc.disc_depth)
    disc = nc.NoisyClassifier(net, 1, feature_fn)
  disc_tx = optax.chain(optax.clip_by_global_norm(1.0),
                        optax.adamw(mc.disc_lr, weight_decay=mc.disc_weight_decay))
  signature = _disc_signature(mc)
  return TIW(dsm, disc, lambda ds, idx: split_indices(mc, ds, idx, section),
             variant=mc.variant, section=section,
             alpha=float(mc.alpha), score_correction=bool(mc.score_correction),
             batch_size=config.train.batch_size,
             ref_batch_fraction=mc.ref_batch_fraction, disc_tx=disc_tx, disc_lr=mc.disc_lr,
             disc_pretrain_steps=mc.disc_pretrain_steps, disc_joint=mc.disc_joint,
             disc_batch_size=mc.disc_batch_size, disc_time_weighting=mc.disc_time_weighting,
             frozen_features=frozen, disc_cache=mc.disc_cache, disc_signature=signature,
             seed=config.seed)
