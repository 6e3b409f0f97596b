"""Constrained dual training against closed-form answers on a 1-D Gaussian mixture.

The mixture has 4 well-separated modes with weights pi = (.3, .3, .3, .1); the constraint set
q_1 is the minority mode. For fixed lam the Lagrangian's minimizer is the mixture
(q_0 + lam q_1) / (1 + lam), so mode masses are (pi + lam e_3) / (1 + lam). With the ELBO
weighting, losses are KLs up to constants, so a threshold equal to the minority loss of the
fixed-lam* model makes lam* the dual optimum: dual training from lam = 0 must find it.
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdiff_jax import config as config_lib
from cdiff_jax import parallel, train
from cdiff_jax.data.sources import ArrayDataset
from cdiff_jax.methods import constrained

CENTERS = np.array([-6.0, -2.0, 2.0, 6.0], np.float32)
PI = np.array([0.3, 0.3, 0.3, 0.1])
LAM_STAR = 0.2
MASS_TOL = 0.04   # sampling noise at 8,000 samples is ~0.005; model error dominates
LAM_TOL = 0.15 * LAM_STAR


def mixture_dataset(n=20_000, seed=0) -> ArrayDataset:
  rng = np.random.default_rng(seed)
  labels = rng.choice(4, n, p=PI)
  x = CENTERS[labels] + 0.4 * rng.standard_normal(n).astype(np.float32)
  return ArrayDataset(x[:, None].astype(np.float32), labels, 4, 'toy')


def toy_config(steps=3000, **method):
  c = config_lib.base_config()
  c.data.name = 'toy'
  c.model.name = 'mlp'
  c.model.hidden, c.model.depth = 128, 3
  c.diffusion.schedule = 'vp'
  c.diffusion.loss_weighting = 'elbo'
  c.optim.name, c.optim.lr, c.optim.warmup_steps = 'adam', 2e-3, 100
  c.optim.lr_schedule, c.optim.final_lr_fraction = 'cosine', 0.0
  c.train.steps, c.train.steps_per_call = steps, 50
  c.train.log_every = c.train.checkpoint_every = 0 or 50
  c.train.ema_decay = 0.995
  c.train.compilation_cache = False
  c.method = constrained.default_method_config()
  c.method.constraint_classes = (3,)
  c.method.objective_batch = c.method.constraint_batch = 512
  c.method.update(method)
  return c


def mode_masses(exp, state, n=8000, seed=0) -> np.ndarray:
  sampler = exp.sampler(sampler='ancestral', num_steps=500, clip=None)
  x = np.asarray(sampler(state.ema_params, jax.random.key(seed), n))[:, 0]
  nearest = np.abs(x[:, None] - CENTERS[None]).argmin(1)
  return np.bincount(nearest, minlength=4) / n


@pytest.fixture(scope='module')
def dataset():
  return mixture_dataset()


@pytest.fixture(scope='module')
def fixed_lambda_run(dataset):
  cfg = toy_config(init_lambda=LAM_STAR, dual_lr=0.0)
  exp = train.build(cfg, dataset)
  state, _ = train.fit(exp, exp.init_state())
  return exp, state


def test_fixed_lambda_gives_mixture_masses(fixed_lambda_run):
  exp, state = fixed_lambda_run
  assert float(state.extras['lam'][0]) == pytest.approx(LAM_STAR)
  expected = (PI + LAM_STAR * np.eye(4)[3]) / (1 + LAM_STAR)
  masses = mode_masses(exp, state)
  np.testing.assert_allclose(masses, expected, atol=MASS_TOL)


def test_dual_training_recovers_lambda_star(fixed_lambda_run, dataset):
  exp_fixed, state_fixed = fixed_lambda_run
  # b := the minority loss of the lam* model, measured on many batches.
  ref = constrained.reference_losses(exp_fixed.method, state_fixed.ema_params, exp_fixed.batcher,
                                     exp_fixed.mesh, 200, seed=0)
  # Dual steps start after the primal warm-up (an untrained model violates every threshold
  # by tens of nats) and shrink with the primal learning rate, so lam settles.
  cfg = toy_config(init_lambda=0.0, dual_lr=0.05, thresholds=(float(ref[1]),),
                   dual_lr_schedule='primal', dual_start=500)
  exp = train.build(cfg, dataset)
  state, history = train.fit(exp, exp.init_state())
  lam_trace = np.concatenate([np.asarray(h['lam'])[:, 0] for h in history])
  lam_end = lam_trace[-500:].mean()
  assert abs(lam_end - LAM_STAR) < LAM_TOL, lam_end
  assert lam_trace.min() >= 0.0
  masses = mode_masses(exp, state, seed=1)
  np.testing.assert_allclose(masses, (PI + LAM_STAR * np.eye(4)[3]) / (1 + LAM_STAR), atol=MASS_TOL)


def test_unconstrained_arm_keeps_minority_at_pi(dataset):
  exp = train.build(toy_config(enabled=False), dataset)
  state, history = train.fit(exp, exp.init_state())
  assert np.all(np.concatenate([np.asarray(h['lam']) for h in history]) == 0.0)
  masses = mode_masses(exp, state, seed=2)
  np.testing.assert_allclose(masses, PI, atol=MASS_TOL)


# ------------------------------------------------------------------ the dual update itself


def _method(**kw):
  base = dict(base=None, num_constraints=2, thresholds=(1.0, 1.0), constraint_names=('a', 'b'),
              dual_lr=0.5, dual_every=1, dual_estimate='minibatch')
  base.update(kw)
  return constrained.Constrained(**base)


def test_constrained_built_in_python_checks_its_fields():
  """Built directly (not from a config), a wrong field is named at construction, not met
  later as a reshape error or a KeyError while tracing; one threshold serves every
  constraint."""
  assert _method(thresholds=(0.3,)).thresholds == (0.3, 0.3)
  np.testing.assert_allclose(_method(thresholds=(0.3,)).init_extras(None, None)['thresholds'],
                             [0.3, 0.3])
  for kw, match in (
      (dict(thresholds=(0.3, 0.2, 0.1)), r'thresholds=.*one per constraint \(2\)'),
      (dict(dual_estimate='mean'), r"dual_estimate='mean'.*'minibatch', 'window', 'ema'"),
      (dict(constraint_names=('a',)), r'constraint_names=.*one per constraint'),
      (dict(num_constraints=0, thresholds=()), r'num_constraints=0'),
      (dict(dual_every=0), r'dual_every=0'),
      (dict(constraint_t_min=1.0), r'constraint_t_min=1.0'),
      # Accepted before: the Lagrangian's 1 + sum(lam) reached 0; a NaN bound.
      (dict(init_lambda=-1.0), r'init_lambda=-1.0\): give 0 or more'),
      (dict(thresholds=(float('nan'),)), r'thresholds=.*give finite numbers')):
    with pytest.raises(ValueError, match=match):
      _method(**kw)
  # One loss per constraint: (2, 1) broadcast lam to (2, 2), (3,) failed in JAX.
  m = _method()
  extras = m.init_extras(None, None)
  for shape in ((2, 1), (3,)):
    with pytest.raises(ValueError, match=rf"constraint_loss'\] has shape \({shape[0]}, ?"
                                         rf"{shape[1] if len(shape) > 1 else ''}\); the dual "
                                         r'step takes one loss per constraint, shape \(2,\)'):
      m.update_extras(extras, {'constraint_loss': jnp.ones(shape)}, 0, None)
  # Without names, each constraint gets one (the groups, logs and warnings use them); without
  # classes, constraint_source='classes' has no examples to draw: named, not zero losses.
  ds = ArrayDataset(np.zeros((6, 2), np.float32), np.array([0, 0, 1, 1, 2, 2]), 3,
                    attributes={'source': np.array([0, 0, 1, 1, 2, 2])})
  assert _method(constraint_names=()).constraint_names == ('constraint_1', 'constraint_2')
  groups = _method(constraint_names=(), constraint_source='source').data_groups(ds, np.arange(6))
  assert [(name, list(idx)) for name, idx, _ in groups] == [
      ('objective', [0, 1]), ('constraint_1', [2, 3]), ('constraint_2', [4, 5])]
  assert [name for name, _, _ in _method(constraint_classes=(1, 2)).data_groups(
      ds, np.arange(6))] == ['objective', 'a', 'b']
  with pytest.raises(ValueError, match=r"constraint_classes=\(\)\): constraint_source='classes' "
                                       r'needs one class per constraint \(2\)'):
    _method().data_groups(ds, np.arange(6))

  class Terms:  # a composed objective (TIW-DSM's) keeps its own data groups
    per_example_terms = None
  with pytest.raises(ValueError, match=r"constraint_source='source'.*use 'classes'"):
    _method(base=Terms(), constraint_source='source')


@pytest.mark.parametrize('config_name,overrides,needle', [
    # 0 batches divided by zero in train.build; a frequency outside [0, 1] was taken (a
    # negative one as off, 1.5 as an impossible target).
    ('digits_minority', dict(reference_batches=0), 'config.method.reference_batches=0: must be'),
    ('digits_minority', dict(target_frequency=-0.1),
     'config.method.target_frequency=-0.1: must lie in (0, 1]'),
    ('digits_minority', dict(target_frequency=1.5),
     'config.method.target_frequency=1.5: must lie in (0, 1]'),
    # Sets of a 'source' attribute without names: Constrained(num_constraints=0) traceback.
    ('digits_finetune', dict(constraint_names=()),
     "config.method.constraint_names=(): constraint_source='source' needs one name"),
])
def test_constrained_config_out_of_range_is_named(config_name, overrides, needle):
  import importlib
  c = importlib.import_module(f'configs.{config_name}').get_config()
  c.method.reference_workdir = '/a/reference/run'   # (its own arm: set by the experiment)
  c.method.update(overrides)
  with pytest.raises(config_lib.ConfigError, match=re.escape(needle)):
    train.validate(c, check_paths=False)


def _run_dual(method, losses_per_step):
  """The dual side over steps with these constraint losses; a None entry is a skipped
  non-finite step, which keeps the extras (train_step) while the step number moves on.
  Returns the last extras and, for each applied step, lam after it and its logged gap."""
  extras = method.init_extras(None, None)
  lams, gaps = [], []
  for step, l in enumerate(losses_per_step):
    if l is None:
      continue
    extras, m = method.update_extras(extras, dict(constraint_loss=jnp.asarray(l, jnp.float32)),
                                     jnp.asarray(step), None)
    lams.append(np.asarray(extras['lam']))
    gaps.append(np.asarray(m['constraint_gap']))
  return extras, np.stack(lams), np.stack(gaps)


def test_projection_and_sign():
  # Violated constraint (L > b) raises lam; satisfied one is projected at 0, never negative.
  _, lams, _ = _run_dual(_method(init_lambda=0.3), [[1.5, 0.2]] * 4)
  np.testing.assert_allclose(lams[:, 0], 0.3 + 0.25 * np.arange(1, 5), rtol=1e-6)
  np.testing.assert_array_equal(lams[:, 1], 0.0)


def test_infeasible_threshold_grows_and_resilient_stays_bounded():
  method = _method(thresholds=(0.0, 0.0))
  _, lams, _ = _run_dual(method, [[0.5, 0.5]] * 200)
  assert lams[-1, 0] == pytest.approx(0.5 * 0.5 * 200, rel=1e-5)  # grows without bound
  resilient = _method(thresholds=(0.0, 0.0), resilient_alpha=2.0)
  extras, lams_r, _ = _run_dual(resilient, [[0.5, 0.5]] * 200)
  # Fixed point lam = alpha (L - b)_+ = 1.0, approached and never exceeded.
  assert lams_r[-1, 0] == pytest.approx(1.0, abs=1e-3) and lams_r.max() <= 1.0 + 1e-6
  # The proximal step lam <- (lam + eta gap) / (1 + eta / alpha), at a step size where the
  # explicit lam + eta (gap - lam / alpha) oscillates between 0 and eta gap (eta >= 2 alpha).
  for alpha in (0.4, 0.25):
    _, lams_r, _ = _run_dual(_method(thresholds=(0.0, 0.0), resilient_alpha=alpha, dual_lr=1.0),
                             [[0.5, 0.5]] * 30)
    np.testing.assert_allclose(lams_r[0, 0], 0.5 / (1 + 1 / alpha), rtol=1e-6)
    np.testing.assert_allclose(lams_r[-5:, 0], alpha * 0.5, rtol=1e-4)


def test_warning_when_lambda_keeps_growing():
  method = _method(thresholds=(0.0, 0.0))
  warnings = []
  for step in range(8):
    warnings = method.host_metrics(dict(lam=np.array([0.1 * step, 0.0]),
                                        constraint_gap=np.array([0.5, -0.1])), step)
  assert len(warnings) == 1 and 'constraint a: lambda 0.2 -> 0.7' in warnings[0]
  assert 'infeasible' in warnings[0] and ' b:' not in warnings[0]
  # The fix it names is the one of the config's threshold mode: in 'reference' mode (every
  # shipped constrained config) method.thresholds is not read, and a frequency target sets b.
  config = toy_config()
  for mode, target, fix in (('absolute', 0.0, 'raise method.thresholds,'),
                            ('reference', 0.0, 'raise method.threshold_offset or '
                                               'method.threshold_scale,'),
                            ('reference', 0.1, 'lower method.target_frequency, raise '
                                               'method.threshold_offset')):
    config.method.threshold_mode, config.method.target_frequency = mode, target
    method = constrained.build(config, base=None)
    for step in range(8):
      warnings = method.host_metrics(dict(lam=np.full(method.num_constraints, 0.1 * step),
                                          constraint_gap=np.full(method.num_constraints, 0.5)),
                                     step)
    assert fix in warnings[0] and 'resilient_alpha > 0' in warnings[0], (mode, warnings[0])
  # Both growing: still one line, naming both.
  method = _method(thresholds=(0.0, 0.0))
  for step in range(8):
    warnings = method.host_metrics(dict(lam=np.array([0.1 * step, 0.2 * step]),
                                        constraint_gap=np.array([0.5, 0.3])), step)
  assert len(warnings) == 1 and warnings[0].startswith('constraints a: lambda 0.2 -> 0.7')
  assert 'b: lambda 0.4 -> 1.4, L - b now 0.3' in warnings[0]
  # The resilient relaxation's multipliers rise to their bounded fixed point by design.
  method = _method(thresholds=(0.0, 0.0), resilient_alpha=2.0)
  for step in range(8):
    assert method.host_metrics(dict(lam=np.array([0.1 * step, 0.2 * step]),
                                    constraint_gap=np.array([0.5, 0.3])), step) == []


def test_dual_every_n_primal_steps_and_window_estimate():
  method = _method(dual_every=3, dual_estimate='window', thresholds=(0.0, 0.0), dual_lr=1.0)
  extras, lams, gaps = _run_dual(method, [[1.0, 2.0], [2.0, 2.0], [3.0, 2.0]] * 3)
  assert int(extras['num_dual_steps']) == 3
  # lam changes only at steps 2, 5, 8, by the mean loss of the window (2.0).
  np.testing.assert_allclose(lams[:, 0], [0, 0, 2, 2, 2, 4, 4, 4, 6])
  # The logged gap is the window's mean so far (not its partial sum over the window size,
  # which read 1/3, 1, 2 here and hid a violated constraint from the infeasibility warning).
  np.testing.assert_allclose(gaps, [[1, 2], [1.5, 2], [2, 2]] * 3, rtol=1e-6)


def test_windows_count_applied_steps_around_a_skipped_step():
  """A skipped non-finite step keeps the old extras (train_step), so it must neither end a
  window nor count in its mean: with dual_every=2 the windows are pairs of applied steps.
  Counted by step, skipping step 1 (the end of the first window) carried step 0's loss into
  the next window, whose mean at step 2 read twice the loss over a window of one; here every
  gap is the constant loss and lam moves after the applied steps 2 and 4 only."""
  method = _method(dual_every=2, dual_estimate='window', thresholds=(0.0, 0.0), dual_lr=1.0)
  extras, lams, gaps = _run_dual(method, [[2.0, 1.0], None, [2.0, 1.0], [2.0, 1.0], [2.0, 1.0]])
  np.testing.assert_allclose(gaps, [[2.0, 1.0]] * 4, rtol=1e-6)
  np.testing.assert_allclose(lams, [[0, 0], [2, 1], [2, 1], [4, 2]], rtol=1e-6)
  assert int(extras['num_dual_steps']) == 2 and int(extras['ema_count']) == 4


def test_dual_start_counts_applied_steps():
  """dual_start=2, dual_every=1, step 1 skipped: the first dual step is the third applied
  step (step 3), as the primal schedule, which counts applied steps, would place it. Counted
  by step it came one applied step early, at step 2."""
  method = _method(dual_start=2, thresholds=(0.0, 0.0), dual_lr=1.0)
  extras, lams, _ = _run_dual(method, [[2.0, 1.0], None, [2.0, 1.0], [2.0, 1.0]])
  np.testing.assert_allclose(lams, [[0, 0], [0, 0], [2, 1]], rtol=1e-6)
  assert int(extras['num_dual_steps']) == 1


def test_lagrangian_weights_and_normalization():
  """L_0 + sum lam_i L_i, divided by 1 + sum lam only when normalize (two constraints)."""
  L = jnp.array([2.0, 3.0, 5.0])
  lam = jnp.array([0.5, 0.25])
  total = 2.0 + 0.5 * 3.0 + 0.25 * 5.0
  assert float(_method().lagrangian(L, lam)) == pytest.approx(total / 1.75, rel=1e-6)
  assert float(_method(normalize=False).lagrangian(L, lam)) == pytest.approx(total, rel=1e-6)


def test_ema_estimate_is_the_bias_corrected_running_mean():
  """dual_estimate='ema': Adam-style m_k = d m_{k-1} + (1 - d) L_k, estimate m_k / (1 - d^k)."""
  # A constant loss is estimated exactly from the first step on (no pull towards 0).
  _, lams, _ = _run_dual(_method(dual_estimate='ema', dual_ema=0.9, thresholds=(0.0, 0.0),
                              dual_lr=1.0), [[2.0, 0.5]] * 4)
  np.testing.assert_allclose(lams, np.arange(1, 5)[:, None] * [2.0, 0.5], rtol=1e-5)
  # A changing loss: each dual step moves lam by the estimate (thresholds 0, eta 1).
  losses = np.array([[1.0, 4.0], [3.0, 0.0], [7.0, 2.0], [2.0, 2.0]])
  d, m, expected = 0.75, np.zeros(2), []
  for k, l in enumerate(losses, start=1):
    m = d * m + (1 - d) * l
    expected.append(m / (1 - d ** k))
  _, lams, _ = _run_dual(_method(dual_estimate='ema', dual_ema=d, thresholds=(0.0, 0.0),
                              dual_lr=1.0), losses)
  np.testing.assert_allclose(lams, np.cumsum(expected, 0), rtol=1e-5)


def test_dual_start_and_minibatch_estimate_with_dual_every():
  """With dual_every=2 and dual_start=3 lam moves at steps 3 and 5 only (step 1 ends a window
  before the start; step 3 is the first allowed), by the last minibatch's loss, not the
  window's mean; num_dual_steps counts those steps only."""
  method = _method(dual_every=2, dual_start=3, dual_lr=1.0, thresholds=(0.0, 0.0))
  extras, lams, _ = _run_dual(method, [[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0],
                                    [5.0, 0.0], [6.0, 0.0]])
  np.testing.assert_allclose(lams[:, 0], [0, 0, 0, 4, 4, 10])
  assert int(extras['num_dual_steps']) == 2
  # The window estimate: the windows that end before the start are emptied all the same,
  # so the first dual step (step 3) moves lam by the mean of steps 2-3 (3.5), not of 0-3.
  extras, lams, _ = _run_dual(
      _method(dual_every=2, dual_start=3, dual_lr=1.0, thresholds=(0.0, 0.0),
              dual_estimate='window'),
      [[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0], [5.0, 0.0], [6.0, 0.0]])
  np.testing.assert_allclose(lams[:, 0], [0, 0, 0, 3.5, 3.5, 9])
  # dual_every=1: the first dual step is step dual_start itself.
  _, lams, _ = _run_dual(_method(dual_start=2, dual_lr=1.0, thresholds=(0.0, 0.0)),
                         [[1.0, 0.0]] * 4)
  np.testing.assert_allclose(lams[:, 0], [0, 0, 1, 2])


def test_disabled_arm_keeps_lambda_at_zero():
  """enabled=False: lam starts at 0 whatever init_lambda says and never moves."""
  extras, lams, _ = _run_dual(_method(enabled=False, init_lambda=0.3), [[1.5, 2.0]] * 3)
  np.testing.assert_array_equal(lams, 0.0)
  assert int(extras['num_dual_steps']) == 0


class _TimeWindowBase:
  """A per-example loss equal to the example's t_lo plus its image: shows which examples
  group_losses restricts to t >= constraint_t_min, and how it averages them."""

  def per_example_loss(self, params, batch, rng, t_lo=None):
    x = batch['image'][:, 0]
    return x + (0.0 if t_lo is None else t_lo), {}


def test_group_losses_are_group_means_with_the_constraint_time_window():
  """L[0] the objective group's mean, L[i] constraint i's; with constraint_t_min every
  constraint example (not the objective's, unless window_objective) starts at t_min."""
  x = jnp.array([[1.0], [3.0], [10.0], [20.0], [30.0], [100.0]])
  batch = dict(image=x, group=jnp.array([0, 0, 1, 1, 2, 2]))
  method = _method(base=_TimeWindowBase(), constraint_t_min=0.25)
  L, _ = method.group_losses(None, batch, None)
  np.testing.assert_allclose(L, [2.0, 15.25, 65.25], rtol=1e-6)
  L, _ = method.group_losses(None, batch, None, window_objective=True)
  np.testing.assert_allclose(L, [2.25, 15.25, 65.25], rtol=1e-6)
  L, _ = _method(base=_TimeWindowBase()).group_losses(None, batch, None)
  np.testing.assert_allclose(L, [2.0, 15.0, 65.0], rtol=1e-6)


def test_constraint_groups_come_from_the_selected_training_data():
  """constraint_source='classes': constraint c draws only the training examples of class c
  (the kept minority, never the subsampled-away ones); 'source': group i is the training
  examples of source i (the data selection applies to every source)."""
  labels = np.array([0, 1, 2, 1, 2, 0, 1, 2, 2, 1])
  ds = ArrayDataset(np.zeros((10, 1), np.float32), labels, 3, 'toy',
                    dict(source=np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])))
  train_idx = np.array([0, 1, 2, 5, 6, 9])
  method = _method(constraint_classes=(1, 2), objective_batch=4, constraint_batch=2)
  groups = method.data_groups(ds, train_idx)
  assert [g[0] for g in groups] == ['objective', 'a', 'b'] and [g[2] for g in groups] == [4, 2, 2]
  for (_, idx, _), expected in zip(groups, [train_idx, [1, 6, 9], [2]]):
    np.testing.assert_array_equal(np.sort(idx), expected)
  by_source = _method(constraint_source='source').data_groups(ds, np.arange(10))
  for (_, idx, _), s in zip(by_source, range(3)):
    np.testing.assert_array_equal(idx, np.flatnonzero(ds.attributes['source'] == s))
  by_source = _method(constraint_source='source').data_groups(ds, train_idx)
  for (_, idx, _), expected in zip(by_source, [[0, 6, 9], [1], [2, 5]]):
    np.testing.assert_array_equal(idx, expected)


def test_objective_reference_is_measured_over_the_constraint_window(tiny_config, monkeypatch,
                                                                     tmp_path):
  """threshold_reference='objective' with constraint_t_min > 0: L_0 over the constraints'
  times, else b = L_0 over all t sits nats away from every L_c (which never bind)."""
  tiny_config.method = constrained.default_method_config()
  tiny_config.method.constraint_classes = (4, 5)
  tiny_config.method.objective_batch, tiny_config.method.constraint_batch = 16, 8
  tiny_config.method.thresholds = (1.0, 1.0)
  tiny_config.method.constraint_t_min = 0.6
  tiny_config.diffusion.loss_weighting = 'elbo'
  exp = train.build(tiny_config)
  method, params = exp.method, exp.init_state().params
  batch = parallel.put_batch(exp.batcher.batch(0), exp.mesh)
  rng = jax.random.key(3)
  plain = np.asarray(method.group_losses(params, batch, rng)[0])
  windowed = np.asarray(method.group_losses(params, batch, rng, window_objective=True)[0])
  np.testing.assert_allclose(windowed[1:], plain[1:], rtol=1e-6)   # constraints unchanged
  per_example, _ = method.base.per_example_loss(
      params, batch, rng, t_lo=jnp.full(batch['group'].shape, 0.6))
  in_objective = np.asarray(batch['group']) == 0
  np.testing.assert_allclose(windowed[0], np.asarray(per_example)[in_objective].mean(), rtol=1e-5)
  assert abs(windowed[0] - plain[0]) > 0.05 * abs(plain[0])
  # prepare() asks for the windowed objective exactly when the thresholds come from it.
  asked = []
  monkeypatch.setattr(constrained, 'reference_losses',
                      lambda *a, **k: asked.append(k['window_objective']) or np.ones(3))
  from cdiff_jax import checkpoint
  monkeypatch.setattr(checkpoint, 'load_params', lambda workdir, which='ema_params': None)
  (tmp_path / 'checkpoints').mkdir()
  tiny_config.method.threshold_mode = 'reference'
  tiny_config.method.reference_workdir = str(tmp_path)
  for reference in ('objective', 'constraint'):
    tiny_config.method.threshold_reference = reference
    train.build(tiny_config)
  assert asked == [True, False]


def test_constrained_step_on_digits_one_program_and_two_devices(tiny_config):
  tiny_config.method = constrained.default_method_config()
  tiny_config.method.constraint_classes = (4, 5, 7)
  tiny_config.method.objective_batch, tiny_config.method.constraint_batch = 16, 8
  tiny_config.method.dual_every = 2
  tiny_config.data.minority_classes, tiny_config.data.minority_fraction = (4, 5, 7), 0.1
  tiny_config.train.num_devices = 2
  exp2 = train.build(tiny_config)
  s2, hist = train.fit(exp2, exp2.init_state(), until=6)
  assert exp2.step.num_traces == 1
  assert int(s2.extras['num_dual_steps']) == 3
  assert hist[0]['constraint_loss'].shape == (3,)
  # Minority groups are drawn from the kept minority examples only.
  groups = exp2.batcher.group_names
  assert groups == ['objective', 'class_4', 'class_5', 'class_7']
  idx, gid = exp2.batcher.indices(0)
  assert set(exp2.dataset.labels[idx[gid == 1]]) == {4}
  tiny_config.train.num_devices = 1
  exp1 = train.build(tiny_config)
  s1, _ = train.fit(exp1, exp1.init_state(), until=6)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5)  # reduction order
  np.testing.assert_allclose(np.asarray(s1.extras['lam']), np.asarray(s2.extras['lam']), atol=5e-5)


def test_dual_lr_follows_the_applied_primal_lr_after_a_skipped_step(tiny_config):
  """dual_lr_schedule='primal' scales the dual step by the primal lr the optimizer applies:
  after a skipped non-finite step 0 the schedule has not moved, so step 1's dual step uses
  lr_fn(0) (the lr logged at step 1), not lr_fn(1)."""
  c = tiny_config
  c.method = constrained.default_method_config()
  c.method.constraint_classes = (4, 5, 7)
  c.method.objective_batch, c.method.constraint_batch = 16, 8
  c.method.dual_estimate, c.method.dual_lr, c.method.dual_lr_schedule = 'minibatch', 2.0, 'primal'
  c.method.thresholds = (0.0,)
  c.data.minority_classes, c.data.minority_fraction = (4, 5, 7), 0.1
  c.optim.lr_schedule, c.optim.warmup_steps, c.train.steps = 'cosine', 0, 4
  c.train.debug_nan_step, c.train.on_nonfinite = 0, 'skip'
  exp = train.build(c)
  state, hist = train.fit(exp, exp.init_state(), until=2)
  assert [int(h['nonfinite']) for h in hist] == [1, 0]
  lr0, lr1 = exp.lr_fn(0), exp.lr_fn(1)
  assert float(hist[1]['lr']) == pytest.approx(float(lr0)) and float(lr1) < 0.9 * float(lr0)
  gap = np.asarray(hist[1]['constraint_loss'])       # threshold 0, lambda 0 before step 1
  expected = np.maximum(0.0, 2.0 * float(lr0) / c.optim.lr * gap)
  np.testing.assert_allclose(np.asarray(state.extras['lam']), expected, rtol=1e-5)


@pytest.mark.parametrize('field,value,needle', [
    ('constraint_classes', (), 'constraint_classes'),
    ('dual_lr', -1.0, 'dual_lr'),
    ('dual_estimate', 'avg', 'dual_estimate'),
    ('threshold_mode', 'reference', 'reference_workdir'),
    ('thresholds', (0.1, 0.2), 'thresholds'),
    ('model.conditional', True, 'class constraints act on the classes'),
])
def test_bad_method_config_messages(tiny_config, field, value, needle):
  tiny_config.method = constrained.default_method_config()
  tiny_config.method.constraint_classes = (4, 5, 7)
  section, _, name = field.rpartition('.')
  (tiny_config[section] if section else tiny_config.method)[name] = value
  with pytest.raises(config_lib.ConfigError, match=needle):
    train.build(tiny_config)


def test_reference_run_with_another_network_or_process_is_refused(tmp_path):
  """The thresholds evaluate the reference's parameters with this run's network and forward
  process: a reference run that had others is refused by name before any training (another
  data split, as with minorities subsampled, is fine), and so is one that has not finished."""
  from configs import digits_minority
  ref = tmp_path / 'reference'
  ref.mkdir()
  saved = digits_minority.get_config()
  saved.method.enabled, saved.data.minority_fraction = False, 1.0
  (ref / 'config.json').write_text(saved.to_json_best_effort())
  c = digits_minority.get_config()
  c.method.reference_workdir = str(ref)
  # A reference the caller trains (or resumes) first, as the minority experiment does with
  # its unconstrained arm (check_paths=False), may be one stopped before its first
  # checkpoint (this raised FileNotFoundError) or after it (refused as unfinished): the
  # experiment's rerun after a stop in that arm failed.
  constrained.validate(c, check_paths=False)
  with pytest.raises(config_lib.ConfigError, match='holds no checkpoints/'):
    constrained.validate(c)
  (ref / 'checkpoints').mkdir()
  constrained.validate(c, check_paths=False)
  with pytest.raises(config_lib.ConfigError, match='that run has not finished'):
    constrained.validate(c)                     # no summary.json: still training, or stopped
  (ref / 'summary.json').write_text('{}')
  constrained.validate(c)                       # same network and process: accepted
  for field, value, needle in [('model', ('ch', 16), 'model.ch: reference 32 vs now 16'),
                               ('model', ('ch_mult', (1, 2, 2)),
                                'model.ch_mult: reference [1, 2] vs now [1, 2, 2]'),
                               ('diffusion', ('schedule', 'cosine'),
                                "diffusion.schedule: reference 'ddpm' vs now 'cosine'")]:
    other = digits_minority.get_config()
    other.method.reference_workdir = str(ref)
    other[field][value[0]] = value[1]
    with pytest.raises(config_lib.ConfigError, match=re.escape(needle)):
      constrained.validate(other)


def _record_figures(monkeypatch) -> dict:
  """{file name: {'legend': entries, 'scale': y scale of each panel, 'title': titles}} of
  every figure written from now on (writers.save_figure recorded)."""
  from cdiff_jax import writers
  figures = {}
  save = writers.save_figure

  def recording_save(fig, path):
    figures[os.path.basename(path)] = dict(
        legend=[t for ax in fig.axes for t in ax.get_legend_handles_labels()[1]],
        scale=[ax.get_yscale() for ax in fig.axes], title=[ax.get_title() for ax in fig.axes])
    return save(fig, path)
  monkeypatch.setattr(writers, 'save_figure', recording_save)
  return figures


def test_an_unconstrained_arm_plots_its_constraint_losses_not_gaps_to_zero(tmp_path,
                                                                           monkeypatch):
  """With method.enabled=False the logged thresholds are 0 and lambda stays 0: its
  constraints.png shows the losses themselves (titled so), not 'L_i - 0' as gaps that
  'violate' by the whole loss, and no lambda.png of flat zeros; its class-frequency title
  and log line name it the disabled arm."""
  from cdiff_jax import config as config_lib
  records = [dict(step=s, loss=9.0 / s, objective_loss=9.0 / s, lam=[0.0, 0.0],
                  constraint_loss=[8.0 / s, 7.0 / s], constraint_gap=[8.0 / s, 7.0 / s],
                  threshold=[0.0, 0.0]) for s in (1, 2, 3)]
  c = config_lib.base_config()
  c.method = constrained.default_method_config()
  c.method.enabled = False
  figures = _record_figures(monkeypatch)
  train.plot_run_curves(str(tmp_path), records, c, ['class_4', 'class_5'])
  assert sorted(figures) == ['constraints.png', 'loss.png']
  assert figures['constraints.png']['legend'] == ['constraint_loss[class_4]',
                                                  'constraint_loss[class_5]']
  assert 'disabled' in figures['constraints.png']['title'][0]
  assert config_lib.method_label(c) == 'constrained (disabled: lambda fixed at 0)'
  c.method.enabled = True
  figures.clear()
  train.plot_run_curves(str(tmp_path), records, c, ['class_4', 'class_5'])
  assert sorted(figures) == ['constraints.png', 'lambda.png', 'loss.png']
  assert figures['constraints.png']['legend'] == ['constraint_gap[class_4]',
                                                  'constraint_gap[class_5]']
  assert config_lib.method_label(c) == 'constrained'


def test_constrained_run_logs_per_constraint_figures(tiny_config, tmp_path, capsys,
                                                    monkeypatch):
  tiny_config.method = constrained.default_method_config()
  tiny_config.method.constraint_classes = (4, 5, 7)
  tiny_config.method.objective_batch, tiny_config.method.constraint_batch = 16, 8
  tiny_config.method.thresholds = (0.01, 0.02, 0.03)
  tiny_config.train.steps_per_call = 2
  from cdiff_jax import writers
  figures = _record_figures(monkeypatch)
  train.train_and_evaluate(tiny_config, str(tmp_path), progress=False)
  # The loss figure draws the objective beside the lambda-weighted loss; lambda's figure has
  # one line per constraint, named; the class frequencies say which arm they are.
  assert figures['loss.png']['legend'] == ['loss (L_0 + sum lam_i L_i) / (1 + sum lam_i)',
                                           'objective L_0']
  assert figures['lambda.png']['legend'] == ['lam[class_4]', 'lam[class_5]', 'lam[class_7]']
  # The gaps start tens of nats above 0 and end near it: a symmetric log scale shows both.
  assert figures['constraints.png']['scale'] == ['symlog']
  # The start line names each batch group with its size (not only the dataset's size).
  groups = re.search(r'batch groups: (.*)', capsys.readouterr().out).group(1).split(', ')
  assert [g.split()[0] for g in groups] == ['objective', 'class_4', 'class_5', 'class_7']
  assert [g.split('(')[1] for g in groups] == ['16 per batch)'] + ['8 per batch)'] * 3
  records = writers.read_metrics(str(tmp_path))
  assert [r['step'] for r in records] == [4, 8]
  for key in ('lam', 'constraint_loss', 'constraint_gap', 'threshold', 'slack'):
    assert all(len(r[key]) == 3 for r in records), key
  np.testing.assert_allclose(records[-1]['threshold'], [0.01, 0.02, 0.03], rtol=1e-6)
  gap = np.asarray(records[-1]['constraint_gap'])
  # dual_every = 1: the window estimate is each step's loss, so the logged (interval mean)
  # gap is the logged loss minus b, to float32 rounding.
  np.testing.assert_allclose(gap, np.asarray(records[-1]['constraint_loss']) - [0.01, 0.02, 0.03],
                             rtol=1e-5, atol=1e-6)
  assert (tmp_path / 'lambda.png').exists() and (tmp_path / 'constraints.png').exists()


def test_frequency_target_thresholds(monkeypatch, tiny_config, tmp_path):
  # b_c = L_c(reference) - log(target / pi_c): the ELBO loss of class c at frequency target.
  tiny_config.method = constrained.default_method_config()
  tiny_config.method.constraint_classes = (4, 5)
  tiny_config.method.objective_batch, tiny_config.method.constraint_batch = 16, 8
  tiny_config.data.minority_classes, tiny_config.data.minority_fraction = (4, 5), 0.2
  tiny_config.diffusion.loss_weighting = 'elbo'
  tiny_config.method.threshold_mode = 'reference'
  tiny_config.method.reference_workdir = str(tmp_path)
  (tmp_path / 'checkpoints').mkdir()
  tiny_config.method.target_frequency = 0.1
  from cdiff_jax import checkpoint
  monkeypatch.setattr(checkpoint, 'load_params', lambda workdir, which='ema_params': None)
  monkeypatch.setattr(constrained, 'reference_losses',
                      lambda *a, **k: np.array([300.0, 310.0, 320.0]))
  exp = train.build(tiny_config)
  labels = exp.dataset.labels[exp.train_idx]
  pi = np.array([np.mean(labels == 4), np.mean(labels == 5)])
  np.testing.assert_allclose(exp.method.thresholds, np.array([310.0, 320.0]) - np.log(0.1 / pi),
                             rtol=1e-6)
  assert pi[0] < 0.05  # the minority really is one
  # Constraint sets are classes of the objective's data: its training data is all of it.
  np.testing.assert_allclose(exp.objective_class_frequencies(),
                             np.bincount(labels, minlength=10) / len(labels))
  # pi_c measured in the reference run's samples instead (e.g. a TIW-DSM reference, which
  # does not reproduce its training frequencies); a class it never drew counts as 1/2 sample.
  tiny_config.method.frequency_source = 'generated'
  with pytest.raises(config_lib.ConfigError, match='eval.json'):
    train.build(tiny_config)
  freqs = [0.1] * 10
  freqs[4], freqs[5] = 0.04, 0.0
  (tmp_path / 'eval.json').write_text(json.dumps(dict(class_frequencies=freqs, num_samples=500)))
  exp = train.build(tiny_config)
  np.testing.assert_allclose(exp.method.thresholds,
                             np.array([310.0, 320.0]) - np.log(0.1 / np.array([0.04, 0.001])),
                             rtol=1e-6)
  tiny_config.method.frequency_source = 'training'
  # The target shifts each constraint's own reference loss: on the objective's L_0(ref) it
  # would ask rho_c >= exp(-H(pi)) target / pi_c (above 1 here), so that is refused.
  tiny_config.method.threshold_reference = 'objective'
  with pytest.raises(config_lib.ConfigError, match="set threshold_reference='constraint'"):
    train.build(tiny_config)
  tiny_config.method.threshold_reference = 'constraint'
  # The frequency target needs ELBO losses (a threshold in nats).
  tiny_config.diffusion.loss_weighting = 'eps'
  with pytest.raises(config_lib.ConfigError, match='loss_weighting'):
    train.build(tiny_config)


def test_reference_thresholds_scale_then_offset(monkeypatch, tiny_config, tmp_path):
  """b = threshold_scale * L_ref + threshold_offset, L_ref each constraint's reference loss
  ('constraint') or the reference objective loss for every constraint ('objective')."""
  from cdiff_jax import checkpoint
  tiny_config.method = constrained.default_method_config()
  tiny_config.method.constraint_classes = (4, 5)
  tiny_config.method.objective_batch, tiny_config.method.constraint_batch = 16, 8
  tiny_config.method.threshold_mode = 'reference'
  tiny_config.method.reference_workdir = str(tmp_path)
  (tmp_path / 'checkpoints').mkdir()
  tiny_config.method.threshold_scale, tiny_config.method.threshold_offset = 0.5, -2.0
  # The reference's losses by which of its parameters are loaded: by default its training
  # parameters, which the dual's losses (of this run's training parameters) compare with.
  monkeypatch.setattr(checkpoint, 'load_params', lambda workdir, which='ema_params': which)
  by_params = dict(params=np.array([300.0, 310.0, 320.0]), ema_params=np.array([299., 309., 319.]))
  monkeypatch.setattr(constrained, 'reference_losses', lambda m, params, *a, **k: by_params[params])
  exp = train.build(tiny_config)
  np.testing.assert_allclose(exp.method.thresholds, [0.5 * 310.0 - 2.0, 0.5 * 320.0 - 2.0],
                             rtol=1e-9)
  tiny_config.method.threshold_reference = 'objective'
  exp = train.build(tiny_config)
  np.testing.assert_allclose(exp.method.thresholds, [0.5 * 300.0 - 2.0] * 2, rtol=1e-9)
  tiny_config.method.reference_params = 'ema_params'
  exp = train.build(tiny_config)
  np.testing.assert_allclose(exp.method.thresholds, [0.5 * 299.0 - 2.0] * 2, rtol=1e-9)
  tiny_config.method.reference_params = 'ema'
  with pytest.raises(config_lib.ConfigError, match="config.method.reference_params='ema'"):
    train.build(tiny_config)


def test_tiw_objective_with_minority_constraints_in_one_step(tiny_config, tmp_path):
  """Debiasing and constraints from one config: the primal objective is TIW-DSM on the
  biased/reference split (groups bias, ref), the constraints are plain DSM on classes. The
  Lagrangian's L_0 is the mean of weight * corrected loss over the objective's examples and
  L_c the plain DSM loss of class c, recomputed here from TIW's own per-example terms; the
  pretrained discriminator rides in the state, frozen, and survives a checkpoint."""
  from cdiff_jax import checkpoint
  c = tiny_config
  c.method = constrained.default_method_config()
  c.method.objective = 'tiw'
  c.method.tiw.imbalance_ratio, c.method.tiw.ref_fraction = 0.1, 0.1
  c.method.tiw.disc_pretrain_steps, c.method.tiw.disc_cache = 20, False
  c.method.constraint_classes = (8, 9)   # the tail of the long-tailed split
  c.method.objective_batch, c.method.constraint_batch = 16, 4
  c.method.thresholds, c.method.dual_lr = (0.0,), 1.0   # unreachable: lam must grow
  # The constraints' time window applies to the constraint groups (2, 3) only, not to the
  # objective's two groups.
  c.method.constraint_t_min = 0.25
  exp = train.build(c)
  assert exp.batcher.group_names == ['bias', 'ref', 'class_8', 'class_9']
  assert exp.method.num_objective_groups == 2
  # The constraints draw from the split's data only (its tail classes are small), never
  # from the examples the long-tailed split left out.
  bias_ref = np.concatenate(exp.batcher.groups[:2])
  labels = exp.dataset.labels
  for group, cls in zip(exp.batcher.groups[2:], (8, 9)):
    np.testing.assert_array_equal(np.sort(group), np.sort(bias_ref[labels[bias_ref] == cls]))
    assert len(group) < 0.5 * np.sum(labels[exp.train_idx] == cls)
  # The training data the evaluation reports is the objective's, not the set-aside
  # examples: the minibatches' mix of bias and ref, 16 x 0.5 from each (the union's
  # frequencies would weight the large biased set by its size).
  assert len(bias_ref) < 0.8 * len(exp.train_idx)
  bias, ref = exp.batcher.groups[:2]
  freq = lambda g: np.bincount(labels[g], minlength=10) / len(g)
  assert exp.batcher.batch_sizes[:2] == [8, 8]
  np.testing.assert_allclose(exp.objective_class_frequencies(), 0.5 * freq(bias) + 0.5 * freq(ref))
  state = exp.init_state()
  disc0 = jax.device_get(state.extras['base']['disc']['params'])

  batch = exp.batcher.batch(0)
  rng = jax.random.key(3)
  L, _ = exp.method.group_losses(state.params, batch, rng, state.extras)
  g = np.asarray(batch['group'])
  t_lo = jnp.where(batch['group'] >= 2, c.method.constraint_t_min, 0.0)
  terms = exp.method.base.per_example_terms(state.params, state.extras['base'], batch, rng, t_lo)
  w, loss, dsm = (np.asarray(terms[k]) for k in ('weight', 'loss', 'dsm_loss'))
  assert np.std(w[g < 2]) > 1e-3   # the discriminator's weights are not all equal
  np.testing.assert_allclose(L[0], np.mean((w * loss)[g < 2]), rtol=1e-5)
  np.testing.assert_allclose(L[1:], [dsm[g == 2].mean(), dsm[g == 3].mean()], rtol=1e-5)
  # The step's logged figures are those: L_0, L_c, and the mean weight of each side.
  _, aux = exp.method.loss(state.params, state.extras, batch, rng)
  m = aux['metrics']
  np.testing.assert_allclose(m['objective_loss'], L[0], rtol=1e-5)
  np.testing.assert_allclose(m['constraint_loss'], L[1:], rtol=1e-5)
  np.testing.assert_allclose([m['weight_bias'], m['weight_ref']],
                             [w[g == 0].mean(), w[g == 1].mean()], rtol=1e-5)
  assert abs(w[g == 0].mean() - w[g == 1].mean()) > 1e-3  # the sides are told apart

  workdir = str(tmp_path / 'run')
  exp.config.train.steps = 4
  state, hist = train.fit(exp, state, until=4)
  assert exp.step.num_traces == 1
  assert np.all(np.asarray(state.extras['lam']) > 0)
  jax.tree.map(np.testing.assert_array_equal, disc0,
               jax.device_get(state.extras['base']['disc']['params']))
  ckpt = checkpoint.Checkpointer(workdir)
  ckpt.save(4, state, exp.config)
  ckpt.wait()
  restored, step = ckpt.restore_latest(state, exp.config)
  assert step == 4
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.extras),
               jax.device_get(restored.extras))


def test_tiw_objective_takes_thresholds_from_a_reference_run(tiny_config, tmp_path, monkeypatch):
  """threshold_mode='reference' with a TIW-DSM objective: b_c = scale * L_c(ref) + offset,
  L_c the plain DSM loss of class c on t >= constraint_t_min, without needing the reference
  run's discriminator. Checked against the constraint losses the training step itself
  computes (with the discriminator in the state) for the same parameters, averaged over
  batches; ELBO weighting makes the t window matter (ignoring it multiplies the loss)."""
  from cdiff_jax import checkpoint
  c = tiny_config
  c.diffusion.loss_weighting = 'elbo'
  c.method = constrained.default_method_config()
  c.method.objective = 'tiw'
  c.method.tiw.imbalance_ratio, c.method.tiw.ref_fraction = 0.1, 0.1
  c.method.tiw.disc_pretrain_steps, c.method.tiw.disc_cache = 5, False
  c.method.constraint_classes = (8, 9)
  c.method.objective_batch, c.method.constraint_batch = 16, 8
  c.method.constraint_t_min = 0.5
  c.method.threshold_mode = 'reference'
  c.method.threshold_offset, c.method.threshold_scale = -0.3, 1.0
  c.method.reference_batches = 40
  (tmp_path / 'checkpoints').mkdir()
  c.method.reference_workdir = str(tmp_path)
  # The reference model: the run's initialization, perturbed (a fresh UNet's output layer
  # is zero, so every initialization would have the same losses).
  c_abs = c.copy_and_resolve_references()
  c_abs.method.threshold_mode = 'absolute'
  exp_abs = train.build(c_abs)
  state = exp_abs.init_state()
  leaves, treedef = jax.tree.flatten(jax.device_get(state.params))
  rng = np.random.default_rng(0)
  ref_params = jax.tree.unflatten(treedef, [
      a + 0.3 * rng.standard_normal(a.shape).astype(a.dtype) for a in leaves])
  monkeypatch.setattr(checkpoint, 'load_params', lambda workdir, which='ema_params': ref_params)
  exp = train.build(c)
  b = np.asarray(exp.method.thresholds)

  group_losses = jax.jit(lambda p, batch, rng: exp_abs.method.group_losses(p, batch, rng,
                                                                           state.extras)[0])

  def mean_constraint_losses(params):
    return np.mean([np.asarray(group_losses(
        params, parallel.put_batch(exp_abs.batcher.batch(500 + i), exp_abs.mesh),
        jax.random.key(100 + i)))[1:] for i in range(40)], 0)

  L = mean_constraint_losses(ref_params)
  np.testing.assert_allclose(b + 0.3, L, rtol=0.05)  # Monte Carlo: 2,316 vs 2,314, 2,280 vs 2,307
  # The check can tell the reference's parameters from the run's own.
  assert np.all(np.abs(mean_constraint_losses(state.params) / L - 1) > 0.5), L  # 245, 244
  assert b.shape == (2,) and np.all(np.isfinite(b))
  # Validation: the objective's own loss cannot be the reference with TIW-DSM, nor can a
  # frequency target assume the TIW-DSM reference reproduces its training frequencies.
  c.method.target_frequency = 0.1
  with pytest.raises(config_lib.ConfigError, match="frequency_source='generated'"):
    train.build(c)
  c.method.target_frequency = 0.0
  c.method.threshold_reference = 'objective'
  with pytest.raises(config_lib.ConfigError, match='threshold_reference'):
    train.build(c)


def test_dual_fields_change_nothing_a_disabled_run_trains():
  """``constrained.DUAL_FIELDS``, which a finished unconstrained arm's reuse ignores: with
  ``enabled=False`` (lambda fixed at 0) every one of them at another value trains the same
  parameters, bit for bit."""
  from cdiff_jax.config import base_config

  def config(**method):
    c = base_config()
    c.data.minority_classes, c.data.minority_fraction = (4, 5, 7), 0.1
    c.model.ch, c.model.num_res_blocks, c.model.attn_levels = 16, 1, ()
    c.method = constrained.default_method_config()
    c.method.enabled, c.method.constraint_classes = False, (4, 5, 7)
    c.method.objective_batch, c.method.constraint_batch = 8, 4
    c.train.steps, c.train.compilation_cache, c.optim.warmup_steps = 3, False, 1
    c.diffusion.loss_weighting = 'elbo'   # what a frequency target asks for
    c.method.update(method)
    return c

  other = dict(threshold_mode='reference', thresholds=(3.0,), reference_workdir='elsewhere',
               threshold_reference='constraint', threshold_scale=2.0, threshold_offset=1.0,
               target_frequency=0.2, frequency_source='generated', reference_batches=3,
               reference_params='ema_params', dual_lr=0.5, dual_lr_schedule='primal',
               dual_every=2, dual_start=1, dual_estimate='minibatch', dual_ema=0.5,
               init_lambda=2.0, resilient_alpha=1.0, normalize=False)
  # (a frequency target needs threshold_reference='constraint': 'objective' in a second run)
  variants = [other, dict(other, threshold_reference='objective', target_frequency=0.0)]
  defaults = constrained.default_method_config()
  assert {k for v in variants for k in v if v[k] != defaults[k]} == set(constrained.DUAL_FIELDS)
  trained = []
  for c in [config()] + [config(**v) for v in variants]:
    exp = train.build(c)
    state, _ = train.fit(exp, exp.init_state())
    trained.append(jax.tree.leaves(jax.device_get((state.params, state.ema_params))))
  for other_run in trained[1:]:
    for a, b in zip(trained[0], other_run):
      np.testing.assert_array_equal(a, b)
