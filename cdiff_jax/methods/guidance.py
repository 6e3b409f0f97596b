"""Guidance and composition: turn trained models into the eps (or energy) a sampler uses.

The composing functions here return an ``eps_fn(params, x, t, cond) -> eps`` for the core
samplers (``cdiff_jax.sampling.Sampler``: ancestral, DDIM, Euler-Maruyama, Heun) or a
``Potential`` for the annealed MCMC samplers (``cdiff_jax.sampling.mcmc``); the others build
their inputs (a composition's ``cond``, stacked parameters, a guidance classifier). Nothing
is retrained.

* Classifier-free guidance (one conditional model whose label ``null`` is the
  unconditional one): ``eps_u + w (eps_c - eps_u)``; ``w = 1`` is the conditional model.
* AND / NOT of conditions (composable diffusion): ``eps_u + sum_i w_i (eps_i - eps_u)``, a
  negative ``w_i`` negates concept i. All conditions, the null one included, go through the
  network in ONE vmapped call (the batch grows by the number of conditions; there is no
  Python loop of network calls). Conditions may differ per example, so one sampling batch
  can hold several compositions.
* Separately trained models of one family (same architecture, so their parameters stack):
  product (AND / NOT) ``E = sum_k w_k E_k`` and mixture (OR) ``E = -log sum_k w_k
  exp(-E_k - log Z_k)``, with signed weights allowed (a box minus a box inside it). One
  vmapped call over the stacked parameters.
* Classifier guidance: ``eps - w sigma_t grad_x log p(y | x_t, t)`` with a time-dependent
  classifier trained on noised data (``cdiff_jax.methods.noisy_classifier``, shared with
  the TIW-DSM discriminator).

Energy and gradient of a composed potential are always computed together, as the value
and the chain-rule gradient of ONE function of the component energies, so they cannot
disagree (a known defect of public ports, where the composed gradient and the energy used
in the Metropolis test were assembled separately).
"""

from __future__ import annotations

from typing import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cdiff_jax.config import ConfigError
from cdiff_jax.sampling.mcmc import Potential

# Label that stands for "any" (the unconditional model) in a composition's concept list.
ANY = -1


def _bcast(v, x):
  return jnp.reshape(v, (-1,) + (1,) * (x.ndim - 1))


# ----------------------------------------------------------------------------- CFG

def cfg_eps(model, params, x, t, labels, guidance_scale: float, null_label: int):
  """``eps_u + w (eps_c - eps_u)`` from one forward pass over the doubled batch.

  ``t`` a scalar or one time per example; ``labels`` one int class per example (an array
  or a list)."""
  n = x.shape[0]
  labels = jnp.asarray(labels)
  if labels.shape != (n,) or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f'cfg_eps: labels must be one int class per example, shape ({n},); got '
                     f'{labels.dtype.name} of shape {labels.shape}. Pass labels=None (in '
                     'cfg_eps_fn) for unconditional samples.')
  t = jnp.broadcast_to(jnp.asarray(t), (n,))
  if guidance_scale == 1.0:
    return model.eps(params, x, t, labels)
  x2 = jnp.concatenate([x, x])
  t2 = jnp.concatenate([t, t])
  y2 = jnp.concatenate([labels, jnp.full((n,), null_label, labels.dtype)])
  eps = model.eps(params, x2, t2, y2)
  eps_c, eps_u = eps[:n], eps[n:]
  return eps_u + guidance_scale * (eps_c - eps_u)


def _check_guidable(model, null_label: int, what: str) -> None:
  """A class-conditional model whose null class is ``null_label`` (its ``num_classes``):
  an unconditional one ignored the labels, so guidance and compositions did nothing."""
  num_classes = getattr(getattr(model, 'net', None), 'num_classes', None)
  if num_classes == 0:
    raise ValueError(f'{what}: the model is unconditional (its network has no classes), so '
                     'there is nothing to guide or compose; train it with '
                     'model.conditional=True and model.class_dropout=0.1.')
  if num_classes is not None and null_label != num_classes:
    raise ValueError(f'{what}: null_label={null_label}, but this model\'s null class is '
                     f'{num_classes} (its num_classes); pass null_label={num_classes}.')


def cfg_eps_fn(model, guidance_scale: float, null_label: int) -> Callable:
  """``eps_fn(params, x, t, labels)``; ``labels=None`` samples the unconditional model."""
  _check_guidable(model, null_label, 'cfg_eps_fn')

  def eps_fn(params, x, t, labels):
    if labels is None:
      return model.eps(params, x, t, jnp.full((x.shape[0],), null_label, jnp.int32))
    return cfg_eps(model, params, x, t, labels, guidance_scale, null_label)

  return eps_fn


# ----------------------------------------------------------------------------- AND / NOT

def make_composition(concepts: Sequence[int], weights: Sequence[float], batch_size: int,
                     null_label: int, field: str | None = None) -> dict:
  """``cond`` for ``composed_eps_fn``: the same composition for every example.

  ``concepts``: class labels, or ``ANY`` (-1) for the unconditional model. ``weights``:
  one per concept, negative = NOT. At least one weight must be positive (a negation alone
  is ill-defined: "not a 1" says nothing about what to draw). ``field``: the config field
  the composition came from, for the errors' wording (None: named as this function's
  arguments).
  """
  where = (lambda arg: f'config.{field}.{arg}') if field else (
      lambda arg: f'make_composition({arg})')
  concepts, weights = list(concepts), [float(w) for w in weights]
  if len(concepts) != len(weights) or not concepts:
    raise ConfigError(f'{where("concepts, weights")}: give one weight per concept (got '
                      f'{len(concepts)} concepts and {len(weights)} weights).')
  if not any(w > 0 for w in weights):
    raise ConfigError(f'{where(f"weights={tuple(weights)}")}: NOT needs at least one positive '
                      'concept; give some concept (or ANY=-1, the unconditional model) a '
                      'weight > 0.')
  bad = [c for c in concepts if c != ANY and not 0 <= c < null_label]
  if bad:
    raise ConfigError(f'{where("concepts")}: {bad} are not classes of this model '
                      f'(0..{null_label - 1}, or -1 for any).')
  labels = np.asarray([null_label if c == ANY else c for c in concepts], np.int32)
  return dict(labels=jnp.asarray(np.tile(labels, (batch_size, 1))),
              weights=jnp.asarray(np.tile(np.asarray(weights, np.float32), (batch_size, 1))))


def stack_compositions(conds: Sequence[dict]) -> dict:
  """Concatenates compositions (same number of concepts) along the batch axis."""
  return jax.tree.map(lambda *a: jnp.concatenate(a), *conds)


def _with_null(cond, null_label):
  if not isinstance(cond, dict):
    raise ValueError('a composition samples with cond=make_composition(...), a dict of labels '
                     f'and weights; got {type(cond).__name__} (plain labels: cfg_eps_fn).')
  labels, weights = cond['labels'], cond['weights']
  chex.assert_rank([labels, weights], 2)
  chex.assert_equal_shape([labels, weights])
  null = jnp.full(labels.shape[:1] + (1,), null_label, labels.dtype)
  return jnp.concatenate([null, labels], axis=1), weights


def composed_eps_fn(model, null_label: int) -> Callable:
  """``eps_fn(params, x, t, cond)`` with ``cond = dict(labels=(B, K), weights=(B, K))``:
  ``eps_u + sum_k w_k (eps_k - eps_u)``, all K + 1 conditions in one vmapped call."""
  _check_guidable(model, null_label, 'composed_eps_fn')

  def eps_fn(params, x, t, cond):
    labels, weights = _with_null(cond, null_label)
    if labels.shape[0] != x.shape[0]:
      raise ValueError(f'the composition is for a batch of {labels.shape[0]} and x has '
                       f'{x.shape[0]} examples: build it (make_composition) with '
                       f'batch_size={x.shape[0]}.')
    # vmap over the condition axis: one network call on K + 1 stacked batches.
    eps = jax.vmap(lambda y: model.eps(params, x, t, y), in_axes=1)(labels)  # (K+1, B, ...)
    eps_u, eps_k = eps[0], eps[1:]
    w = weights.T.reshape(weights.T.shape + (1,) * (x.ndim - 1))          # (K, B, 1...)
    return eps_u + jnp.sum(w * (eps_k - eps_u[None]), axis=0)

  return eps_fn


def composed_potential(model, null_label: int) -> Potential:
  """The energy version of ``composed_eps_fn``: ``E = E_u + sum_k w_k (E_k - E_u)``; its
  gradient is the same combination of gradients. A score-only model gives zero energies
  (``ScoreModel.potential_terms``): then only ULA and U-HMC can sample it."""
  _check_guidable(model, null_label, 'composed_potential')

  def fn(params, x, t, cond):
    labels, weights = _with_null(cond, null_label)
    sigma = _bcast(model.schedule.sigma(t), x)
    energy, eps = jax.vmap(lambda y: model.potential_terms(params, x, t, y), in_axes=1)(labels)
    grad = eps / sigma[None]
    coef = jnp.concatenate([1.0 - weights.sum(1, keepdims=True), weights], axis=1).T  # (K+1, B)
    coef_x = coef.reshape(coef.shape + (1,) * (x.ndim - 1))
    return jnp.sum(coef * energy, axis=0), jnp.sum(coef_x * grad, axis=0)

  return Potential(fn, has_energy=model.parameterization == 'energy')


# ----------------------------------------------------------------------------- several models

def stack_params(params_list: Sequence) -> object:
  """Parameters of models of one family, stacked on a new leading axis (for vmap)."""
  shapes = [jax.tree.map(jnp.shape, p) for p in params_list]
  if any(s != shapes[0] for s in shapes[1:]):
    raise ValueError('stack_params: the models differ in architecture; only models of the same '
                     'family (same network config) can be composed in one batched call.')
  return jax.tree.map(lambda *a: jnp.stack(a), *params_list)


def model_components(model) -> Callable:
  """``components(stacked_params, x, t, cond) -> (energies (K, B), grads (K, B, ...))`` of K
  separately trained models of one family, in one vmapped call. Score-only models give
  zero energies (then only products, sampled without a Metropolis test, make sense): the
  function's ``has_energy`` attribute says which, and ``combine`` reads it."""

  def components(stacked, x, t, cond):
    sigma = _bcast(model.schedule.sigma(t), x)
    energy, eps = jax.vmap(lambda p: model.potential_terms(p, x, t, cond))(stacked)
    return energy, eps / sigma[None]

  components.has_energy = model.parameterization == 'energy'
  return components


def analytic_components(log_probs: Sequence[Callable], schedule) -> Callable:
  """Components from exact noised log-densities ``log_prob(x, alpha, sigma)`` (toys):
  ``E_k = -log p_k,t`` and its gradient by autodiff; ``params`` is ignored."""

  def components(params, x, t, cond):
    del params, cond
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    out = []
    for log_prob in log_probs:
      energy = lambda x_, lp=log_prob: -lp(x_, alpha, sigma)
      e, vjp = jax.vjp(energy, x)
      out.append((e, vjp(jnp.ones_like(e))[0]))
    return jnp.stack([o[0] for o in out]), jnp.stack([o[1] for o in out])

  return components


COMBINATIONS = ('product', 'mixture')


def combine(components: Callable, kind: str, weights: Sequence[float],
            log_normalizer: Callable | None = None, has_energy: bool | None = None,
            floor: float = 1e-3) -> Potential:
  """A composed potential from K components.

  ``kind='product'``: ``E = sum_k w_k E_k`` (AND; a negative weight is NOT).
  ``kind='mixture'``: ``E = -log sum_k w_k exp(-E_k - log Z_k(t))`` with
  ``log_normalizer(t) -> (K,)`` the components' log-partition functions at time t
  (normalized energies: mixture weights mean nothing otherwise). Negative weights make a
  signed mixture (a set difference); where the learned components make the sum
  non-positive it is floored at ``floor`` times its positive part, so the energy stays
  finite (density at most ``floor`` of the positive part there).

  Gradient: ``sum_k dE/dE_k grad E_k``, from the VJP of the same function that gives E.

  ``has_energy``: whether the components' energies mean anything (None: the components'
  own ``has_energy`` attribute, as ``model_components`` sets it; True for functions without
  one, such as ``analytic_components``). Without energies the potential admits no
  Metropolis test (MALA, HMC are refused), and a mixture, whose weights are energies, is
  refused here.
  """
  if kind not in COMBINATIONS:
    raise ValueError(f'composition kind {kind!r} is unknown; use one of {COMBINATIONS}.')
  if has_energy is None:
    has_energy = getattr(components, 'has_energy', True)
  if kind == 'mixture' and not has_energy:
    raise ConfigError('a mixture weighs its components by their energies, and these '
                      "components are score-only: train them with model.parameterization="
                      "'energy', or compose a product.")
  w = jnp.asarray(weights, jnp.float32)
  if kind == 'mixture' and not np.any(np.asarray(weights) > 0):
    raise ConfigError(f'mixture weights {tuple(weights)}: need at least one positive weight.')

  def energy_of(energies, t):
    if kind == 'product':
      return jnp.tensordot(w, energies, axes=1)
    if log_normalizer is not None:
      energies = energies + jnp.moveaxis(jax.vmap(log_normalizer)(t), 0, 1)
    # Shift by the largest positive-weight term; negative-weight terms are clipped before
    # exp (if they are that large the sum is floored anyway). Both branches of the floor
    # stay finite, so neither the value nor its gradient can become NaN.
    neg = -energies
    is_pos = (w > 0)[:, None]
    shift = jax.lax.stop_gradient(jnp.max(jnp.where(is_pos, neg, -jnp.inf), axis=0))
    terms = jnp.exp(jnp.minimum(neg - shift, 30.0))
    positive = jnp.sum(jnp.where(is_pos, w[:, None] * terms, 0.0), axis=0)
    total = jnp.sum(w[:, None] * terms, axis=0)
    return -(shift + jnp.log(jnp.maximum(total, floor * positive)))

  def fn(params, x, t, cond):
    energies, grads = components(params, x, t, cond)
    if energies.shape[0] != w.shape[0]:
      raise ValueError(f'combine: {w.shape[0]} weights for {energies.shape[0]} components; '
                       'give one weight per component.')
    energy, vjp = jax.vjp(lambda e: energy_of(e, t), energies)
    (coef,) = vjp(jnp.ones_like(energy))                       # dE/dE_k, (K, B)
    grad = jnp.sum(coef.reshape(coef.shape + (1,) * (x.ndim - 1)) * grads, axis=0)
    return energy, grad

  return Potential(fn, has_energy=has_energy)


def product_eps_fn(model, weights: Sequence[float]) -> Callable:
  """``eps = sum_k w_k eps_k`` of separately trained models (score of the product), one
  vmapped call over their stacked parameters. Works for eps- and energy-models."""
  w = jnp.asarray(weights, jnp.float32)

  def eps_fn(stacked, x, t, cond):
    eps = jax.vmap(lambda p: model.eps(p, x, t, cond))(stacked)
    return jnp.tensordot(w, eps, axes=1)

  return eps_fn


# ----------------------------------------------------------------------------- classifier guidance

def classifier_guided_eps_fn(eps_fn: Callable, classifier, schedule, guidance_scale: float,
                             loop_friendly_grads: bool | None = None) -> Callable:
  """``eps - w sigma_t grad_x log p(y | x_t, t)``.

  Returns ``eps_fn(params, x, t, labels)`` with ``params = dict(model=..., classifier=...)``;
  ``labels`` are the classes to steer to (the diffusion model itself may be unconditional:
  it is called with ``cond=None``). ``classifier``: a ``noisy_classifier.NoisyClassifier``
  (anything with its ``example_logits``). ``loop_friendly_grads``: trace the classifier's
  3x3 convolutions with ``unet.loop_friendly_conv`` (same values; on XLA:CPU ~3x faster
  guided sampling, whose loop differentiates the classifier at every step). None (default):
  on CPU only (``unet.loop_friendly_default``).
  """
  from cdiff_jax.methods import noisy_classifier as nc  # Local: shared with TIW-DSM.
  from cdiff_jax.models import unet
  if loop_friendly_grads is None:
    loop_friendly_grads = unet.loop_friendly_default()

  def guided(params, x, t, labels):
    eps = eps_fn(params['model'], x, t, None)
    # The samplers call this inside a compiled loop, where XLA:CPU's own convolution
    # gradients are slow: trace the classifier with loop-friendly ones (see unet.py).
    with unet.loop_friendly_conv_grads(loop_friendly_grads):
      _, grad = nc.class_log_prob_and_grad(classifier, params['classifier'], x, t, labels)
    return eps - guidance_scale * _bcast(schedule.sigma(t), x) * grad

  return guided


def train_guidance_classifier(dataset, schedule, steps: int = 1500, batch_size: int = 128,
                              lr: float = 2e-3, seed: int = 0, net: str = 'auto',
                              progress: bool = False, **net_kwargs):
  """Trains ``p(y | x_t, t)`` on data noised by ``schedule`` (cross-entropy, AdamW).

  ``net``: 'conv' (images, (H, W, C)), 'mlp' (vectors) or 'auto' (by the data's shape).
  Returns (classifier, params, metrics of the last steps: ce, accuracy on noised inputs).
  """
  from cdiff_jax.methods import noisy_classifier as nc
  if net == 'auto':
    net = 'conv' if len(dataset.image_shape) == 3 else 'mlp'
  elif net == 'conv' and len(dataset.image_shape) != 3:
    raise ValueError(f"net='conv' needs images of shape (H, W, C); this data has shape "
                     f"{dataset.image_shape}: use net='mlp' or 'auto'.")
  clf = nc.NoisyClassifier(nc.build_net(net, dataset.num_classes, **net_kwargs),
                           dataset.num_classes)
  rng = jax.random.key(seed)
  params = clf.init(rng, dataset.image_shape)
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10), steps),
                   weight_decay=1e-4)

  def loss_fn(p, x, y, key):
    return nc.noised_ce_loss(clf, p, x, y, key, schedule)

  update = nc.make_update(loss_fn, tx)
  order = np.random.default_rng(seed)

  def batches(i):
    del i
    batch = dataset.get(order.integers(0, len(dataset), batch_size))
    return batch['image'], batch['label']

  params, _, metrics = nc.fit(update, params, tx.init(params), batches, steps,
                              jax.random.fold_in(rng, 1), progress, 'guidance classifier')
  return clf, params, metrics


__all__ = ['ANY', 'cfg_eps', 'cfg_eps_fn', 'make_composition', 'stack_compositions',
           'composed_eps_fn', 'composed_potential', 'stack_params', 'model_components',
           'analytic_components', 'combine', 'product_eps_fn', 'classifier_guided_eps_fn',
           'train_guidance_classifier']
