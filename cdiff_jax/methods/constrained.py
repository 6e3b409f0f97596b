"""Constrained diffusion via dual training (Khalafi, Ding & Ribeiro).

Problem: ``min_p KL(q_0 || p)  s.t.  KL(q_i || p) <= b_i``, with KL replaced by the DSM loss
``L_i`` (the negative ELBO up to the entropy of q_i, so each b_i is a threshold in loss
units). Lagrangian with lam_0 = 1: ``L_0 + sum_i lam_i L_i - lam.b``, whose minimizer for fixed
lam is the mixture ``(q_0 + sum lam_i q_i) / (1 + sum lam_i)``; dual training chooses lam.

One training step (one XLA program, see ``cdiff_jax.train_step``):

* primal: a gradient step on ``L_0 + sum_i stop_grad(lam_i) L_i`` (optionally divided by
  ``1 + sum lam``, which does not move the minimizer and keeps the step size stable), where
  every ``L_i`` is the mean per-example DSM loss of group i of one flat batch evaluated in a
  single model call;
* dual, every ``dual_every`` applied (finite) steps: ``lam <- max(0, lam + eta (Lhat - b))``
  with ``Lhat`` the current minibatch loss (the authors' choice), the mean over the window
  of primal steps since the last dual step, or a running average; with the resilient relaxation
  (``resilient_alpha > 0``, slack cost ``alpha/2 u^2``) the step is the proximal one,
  ``lam <- max(0, (lam + eta (Lhat - b)) / (1 + eta/alpha))``: the same fixed point
  ``alpha (L - b)_+`` as the explicit ``lam + eta (Lhat - b - lam/alpha)``, which stays
  bounded when a threshold is infeasible, but stable for every step size (the explicit one
  oscillates between 0 and ``eta (L - b)`` once ``eta >= 2 alpha``).

Dual variables, thresholds and the estimator's accumulators live in ``TrainState.extras``
and are checkpointed with everything else.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cdiff_jax import losses
from cdiff_jax.config import ConfigError, check_fields

ESTIMATES = ('minibatch', 'window', 'ema')
THRESHOLD_MODES = ('absolute', 'reference')
CONSTRAINT_SOURCES = ('classes', 'source')
OBJECTIVES = ('dsm', 'tiw')   # the primal objective: plain DSM or TIW-DSM (debiasing)


@dataclasses.dataclass(frozen=True, eq=False)
class Constrained:
  """Dual training around a per-example loss (``base.per_example_loss``).

  ``base`` is any object with ``per_example_loss(params, batch, rng) -> (vector, aux)``: the
  plain DSM method, or the TIW-DSM method for debiasing and constraints together.
  """

  base: Any
  num_constraints: int
  thresholds: tuple[float, ...]
  constraint_names: tuple[str, ...] = ()
  constraint_classes: tuple[int, ...] = ()   # constraint_source='classes'
  constraint_source: str = 'classes'
  objective_batch: int = 128
  constraint_batch: int = 64
  dual_lr: float = 1.0
  dual_every: int = 1
  dual_start: int = 0                         # no dual steps before this many applied steps
  dual_estimate: str = 'window'
  dual_ema: float = 0.9
  dual_lr_fn: Callable | None = None          # multiplies dual_lr (e.g. the primal LR shape)
  init_lambda: float = 0.0
  resilient_alpha: float = 0.0
  normalize: bool = True
  enabled: bool = True                        # False: lam stays 0 (the unconstrained arm)
  reference: tuple[float, ...] = ()           # reference model's (L_0, L_1..m), if measured
  constraint_t_min: float = 0.0               # constraint losses cover only t in [this, 1]
  # How to loosen a threshold, in the config's terms (the infeasibility warning).
  loosen_hint: str = 'raise method.thresholds'
  # The primal objective's own groups come first in the batch: 1 for DSM; 2 (bias, ref) for
  # a TIW-DSM objective, whose per-example weight * corrected loss is then the objective.
  num_objective_groups: int = 1
  history: list = dataclasses.field(default_factory=list, repr=False)

  def __post_init__(self):
    """Checks the fields as given in Python (``build`` checks a config's first, naming
    config fields); one threshold is broadcast to every constraint."""
    m = self.num_constraints
    fail = lambda field, why: ValueError(f'Constrained({field}={getattr(self, field)!r}): {why}')
    if not (isinstance(m, (int, np.integer)) and m >= 1):
      raise fail('num_constraints', 'give 1 or more.')
    thresholds = tuple(float(b) for b in np.ravel(self.thresholds))
    if len(thresholds) == 1:
      thresholds *= m
    if len(thresholds) != m:
      raise fail('thresholds', f'give one threshold, or one per constraint ({m}).')
    object.__setattr__(self, 'thresholds', thresholds)
    for field in ('constraint_names',) + (
        ('constraint_classes',) if self.constraint_source == 'classes' else ()):
      if getattr(self, field) and len(getattr(self, field)) != m:
        raise fail(field, f'give one per constraint ({m}), or none.')
    if not self.constraint_names:  # the groups, logs and warnings name every constraint
      object.__setattr__(self, 'constraint_names',
                         tuple(f'constraint_{i}' for i in range(1, m + 1)))
    for field, ok, why in (
        ('dual_estimate', self.dual_estimate in ESTIMATES, f'use one of {ESTIMATES}.'),
        ('constraint_source', self.constraint_source in CONSTRAINT_SOURCES,
         f'use one of {CONSTRAINT_SOURCES}.'),
        ('dual_every', self.dual_every >= 1, 'give 1 or more.'),
        ('dual_start', self.dual_start >= 0, 'give 0 or more.'),
        ('dual_ema', 0.0 <= self.dual_ema < 1.0, 'give a number in [0, 1).'),
        ('dual_lr', self.dual_lr >= 0, 'give 0 or more.'),
        # Multipliers live on lambda >= 0: a negative start could zero 1 + sum(lambda).
        ('init_lambda', self.init_lambda >= 0, 'give 0 or more.'),
        ('thresholds', all(np.isfinite(thresholds)), 'give finite numbers.'),
        ('resilient_alpha', self.resilient_alpha >= 0, 'give 0 (off) or more.'),
        ('constraint_t_min', 0.0 <= self.constraint_t_min < 1.0, 'give a time in [0, 1).'),
        ('num_objective_groups', self.num_objective_groups >= 1, 'give 1 or more.'),
        ('constraint_source', not (self.composed and self.constraint_source == 'source'),
         "a TIW-DSM objective takes its data from its biased/reference split: use 'classes'.")):
      if not ok:
        raise fail(field, why)

  @property
  def step_size_fields(self) -> tuple[str, ...]:
    """The config fields of the method's own steps, for a non-finite stop's message."""
    return (('method.dual_lr',) if self.enabled else ()) + tuple(
        getattr(self.base, 'step_size_fields', ()))

  # ------------------------------------------------------------------ data
  @property
  def composed(self) -> bool:
    """True when the objective is another method's (TIW-DSM) with its own groups/extras."""
    return hasattr(self.base, 'per_example_terms')

  def data_groups(self, dataset, train_indices: np.ndarray):
    groups = [('objective', np.asarray(train_indices), self.objective_batch)]
    pool = np.asarray(train_indices)
    if self.composed:
      groups = list(self.base.data_groups(dataset, np.asarray(train_indices)))
      assert len(groups) == self.num_objective_groups, (len(groups), self.num_objective_groups)
      # The constraints see only the data the objective has (e.g. TIW-DSM's biased and
      # reference sets), not the examples its split set aside.
      pool = np.unique(np.concatenate([g[1] for g in groups]))
    if self.constraint_source == 'classes':
      if len(self.constraint_classes) != self.num_constraints:
        raise ValueError(f'Constrained(constraint_classes={self.constraint_classes!r}): '
                         f"constraint_source='classes' needs one class per constraint "
                         f'({self.num_constraints}) to draw its examples from.')
      from cdiff_jax.data import imbalance
      imbalance._check_classes(self.constraint_classes, dataset.num_classes,
                               'config.method.constraint_classes')
      for name, c in zip(self.constraint_names, self.constraint_classes):
        idx = pool[dataset.labels[pool] == c]
        if len(idx) == 0:
          raise ConfigError(f'config.method.constraint_classes: class {c} has no training '
                            'examples left after data selection.')
        groups.append((name, idx, self.constraint_batch))
    else:
      if 'source' not in dataset.attributes:
        raise ConfigError("config.method.constraint_source='source' needs a dataset with a "
                          "'source' attribute (0 = objective, i = constraint i).")
      # The data selection (config.data.keep/drop/minority_*) applies to every source.
      src = np.asarray(dataset.attributes['source'])
      groups = [('objective', pool[src[pool] == 0], self.objective_batch)]
      for i, name in enumerate(self.constraint_names, start=1):
        groups.append((name, pool[src[pool] == i], self.constraint_batch))
    return groups

  # ------------------------------------------------------------------ state
  def init_extras(self, rng, params):
    m = self.num_constraints
    lam0 = self.init_lambda if self.enabled else 0.0
    base = self.base.init_extras(rng, params) if self.composed else {}
    return dict(**({'base': base} if base else {}), lam=jnp.full((m,), lam0, jnp.float32),
                thresholds=jnp.asarray(self.thresholds, jnp.float32).reshape(m),
                window_sum=jnp.zeros((m,), jnp.float32),
                loss_ema=jnp.zeros((m,), jnp.float32),
                ema_count=jnp.zeros((), jnp.int32),
                num_dual_steps=jnp.zeros((), jnp.int32))

  # ------------------------------------------------------------------ losses
  def group_losses(self, params, batch, rng, extras=None, window_objective: bool = False):
    """(L of shape (1 + m,), aux of the base loss): L[0] objective, L[1:] constraints.

    ``window_objective``: L[0] over the constraints' times ``t >= constraint_t_min`` too
    (the reference for ``threshold_reference='objective'``, comparable with L[1:])."""
    k = self.num_objective_groups
    kwargs = {'extras': (extras or {}).get('base', {})} if self.composed else {}
    if self.constraint_t_min > 0:
      # KL constraints on the noised distributions at t = constraint_t_min (the path-measure
      # KL of [t_c, 1] bounds it): class proportions are already decided there, while the
      # few images of a minority cannot be memorized through them.
      windowed = (batch['group'] >= k) | window_objective
      t_lo = jnp.where(windowed, self.constraint_t_min, 0.0)
      per_example, aux = self.base.per_example_loss(params, batch, rng, t_lo=t_lo, **kwargs)
    else:
      per_example, aux = self.base.per_example_loss(params, batch, rng, **kwargs)
    means = losses.group_means(per_example, batch['group'], self.num_constraints + k)
    if k == 1:
      return means, aux
    # The objective is the mean over all its examples (TIW-DSM: the pi-mixed minibatch).
    in_objective = (batch['group'] < k).astype(per_example.dtype)
    objective = jnp.sum(per_example * in_objective) / jnp.sum(in_objective)
    return jnp.concatenate([objective[None], means[k:]]), aux

  def lagrangian(self, group_loss, lam):
    total = group_loss[0] + jnp.sum(lam * group_loss[1:])
    return total / (1.0 + jnp.sum(lam)) if self.normalize else total

  def loss(self, params, extras, batch, rng):
    group_loss, aux = self.group_losses(params, batch, rng, extras)
    lam = jax.lax.stop_gradient(extras['lam'])
    constraint_loss = jax.lax.stop_gradient(group_loss[1:])
    metrics = dict(objective_loss=group_loss[0], constraint_loss=constraint_loss)
    if self.composed and self.num_objective_groups == 2:   # TIW-DSM objective: its weights
      w = losses.group_means(aux['weight'], batch['group'], self.num_objective_groups + self.num_constraints)
      metrics.update(weight_bias=w[self.base.bias_group], weight_ref=w[self.base.ref_group])
    return self.lagrangian(group_loss, lam), dict(metrics=metrics, constraint_loss=constraint_loss)

  def update_extras(self, extras, aux, step, rng):
    # The dual side counts applied (finite) steps, ``ema_count``, not ``step``: a skipped
    # non-finite step keeps the old extras (neither adding to a window nor ending one), and
    # the primal schedule counts applied steps too. Counted by step, a skip left a window's
    # mean one loss short or carried its sum into the next window, and moved the dual lr
    # and dual_start out of step with the primal lr.
    del step, rng
    applied = extras['ema_count']   # applied steps before this one
    current = aux['constraint_loss']
    if current.shape != extras['lam'].shape:  # it broadcast lam to (m, m), or failed in JAX
      raise ValueError(f"aux['constraint_loss'] has shape {current.shape}; the dual step takes "
                       f'one loss per constraint, shape {extras["lam"].shape}.')
    window_sum = extras['window_sum'] + current
    count = applied + 1
    loss_ema = self.dual_ema * extras['loss_ema'] + (1 - self.dual_ema) * current
    # Bias-corrected running average (as in Adam), so early dual steps are not pulled to 0.
    ema = loss_ema / (1 - self.dual_ema ** count.astype(jnp.float32))
    # Windows of ``dual_every`` applied steps. The window's mean so far (its full mean at
    # the window's last step, where lam moves), so the logged gap is a gap at every step.
    position = applied % self.dual_every
    in_window = jnp.asarray(position + 1, jnp.float32)
    estimate = {'minibatch': current, 'window': window_sum / in_window,
                'ema': ema}[self.dual_estimate]
    lam = extras['lam']
    gap = estimate - extras['thresholds']
    eta = self.dual_lr * (self.dual_lr_fn(applied) if self.dual_lr_fn is not None else 1.0)
    ascent = lam + eta * gap
    if self.resilient_alpha > 0:  # proximal step on the slack cost: stable for any eta
      ascent = ascent / (1.0 + eta / self.resilient_alpha)
    ascent = jnp.maximum(0.0, ascent)
    window_end = position + 1 == self.dual_every
    is_dual_step = window_end & (applied >= self.dual_start) & self.enabled
    lam = jnp.where(is_dual_step, ascent, lam)
    # The relaxation's optimal slack for these multipliers, u = lam / alpha.
    slack = lam / self.resilient_alpha if self.resilient_alpha > 0 else jnp.zeros_like(lam)
    new = dict(extras, lam=lam, loss_ema=loss_ema, ema_count=count,
               window_sum=jnp.where(window_end, jnp.zeros_like(window_sum), window_sum),
               num_dual_steps=extras['num_dual_steps'] + is_dual_step)
    metrics = dict(lam=lam, constraint_gap=gap, slack=slack, threshold=extras['thresholds'],
                   num_dual_steps=new['num_dual_steps'])
    return new, metrics

  # ------------------------------------------------------------------ host side
  def host_metrics(self, summary: dict, step: int, patience: int = 5) -> list[str]:
    """Warnings from the logged figures: a multiplier that keeps growing while its
    constraint stays violated means the threshold is probably infeasible. Not with the
    resilient relaxation, whose multipliers rise to their bounded fixed point
    ``alpha (L - b)_+`` by design (the slack it grants is logged). A composed objective's own
    warnings (TIW-DSM's discriminator) come first."""
    base = (list(self.base.host_metrics(summary, step)) if hasattr(self.base, 'host_metrics')
            else [])
    if not self.enabled or self.resilient_alpha > 0:
      return base
    self.history.append((step, np.atleast_1d(summary['lam']),
                         np.atleast_1d(summary['constraint_gap'])))
    del self.history[:-(patience + 1)]
    if len(self.history) <= patience:
      return base
    lams = np.stack([h[1] for h in self.history])
    gaps = np.stack([h[2] for h in self.history])
    growing = [i for i in range(self.num_constraints)
               if np.all(np.diff(lams[:, i]) > 0) and np.all(gaps[1:, i] > 0)]
    if not growing:
      return base
    # One line per log for all of them (not one per constraint).
    each = '; '.join(f'{self.constraint_names[i]}: lambda {lams[0, i]:.3g} -> {lams[-1, i]:.3g}, '
                     f'L - b now {gaps[-1, i]:.3g}' for i in growing)
    return base + [f'constraint{"s" if len(growing) > 1 else ""} {each} (over the last '
                   f'{patience} logs lambda grew while L - b stayed > 0): the threshold may be '
                   f'infeasible; {self.loosen_hint}, or set method.resilient_alpha > 0.']

  def for_restore(self) -> 'Constrained':
    """The method for a state restored from a checkpoint (its objective's, e.g. TIW-DSM's
    discriminator, not trained again; ``prepare``'s thresholds are in the state too)."""
    if hasattr(self.base, 'for_restore'):
      return dataclasses.replace(self, base=self.base.for_restore())
    return self

  def prepare(self, config, model, batcher, mesh) -> 'Constrained':
    """threshold_mode='reference': b_i = scale * L_ref + offset, with L_ref the reference
    model's L_i (threshold_reference='constraint') or its objective loss L_0 ('objective',
    over the constraints' times t >= constraint_t_min), measured on ``reference_batches``
    batches of this run's data; else unchanged.

    'objective' asks every constrained set to be fitted as well as the data overall. With
    ELBO losses, disjoint classes of similar entropy and a reference that reproduces the
    training frequencies pi, L_c <= L_0(ref) means rho_c >= exp(-H(pi)): 1/K for K balanced
    classes, more than 1/K for an imbalanced set (so not "fair" there; for a frequency
    target use threshold_reference='constraint' with target_frequency)."""
    mc = config.method
    if mc.threshold_mode != 'reference' or not mc.enabled:
      return self
    from cdiff_jax import checkpoint
    # 'objective': L_0 over the constraints' time window, or b would compare losses over
    # different times (with constraint_t_min = 0.25, L_0 over all t is nats above L_c).
    # The dual compares b with losses of the training parameters, so by default b comes from
    # the reference's training parameters too: its EMA average has lower losses (0.11-0.17
    # nats on the digits minorities), which would tighten every threshold by that much.
    params = checkpoint.load_params(mc.reference_workdir, reference_params(mc))
    ref = reference_losses(self, params, batcher, mesh,
                           mc.reference_batches, config.seed,
                           window_objective=mc.threshold_reference == 'objective')
    base = ref[1:] if mc.threshold_reference == 'constraint' else np.full(len(ref) - 1, ref[0])
    b = mc.threshold_scale * base + mc.threshold_offset
    if mc.target_frequency > 0:
      # With ELBO losses L_c = H_c - log rho_c + const, so moving class c from the frequency
      # pi_c the reference model gives it to the target lowers its loss by
      # log(target / pi_c) nats. pi_c: the training frequency (which a DSM reference model
      # reproduces) or the frequency measured in the reference run's samples (eval.json).
      pi = reference_frequencies(mc, self.constraint_classes, batcher)
      b = b - np.log(mc.target_frequency / pi)
      source = mc.get('frequency_source', 'training')
      print(f'{source} frequencies of the constrained classes: '
            f'{np.round(pi, 4).tolist()}; target {mc.target_frequency}')
    b = tuple(float(v) for v in b)
    window = ' (t >= constraint_t_min)' if mc.threshold_reference == 'objective' else ''
    print(f'reference model losses: objective{window} {ref[0]:.5f}, constraints '
          f'{", ".join(f"{n}={v:.5f}" for n, v in zip(self.constraint_names, ref[1:]))}; '
          f'thresholds b = {", ".join(f"{v:.5f}" for v in b)}')
    return dataclasses.replace(self, thresholds=b, reference=tuple(float(v) for v in ref))


def reference_params(mc) -> str:
  """Which parameters of the reference run give the thresholds ('params' for a config
  saved before the field existed)."""
  return mc.get('reference_params', 'params')


def reference_frequencies(mc, constraint_classes, batcher) -> np.ndarray:
  """pi_c of the frequency target: the training frequency of each constrained class
  (``frequency_source='training'``) or its frequency in the reference run's samples
  (``'generated'``: ``class_frequencies`` of the reference workdir's eval.json)."""
  if mc.get('frequency_source', 'training') == 'training':
    labels = batcher.dataset.labels[batcher.groups[0]]
    return np.array([np.mean(labels == c) for c in constraint_classes])
  path = os.path.join(mc.reference_workdir, 'eval.json')
  if not os.path.exists(path):
    raise ConfigError(f"config.method.frequency_source='generated': {path} does not exist; "
                      "evaluate the reference run (eval.enabled=True) or use "
                      "frequency_source='training'.")
  import json
  with open(path) as f:
    ev = json.load(f)
  freqs = np.asarray(ev['class_frequencies'], np.float64)
  # A class the reference never generated counts as half a sample (a finite threshold).
  floor = 0.5 / max(int(ev.get('num_samples', 1000)), 1)
  return np.maximum(freqs[list(constraint_classes)], floor)


def reference_losses(method: Constrained, params, batcher, mesh, num_batches: int,
                     seed: int, window_objective: bool = False) -> np.ndarray:
  """Mean group losses (1 + m,) of ``params`` over ``num_batches`` batches of the run's data.
  ``window_objective``: the objective's over the constraints' times (``group_losses``).

  Batches are taken far beyond any training step (the order is a function of the step), with
  a fixed key, so the figure is reproducible and independent of where training stands.
  """
  from cdiff_jax import parallel

  @jax.jit
  def group_loss(params, batch, rng):
    if not method.composed:
      return method.group_losses(params, batch, rng, window_objective=window_objective)[0]
    # A TIW-DSM objective needs the run's discriminator, the constraint terms do not: they
    # are plain DSM (the base's own, same weighting and times). L_0 is then plain DSM on
    # the objective's examples, only printed (validation allows constraint references only).
    k = method.num_objective_groups
    t_lo = (jnp.where(batch['group'] >= k, method.constraint_t_min, 0.0)
            if method.constraint_t_min > 0 else None)
    per_example, _ = method.base.dsm.per_example_loss(params, batch, rng, t_lo=t_lo)
    means = losses.group_means(per_example, batch['group'], method.num_constraints + k)
    in_objective = (batch['group'] < k).astype(per_example.dtype)
    objective = jnp.sum(per_example * in_objective) / jnp.sum(in_objective)
    return jnp.concatenate([objective[None], means[k:]])

  params = parallel.put_replicated(params, mesh)
  total = 0.0
  for i in range(num_batches):
    batch = parallel.put_batch(batcher.batch(10_000_000 + i), mesh)
    total = total + np.asarray(group_loss(params, batch, jax.random.fold_in(jax.random.key(seed), i)))
  return total / num_batches


# ---------------------------------------------------------------------- construction


def _per_constraint(values: Sequence[float], m: int, field: str) -> tuple[float, ...]:
  values = tuple(float(v) for v in values)
  if len(values) == 1:
    return values * m
  if len(values) != m:
    raise ConfigError(f'config.method.{field}={values}: give one value or one per constraint ({m}).')
  return values


# Fields a config may leave out (read with their defaults: runs saved before they existed).
OPTIONAL_FIELDS = ('name', 'enabled', 'normalize', 'frequency_source', 'reference_params')


def validate(config, check_paths: bool = True) -> None:
  mc = config.method
  known = default_method_config().keys()
  check_fields('method', mc, known, sorted(set(known) - set(OPTIONAL_FIELDS)),
               'cdiff_jax.methods.constrained.default_method_config()')
  if mc.constraint_source not in CONSTRAINT_SOURCES:
    raise ConfigError(f'config.method.constraint_source={mc.constraint_source!r}: must be one '
                      f'of {CONSTRAINT_SOURCES}.')
  if mc.constraint_source == 'classes' and len(set(mc.constraint_classes)) < len(
      mc.constraint_classes):  # two constraints on one class: one loss, pulled twice
    raise ConfigError(f'config.method.constraint_classes={tuple(mc.constraint_classes)}: names '
                      'a class twice; give each class once.')
  if mc.constraint_source == 'classes' and not mc.constraint_classes:
    raise ConfigError('config.method.constraint_classes=(): give at least one class to constrain '
                      "(or use method.name='dsm' for no constraints).")
  if mc.constraint_source == 'source' and not mc.constraint_names:
    raise ConfigError("config.method.constraint_names=(): constraint_source='source' needs one "
                      "name per constraint set (source i = constraint i), e.g. ('pre',).")
  if mc.dual_estimate not in ESTIMATES:
    raise ConfigError(f'config.method.dual_estimate={mc.dual_estimate!r}: must be one of {ESTIMATES}.')
  if mc.threshold_mode not in THRESHOLD_MODES:
    raise ConfigError(f'config.method.threshold_mode={mc.threshold_mode!r}: must be one of '
                      f'{THRESHOLD_MODES}.')
  if mc.objective not in OBJECTIVES:
    raise ConfigError(f'config.method.objective={mc.objective!r}: must be one of {OBJECTIVES}.')
  if mc.objective == 'tiw':
    if mc.constraint_source != 'classes':
      raise ConfigError("config.method.objective='tiw' takes its data from the biased/reference "
                        "split: use constraint_source='classes'.")
    if mc.threshold_mode == 'reference' and mc.threshold_reference != 'constraint':
      raise ConfigError("config.method.threshold_reference='objective' is not available with "
                        "objective='tiw' (its loss needs the reference run's discriminator): "
                        "use threshold_reference='constraint' or absolute thresholds.")
    if mc.tiw.disc_joint:
      raise ConfigError('config.method.tiw.disc_joint=True: with constraints the discriminator '
                        'is trained in a first phase and frozen; set it False.')
    from cdiff_jax.methods import tiw
    tiw.validate(_tiw_config(config), section='method.tiw')
  if mc.threshold_reference not in ('constraint', 'objective'):
    raise ConfigError(f'config.method.threshold_reference={mc.threshold_reference!r}: must be '
                      "'constraint' or 'objective'.")
  if mc.threshold_mode == 'reference' and not mc.reference_workdir and mc.enabled:
    raise ConfigError("config.method.reference_workdir='': threshold_mode='reference' needs "
                      'the workdir of a trained reference run (e.g. the unconstrained model).')
  if (check_paths and mc.threshold_mode == 'reference' and mc.enabled and
      not os.path.isdir(os.path.join(mc.reference_workdir, 'checkpoints'))):
    raise ConfigError(f'config.method.reference_workdir={mc.reference_workdir!r} holds no '
                      'checkpoints/; train the reference run first.')
  if not 0.0 <= mc.target_frequency <= 1.0:
    raise ConfigError(f'config.method.target_frequency={mc.target_frequency}: must lie in '
                      '(0, 1] (a class frequency), or be 0 (off).')
  if mc.target_frequency > 0 and config.diffusion.loss_weighting != 'elbo':
    raise ConfigError(f'config.method.target_frequency={mc.target_frequency}: a frequency '
                      "target converts to a threshold in nats only with ELBO losses; set "
                      "diffusion.loss_weighting='elbo' (or target_frequency=0).")
  source = mc.get('frequency_source', 'training')
  if source not in ('training', 'generated'):
    raise ConfigError(f"config.method.frequency_source={source!r}: must be 'training' or "
                      "'generated'.")
  if mc.target_frequency > 0 and mc.objective != 'dsm' and source == 'training':
    raise ConfigError(f'config.method.target_frequency={mc.target_frequency}: with '
                      "frequency_source='training' the conversion assumes the reference model "
                      f"generates the training frequencies, which an objective={mc.objective!r} "
                      "model does not; set frequency_source='generated' (the reference run's "
                      'measured frequencies).')
  if mc.target_frequency > 0 and mc.threshold_reference != 'constraint':
    # b_c -= log(target / pi_c) moves class c's own reference loss L_c(ref); applied to L_0(ref)
    # it asks for rho_c >= exp(-H(pi)) target / pi_c, which can exceed 1 (digits: 0.93 each).
    raise ConfigError(f'config.method.target_frequency={mc.target_frequency}: the frequency '
                      "target shifts each constraint's own reference loss; set "
                      "threshold_reference='constraint' (or target_frequency=0).")
  if mc.constraint_source == 'classes' and config.model.conditional and mc.enabled:
    raise ConfigError("config.model.conditional=True: class constraints act on the classes' "
                      "masses, and a class-conditional model's loss on class c is conditioned "
                      "on c and holds no mass (its sampler chooses the labels); set "
                      "model.conditional=False.")
  if mc.target_frequency > 0 and (mc.constraint_source != 'classes' or mc.threshold_mode != 'reference'):
    raise ConfigError(f'config.method.target_frequency={mc.target_frequency}: needs '
                      "constraint_source='classes' and threshold_mode='reference' (with "
                      f'constraint_source={mc.constraint_source!r}, threshold_mode='
                      f'{mc.threshold_mode!r} set target_frequency=0).')
  if reference_params(mc) not in ('params', 'ema_params'):
    raise ConfigError(f"config.method.reference_params={mc.reference_params!r}: must be "
                      "'params' (the reference's training parameters, which the dual's losses "
                      "are comparable with) or 'ema_params'.")
  if not 0.0 <= mc.constraint_t_min < 1.0:
    raise ConfigError(f'config.method.constraint_t_min={mc.constraint_t_min}: must lie in [0, 1).')
  for field in ('dual_lr', 'init_lambda', 'resilient_alpha'):
    if mc[field] < 0:
      raise ConfigError(f'config.method.{field}={mc[field]}: must be >= 0.')
  if mc.dual_start < 0:
    raise ConfigError(f'config.method.dual_start={mc.dual_start}: must be >= 0.')
  if mc.dual_every < 1:
    raise ConfigError(f'config.method.dual_every={mc.dual_every}: must be >= 1.')
  if mc.reference_batches < 1:
    raise ConfigError(f'config.method.reference_batches={mc.reference_batches}: must be >= 1 '
                      '(the batches a reference loss is measured on).')
  if not 0 <= mc.dual_ema < 1:
    raise ConfigError(f'config.method.dual_ema={mc.dual_ema}: must lie in [0, 1).')
  if mc.dual_lr_schedule not in ('constant', 'primal'):
    raise ConfigError(f"config.method.dual_lr_schedule={mc.dual_lr_schedule!r}: must be "
                      "'constant' or 'primal'.")
  for field in ('objective_batch', 'constraint_batch'):
    if mc[field] < 1:
      raise ConfigError(f'config.method.{field}={mc[field]}: must be positive.')
  if mc.threshold_mode == 'reference' and mc.enabled:
    _check_reference_run(config, check_paths)


# The reference model's losses are measured with this run's network and forward process on
# this run's data, so these must be the reference run's too (its data may be another split).
REFERENCE_MUST_MATCH = ('data.name', 'data.image_size', 'model.name', 'model.ch',
                        'model.ch_mult', 'model.num_res_blocks', 'model.attn_levels',
                        'model.num_heads', 'model.num_groups', 'model.hidden', 'model.depth',
                        'model.conditional', 'model.parameterization', 'diffusion.schedule',
                        'diffusion.num_steps', 'diffusion.beta_start', 'diffusion.beta_end',
                        'diffusion.beta_min', 'diffusion.beta_max', 'diffusion.t_min')


def _check_reference_run(config, check_paths: bool = True) -> None:
  """A reference run (its config.json) with another network or forward process is refused
  by name, before training, instead of failing to load or giving meaningless thresholds;
  so is one that has not finished (still training, or stopped), whose newest checkpoint
  would set looser thresholds than the finished model, unless ``check_paths=False``: a
  run resumed from its own checkpoint, or a reference that the caller trains first (the
  minority experiment's unconstrained arm, which may be an interrupted one to resume)."""
  import json
  from cdiff_jax import config as config_lib
  workdir = config.method.reference_workdir
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    record = json.load(f)
  if check_paths and not os.path.exists(os.path.join(workdir, 'summary.json')):  # at its end
    folder = os.path.join(workdir, 'checkpoints')
    steps = [int(d) for d in os.listdir(folder) if d.isdigit()] if os.path.isdir(folder) else []
    newest = f'step {max(steps)}' if steps else 'none'
    raise ConfigError(f'config.method.reference_workdir={workdir!r}: that run has not finished '
                      f'(newest checkpoint: {newest} of its train.steps='
                      f'{record.get("train", {}).get("steps", "?")}); finish it first by '
                      'rerunning its command: the finished model\'s losses set the thresholds.')
  saved = {k: v for k, v in config_lib._computing_fields(record).items()
           if k in REFERENCE_MUST_MATCH}
  # The same comparison as a finished run's (a field the record lacks is not held against it).
  diffs = config_lib._mismatch(saved, config_lib.computing_fields(config), 'reference')
  if diffs:
    raise ConfigError(f'config.method.reference_workdir={config.method.reference_workdir!r}: '
                      f'that run has another network or forward process ({"; ".join(diffs[:3])}'
                      f'{" ..." if len(diffs) > 3 else ""}); its losses set the thresholds '
                      'through this run\'s model, so use a reference trained with the same '
                      'model, data and diffusion settings.')


def num_constraints(config) -> int:
  mc = config.method
  return len(mc.constraint_classes) if mc.constraint_source == 'classes' else len(mc.constraint_names)


def constraint_names(config) -> tuple[str, ...]:
  """The constraints' names, as the batch groups, logs and figures give them: class_C for
  ``constraint_source='classes'``, else ``method.constraint_names``."""
  mc = config.method
  if mc.constraint_source == 'classes':
    return tuple(f'class_{c}' for c in mc.constraint_classes)
  return tuple(mc.constraint_names)


def build(config, base, lr_fn: Callable | None = None) -> Constrained:
  """``base``: the method whose per-example loss the Lagrangian uses (DSM, or TIW-DSM when
  ``config.method.objective='tiw'``; see ``tiw_objective``)."""
  mc = config.method
  m = num_constraints(config)
  names = constraint_names(config)
  dual_lr_fn = None
  if mc.dual_lr_schedule == 'primal' and lr_fn is not None:
    peak = float(config.optim.lr)
    dual_lr_fn = lambda step: lr_fn(step) / peak
  thresholds = _per_constraint(mc.thresholds, m, 'thresholds') if mc.threshold_mode == 'absolute' \
      else (0.0,) * m
  if mc.threshold_mode == 'absolute':
    loosen = 'raise method.thresholds'
  else:  # b = threshold_scale * L_ref + threshold_offset (- log(target / share))
    loosen = 'raise method.threshold_offset or method.threshold_scale'
    if mc.target_frequency > 0:
      loosen = 'lower method.target_frequency, ' + loosen
  return Constrained(
      base=base, num_constraints=m, thresholds=thresholds, constraint_names=names,
      constraint_classes=(tuple(int(c) for c in mc.constraint_classes)
                          if mc.constraint_source == 'classes' else ()),
      constraint_source=mc.constraint_source, objective_batch=mc.objective_batch,
      constraint_batch=mc.constraint_batch, dual_lr=mc.dual_lr, dual_every=mc.dual_every,
      dual_start=mc.dual_start, constraint_t_min=mc.constraint_t_min,
      dual_estimate=mc.dual_estimate, dual_ema=mc.dual_ema, dual_lr_fn=dual_lr_fn,
      init_lambda=mc.init_lambda, resilient_alpha=mc.resilient_alpha, normalize=mc.normalize,
      enabled=mc.enabled, loosen_hint=loosen,
      num_objective_groups=(2 if hasattr(base, 'per_example_terms') and base.variant != 'dsm_ref'
                            else 1))


def _tiw_config(config):
  """The config TIW-DSM sees as the primal objective: ``method`` is ``config.method.tiw`` and
  the batch is the objective's share of the constrained batch."""
  sub = config.copy_and_resolve_references()
  sub.method = config.method.tiw
  sub.train.batch_size = config.method.objective_batch
  return sub


def tiw_objective(config, model, num_classes: int, common: dict):
  """The TIW-DSM method of ``config.method.tiw`` with the objective's batch size: the primal
  objective of constrained training when ``config.method.objective='tiw'``."""
  from cdiff_jax.methods import tiw
  return tiw.build(_tiw_config(config), model, num_classes, common, section='method.tiw')


# The fields that act only through the multipliers and their thresholds: with
# enabled=False (lambda fixed at 0) a run trains the same model whatever they hold (only the
# constraint gaps it logs change), so a finished unconstrained arm answers any of them.
DUAL_FIELDS = ('threshold_mode', 'thresholds', 'reference_workdir', 'threshold_reference',
               'threshold_scale', 'threshold_offset', 'target_frequency', 'frequency_source',
               'reference_batches', 'reference_params', 'dual_lr', 'dual_lr_schedule',
               'dual_every', 'dual_start', 'dual_estimate', 'dual_ema', 'init_lambda',
               'resilient_alpha', 'normalize')


def default_method_config():
  """The ``config.method`` fields of constrained training, with their defaults."""
  import ml_collections
  from cdiff_jax.methods import tiw
  return ml_collections.ConfigDict(dict(
      name='constrained',
      enabled=True,                  # False: same batches and logs, lam fixed at 0
      objective='dsm',               # dsm | tiw: TIW-DSM on method.tiw's biased/reference split
      tiw=tiw.default_config(),      # objective='tiw': TIW-DSM's fields (variant, alpha, ...)
      constraint_source='classes',   # classes: one constraint per class | source: dataset tag
      constraint_classes=(),
      constraint_names=(),           # constraint_source='source'
      objective_batch=128,           # with constraint_batch per constraint: the batch
      constraint_batch=64,           # (train.batch_size is not read by this method)
      threshold_mode='absolute',     # absolute | reference
      thresholds=(0.05,),            # absolute: b_i (one value or one per constraint)
      reference_workdir='',          # reference: b_i = scale * L_ref + offset, where L_ref is
      threshold_reference='constraint',  # constraint: the reference model's L_i | objective: its L_0
      threshold_scale=1.0,
      threshold_offset=0.0,
      target_frequency=0.0,          # > 0 (ELBO losses, classes): b_c -= log(target / pi_c)
      frequency_source='training',   # pi_c: training frequency | generated: reference eval.json
      constraint_t_min=0.0,          # > 0: constraint losses cover t in [this, 1] only
      reference_batches=50,
      reference_params='params',     # the reference's params (as the dual sees) | ema_params
      dual_lr=1.0,
      dual_lr_schedule='constant',   # constant | primal (scaled like the primal LR)
      dual_every=1,                  # applied (finite) primal steps per dual step
      dual_start=0,                  # applied (finite) primal steps before the first dual step
      dual_estimate='window',        # minibatch | window | ema
      dual_ema=0.9,
      init_lambda=0.0,
      resilient_alpha=0.0,           # > 0: resilient relaxation with slack cost alpha/2 u^2
      normalize=True,                # divide the Lagrangian by 1 + sum lam
  ))
