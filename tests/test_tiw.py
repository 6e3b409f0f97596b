"""TIW-DSM against closed-form answers on Gaussians, plus the shape and reduction contracts.

Gaussians: p_data = N(mu_d, diag var_d), p_bias = N(mu_b, diag var_b); a score minibatch is
half from each, so p_obs = (p_data + p_bias) / 2. Under the VP forward process every noised
density is Gaussian, p_t = N(a_t mu, a_t^2 var + sigma_t^2), so the exact balanced
discriminator logit log p_data_t - log p_bias_t and the true eps of p_data_t,
eps*(x, t) = sigma_t (x - a_t mu_d) / (a_t^2 var_d + sigma_t^2), are known. An affine eps model
eps(x) = x A + b contains eps* at a fixed t, and the loss is quadratic in (A, b), so one
Newton step on the method's own scalar loss gives its exact minimizer over that family.
"""

import dataclasses
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from cdiff_jax import config as config_lib
from cdiff_jax import parallel, schedules, train
from cdiff_jax.data import imbalance
from cdiff_jax.data.sources import ArrayDataset
from cdiff_jax.methods import noisy_classifier as nc
from cdiff_jax.methods import tiw
from cdiff_jax.methods.dsm import DSM
from cdiff_jax.models import MLPScore, ScoreModel

# Affine fits with 100k Monte Carlo examples land within ~0.003 of eps*; a wrong sign of the
# correction is ~0.5 off, a sigma_t^2 (instead of sigma_t) scale ~0.06, weight alone >= 0.08.
COEF_TOL = 0.015


class _FixedT:
  """Mixin: all training times are ``t_fixed`` (a minimizer at one t)."""

  def sample_t(self, rng, shape, stratified=False):
    del rng, stratified
    return jnp.full(shape, self.t_fixed, jnp.float32)


@dataclasses.dataclass(frozen=True)
class FixedTime(_FixedT, schedules.VPSchedule):
  """Continuous VP schedule at one t."""
  t_fixed: float = 0.5


@dataclasses.dataclass(frozen=True)
class FixedTimeDDPM(_FixedT, schedules.DDPMSchedule):
  """Discrete DDPM schedule (T = 1000, linear betas) at one t."""
  t_fixed: float = 0.5


class AffineEps(nn.Module):
  dim: int

  @nn.compact
  def __call__(self, x, t, y=None, train=False):
    a = self.param('A', nn.initializers.zeros, (self.dim, self.dim))
    b = self.param('b', nn.initializers.zeros, (self.dim,))
    return x @ a + b


class ExactLogit(nn.Module):
  """The optimal balanced discriminator's logit, log p_data_t(x) - log p_bias_t(x)."""
  schedule: schedules.Schedule
  mu_d: tuple
  var_d: tuple
  mu_b: tuple
  var_b: tuple

  @nn.compact
  def __call__(self, x, t, train=False):
    self.param('unused', nn.initializers.zeros, ())
    a = self.schedule.alpha(t)[:, None]
    s2 = self.schedule.sigma(t)[:, None] ** 2

    def log_normal(mu, var):
      v = a ** 2 * jnp.asarray(var) + s2
      return jnp.sum(-0.5 * (x - a * jnp.asarray(mu)) ** 2 / v - 0.5 * jnp.log(v), -1)

    return (log_normal(self.mu_d, self.var_d) - log_normal(self.mu_b, self.var_b))[:, None]


def gaussian_batch(mu_d, var_d, mu_b, var_b, n, seed=0, n_ref=None):
  """n examples, ``n_ref`` (default half) from p_data (group 1 = ref), the rest from p_bias
  (group 0)."""
  r = np.random.default_rng(seed)
  d = len(mu_d)
  h = n // 2 if n_ref is None else n_ref
  x0 = np.concatenate([np.asarray(mu_d) + np.sqrt(var_d) * r.standard_normal((h, d)),
                       np.asarray(mu_b) + np.sqrt(var_b) * r.standard_normal((n - h, d))])
  group = np.r_[np.ones(h), np.zeros(n - h)].astype(np.int32)
  return dict(image=jnp.asarray(x0, jnp.float32), label=jnp.zeros(n, jnp.int32),
              group=jnp.asarray(group))


def affine_minimizer(gauss, t, n=100_000, schedule_cls=FixedTime, ref_batch_fraction=0.5,
                     **method_kwargs):
  """(A, b) minimizing the method's loss at time t, and the true (A*, b*) of p_data_t."""
  mu_d, var_d, mu_b, var_b = gauss
  dim = len(mu_d)
  schedule = schedule_cls(t_fixed=t)
  model = ScoreModel(AffineEps(dim), schedule)
  disc = nc.NoisyClassifier(ExactLogit(schedule, mu_d, var_d, mu_b, var_b), 1)
  method = tiw.TIW(DSM(model, stratified_t=False), disc, split_fn=None, batch_size=n,
                   ref_batch_fraction=ref_batch_fraction, **method_kwargs)
  extras = {'disc': {'params': {'unused': jnp.zeros(())}}}
  batch = gaussian_batch(mu_d, var_d, mu_b, var_b, n, n_ref=method.ref_batch)
  theta0, unravel = ravel_pytree(model.init(jax.random.key(0), batch['image'][:2], jnp.zeros(2)))
  loss = lambda th: method.loss(unravel(th), extras, batch, jax.random.key(1))[0]
  newton = jax.jit(lambda th: th - jnp.linalg.solve(jax.hessian(loss)(th), jax.grad(loss)(th)))
  theta = newton(theta0)
  fit = unravel(theta)
  a, s = float(schedule.alpha(t)), float(schedule.sigma(t))
  v = a ** 2 * np.asarray(var_d) + s ** 2
  return (np.asarray(fit['A']), np.asarray(fit['b'])), (np.diag(s / v), -s * a * np.asarray(mu_d) / v)


GAUSS_1D = ((0.5,), (1.0,), (1.5,), (0.25,))
GAUSS_2D = ((0.5, 0.5), (1.0, 0.5), (1.5, -0.5), (0.25, 1.0))


@pytest.mark.parametrize('gauss,times', [(GAUSS_1D, (0.1, 0.3, 0.6)), (GAUSS_2D, (0.1, 0.4))],
                         ids=['1d', '2d'])
def test_exact_ratio_minimizer_is_data_score_and_weight_alone_is_not(gauss, times):
  for t in times:
    (a, b), (a_true, b_true) = affine_minimizer(gauss, t, variant='tiw')
    err = max(np.abs(a - a_true).max(), np.abs(b - b_true).max())
    assert err < COEF_TOL, f't={t}: TIW-DSM minimizer is {err:.4f} from the score of p_data_t'
    (a, b), _ = affine_minimizer(gauss, t, variant='tiw', score_correction=False)
    err_w = max(np.abs(a - a_true).max(), np.abs(b - b_true).max())
    assert err_w > 4 * COEF_TOL, f't={t}: weight alone should be biased, is only {err_w:.4f} off'


@pytest.mark.parametrize('schedule_cls,pi', [(FixedTime, 0.25), (FixedTimeDDPM, 0.75),
                                             (FixedTimeDDPM, 0.5)])
def test_exact_ratio_minimizer_at_any_reference_share_and_discrete_schedule(schedule_cls, pi):
  """The batch's reference share pi enters the weight w~ = d / (pi d + (1 - pi)(1 - d)), and
  the discrete schedule's sigma_t scales the correction: both checked against p_data_t."""
  for t in (0.1, 0.6):
    (a, b), (a_true, b_true) = affine_minimizer(GAUSS_1D, t, schedule_cls=schedule_cls,
                                                ref_batch_fraction=pi, variant='tiw')
    err = max(np.abs(a - a_true).max(), np.abs(b - b_true).max())
    assert err < COEF_TOL, f'pi={pi}, t={t}: TIW-DSM minimizer is {err:.4f} off'
  (a, b), (a_true, b_true) = affine_minimizer(GAUSS_1D, 0.3, schedule_cls=schedule_cls,
                                              ref_batch_fraction=pi, variant='dsm_obs')
  assert max(np.abs(a - a_true).max(), np.abs(b - b_true).max()) > 4 * COEF_TOL


def test_time_independent_exact_weight_is_unbiased_too():
  """IW-DSM with the exact clean-data ratio also targets p_data (its weakness is estimating
  that ratio, not the objective): a check that the iw path weights by w~(x_0)."""
  (a, b), (a_true, b_true) = affine_minimizer(GAUSS_1D, 0.3, variant='iw')
  assert max(np.abs(a - a_true).max(), np.abs(b - b_true).max()) < COEF_TOL
  (a, b), _ = affine_minimizer(GAUSS_1D, 0.3, variant='dsm_obs')
  assert max(np.abs(a - a_true).max(), np.abs(b - b_true).max()) > 4 * COEF_TOL


# ----------------------------------------------------------------------------- discriminator

MU_D, SD_D, MU_B, SD_B = 0.0, 1.0, 1.0, 0.5
# Mean |w~_est - w~_true| under p_obs_t. The true w~ is 0.3-0.5 away from 1 on average at
# these t, and a time-blind estimate (t = 0.02 used at every t) is 0.2-0.5 off at t >= 0.2.
RATIO_TOL = 0.08


def _true_logit(x, t, schedule):
  a, s = float(schedule.alpha(t)), float(schedule.sigma(t))
  vd, vb = a ** 2 * SD_D ** 2 + s ** 2, a ** 2 * SD_B ** 2 + s ** 2
  return (-0.5 * (x - a * MU_D) ** 2 / vd - 0.5 * np.log(vd)
          + 0.5 * (x - a * MU_B) ** 2 / vb + 0.5 * np.log(vb))


@pytest.mark.parametrize('net', ['mlp', 'head'])
def test_discriminator_recovers_time_dependent_ratio(net):
  """The T-BCE discriminator's w~ matches the exact ratio at several t; 'head' is the
  frozen-features head (disc_features='eval_classifier') on identity features, which must
  take t from its own time embedding."""
  schedule = schedules.VPSchedule()
  r = np.random.default_rng(0)
  n = 20_000
  x = np.r_[MU_D + SD_D * r.standard_normal(n), MU_B + SD_B * r.standard_normal(n)]
  ds = ArrayDataset(x[:, None].astype(np.float32), np.r_[np.zeros(n), np.ones(n)], 2, 'toy')
  ref, bias = np.arange(n), np.arange(n, 2 * n)
  steps = 1200
  if net == 'mlp':
    disc = nc.NoisyClassifier(nc.build_net('mlp', 1, hidden=64, depth=2), 1)
  else:
    disc = nc.NoisyClassifier(nc.build_net('head', 1, hidden=64), 1, lambda frozen, x, t: x)
  method = tiw.TIW(DSM(ScoreModel(MLPScore(hidden=8, depth=1), schedule)), disc,
                   split_fn=lambda d, i: (bias, ref), variant='tiw', batch_size=64,
                   disc_tx=optax.adam(optax.cosine_decay_schedule(3e-3, steps, 0.05)),
                   disc_pretrain_steps=steps, disc_batch_size=256, progress=False)
  method.data_groups(ds, np.arange(2 * n))
  params = method.init_extras(jax.random.key(0), None)['disc']['params']
  w = lambda logit: np.exp(np.asarray(tiw.log_density_ratio(jnp.asarray(logit), 0.5)))
  r2 = np.random.default_rng(1)
  for t in (0.05, 0.2, 0.4):
    a, s = float(schedule.alpha(t)), float(schedule.sigma(t))
    k = 4000  # test points from p_obs_t
    xs = np.r_[a * MU_D + np.sqrt(a ** 2 * SD_D ** 2 + s ** 2) * r2.standard_normal(k),
               a * MU_B + np.sqrt(a ** 2 * SD_B ** 2 + s ** 2) * r2.standard_normal(k)]
    xs = xs.astype(np.float32)
    true = _true_logit(xs, t, schedule)
    est = np.asarray(disc.logits(params, xs[:, None], jnp.full(2 * k, t)))[:, 0]
    err = np.abs(w(est) - w(true)).mean()
    assert err < RATIO_TOL, f't={t}: mean |w~ error| {err:.3f}'
    assert np.abs(w(true) - 1).mean() > 1.5 * RATIO_TOL  # the ratio at t is far from flat
    central = np.abs(true) < 3  # log-ratio where both densities have mass
    assert np.abs(est - true)[central].mean() < 0.2, f't={t}: log-ratio error'


# ----------------------------------------------------------------------------- contracts


class MeanPixelLogit(nn.Module):
  """A discriminator whose logit spreads widely over examples: 8 * (mean of x - 0.1)."""

  @nn.compact
  def __call__(self, x, t, train=False):
    scale = self.param('scale', nn.initializers.constant(8.0), ())
    return scale * (x.reshape(x.shape[0], -1).mean(-1, keepdims=True) - 0.1)


def _image_method(variant='tiw', alpha=1.0, **kw):
  schedule = schedules.get_schedule(config_lib.base_config().diffusion)
  model = ScoreModel(MLPFlat(), schedule)
  disc = nc.NoisyClassifier(MeanPixelLogit(), 1)
  return tiw.TIW(DSM(model), disc, split_fn=None, variant=variant, alpha=alpha,
                 batch_size=16, **kw)


class MLPFlat(nn.Module):
  """eps-network for small images: flatten, MLP, reshape (fast to trace and run)."""

  @nn.compact
  def __call__(self, x, t, y=None, train=False):
    h = MLPScore(hidden=32, depth=1)(x.reshape(x.shape[0], -1), t)
    return h.reshape(x.shape)


def _image_batch(n=16, seed=0):
  r = np.random.default_rng(seed)
  # Per-example offsets spread the discriminator's logits (and so the weights).
  img = np.clip(r.normal(0, 0.3, (n, 4, 4, 1)) + r.uniform(-0.6, 0.6, (n, 1, 1, 1)), -1, 1)
  return dict(image=jnp.asarray(img, jnp.float32), label=jnp.zeros(n, jnp.int32),
              group=jnp.asarray(np.r_[np.zeros(n // 2), np.ones(n // 2)].astype(np.int32)))


def _init(method, batch):
  params = method.dsm.model.init(jax.random.key(0), batch['image'][:2], jnp.zeros(2))
  extras = {'disc': {'params': method.disc.init(jax.random.key(1), batch['image'].shape[1:])}}
  return params, extras


def test_each_example_loss_is_multiplied_by_its_own_weight():
  method = _image_method()
  batch = _image_batch()
  params, extras = _init(method, batch)
  rng = jax.random.key(3)
  terms = method.per_example_terms(params, extras, batch, rng)
  n = batch['image'].shape[0]
  for key in ('loss', 'weight', 'dsm_loss', 'log_ratio'):
    assert terms[key].shape == (n,), key
  w, l = np.asarray(terms['weight']), np.asarray(terms['loss'])
  assert w.max() / w.min() > 5  # weights differ a lot between examples
  objective = float(method.loss(params, extras, batch, rng)[0])
  np.testing.assert_allclose(objective, np.mean(w * l), rtol=1e-6)
  # The test can tell the right reduction from a broadcast that decouples w and loss.
  assert abs(np.mean(w) * np.mean(l) - np.mean(w * l)) > 1e-3 * np.mean(w * l)
  # Weight i belongs to example i: recompute each example's weight on its own.
  log_ratio = jax.jit(method.example_log_ratio_fn(extras['disc']))
  for i in (0, 5, n - 1):
    one = float(jnp.exp(log_ratio(terms['x_t'][i], terms['t'][i])))
    np.testing.assert_allclose(w[i], one, rtol=1e-5)
  # The reduction refuses a weight of any other shape (e.g. (B, 1), which would broadcast).
  with pytest.raises(AssertionError):
    tiw.weighted_mean(terms['loss'], terms['weight'][:, None])
  # The gradient is the weighted sum of per-example gradients.
  g = jax.jit(jax.grad(lambda p: method.loss(p, extras, batch, rng)[0]))(params)
  per_ex = jax.jit(jax.jacrev(
      lambda p: method.per_example_terms(p, extras, batch, rng)['loss']))(params)
  expected = jax.tree.map(lambda pe: jnp.tensordot(jnp.asarray(w), pe, 1) / n, per_ex)
  chex.assert_trees_all_close(g, expected, rtol=1e-4, atol=1e-6)


def test_alpha_zero_is_dsm_obs_exactly():
  batch = _image_batch()
  tiw0 = _image_method('tiw', alpha=0.0)
  params, extras = _init(tiw0, batch)
  rng = jax.random.key(7)
  terms = tiw0.per_example_terms(params, extras, batch, rng)
  assert np.asarray(terms['log_ratio']).std() > 0.1  # the discriminator is not trivial
  plain, _ = tiw0.dsm.per_example_loss(params, batch, rng)
  np.testing.assert_array_equal(terms['loss'], plain)
  np.testing.assert_array_equal(terms['weight'], np.ones(16))
  obs = _image_method('dsm_obs')

  def value_and_grad(method):
    return jax.jit(jax.value_and_grad(lambda p: method.loss(p, extras, batch, rng)[0]))(params)

  (l0, g0), (l1, g1) = value_and_grad(tiw0), value_and_grad(obs)
  assert float(l0) == float(l1)
  # The two programs differ (one also runs the discriminator), so XLA may sum the batch
  # in another order: the gradients agree to float32 rounding, not necessarily bitwise.
  chex.assert_trees_all_close(g0, g1, rtol=1e-5, atol=1e-8)
  # and alpha != 0 does change it (the comparison is not vacuous)
  l2, _ = value_and_grad(_image_method('tiw', alpha=1.0))
  assert abs(float(l2) - float(l0)) > 1e-4


def test_per_example_input_gradient_matches_finite_differences():
  clf = nc.NoisyClassifier(nc.build_net('mlp', 3, hidden=16, depth=1), 3)
  params = clf.init(jax.random.key(0), (2,))
  x = jax.random.normal(jax.random.key(1), (5, 2))
  t = jnp.linspace(0.1, 0.9, 5)
  y = jnp.array([0, 1, 2, 0, 1])
  logp, grad = jax.jit(nc.class_log_prob_and_grad, static_argnums=0)(clf, params, x, t, y)
  assert logp.shape == (5,) and grad.shape == x.shape
  batched_log_prob = jax.jit(
      lambda x_: jax.nn.log_softmax(clf.logits(params, x_, t))[jnp.arange(5), y])
  np.testing.assert_allclose(logp, batched_log_prob(x), rtol=1e-5, atol=1e-6)
  h = 1e-3
  for d in range(2):
    e = jnp.zeros_like(x).at[:, d].set(h)
    fd = (batched_log_prob(x + e) - batched_log_prob(x - e)) / (2 * h)
    np.testing.assert_allclose(grad[:, d], fd, rtol=2e-2, atol=2e-3)


# ----------------------------------------------------------------------------- data + config


def test_long_tail_split_profile_balance_and_disjointness():
  labels = np.repeat(np.arange(10), 500)
  bias, ref = imbalance.long_tail_split(labels, 10, 0.01, 0.1, seed=0)
  assert not set(bias) & set(ref)
  nb, nr = np.bincount(labels[bias], minlength=10), np.bincount(labels[ref], minlength=10)
  assert (nr == nr[0]).all()                                     # reference is balanced
  np.testing.assert_allclose(nr.sum() / nb.sum(), 0.1, atol=0.01)  # 10% of the biased set
  np.testing.assert_allclose(nb[-1] / nb[0], 0.01, atol=0.003)   # imbalance ratio
  np.testing.assert_allclose(nb / nb[0], 0.01 ** (np.arange(10) / 9), atol=0.01)
  assert nb[0] + nr[0] <= 500
  b2, r2 = imbalance.long_tail_split(labels, 10, 0.01, 0.1, seed=0)
  np.testing.assert_array_equal(bias, b2)  # deterministic
  np.testing.assert_array_equal(ref, r2)
  order = (9, 8, 7, 6, 5, 4, 3, 2, 1, 0)
  bias, _ = imbalance.long_tail_split(labels, 10, 0.01, 0.05, 0, class_order=order)
  assert np.argmax(np.bincount(labels[bias])) == 9


def test_attribute_bias_split():
  r = np.random.default_rng(0)
  attr = r.integers(0, 2, 4000)
  bias, ref = imbalance.attribute_bias_split(attr, 2, majority_value=0, majority_fraction=0.8,
                                             ref_fraction=0.05, seed=1)
  np.testing.assert_allclose((attr[bias] == 0).mean(), 0.8, atol=0.01)
  np.testing.assert_allclose((attr[ref] == 0).mean(), 0.5, atol=0.01)
  np.testing.assert_allclose(len(ref) / len(bias), 0.05, atol=0.005)
  assert not set(bias) & set(ref)


def _toy_config(**method):
  c = config_lib.base_config()
  c.data.name = 'toy'
  c.model.name = 'mlp'
  c.model.hidden, c.model.depth = 32, 1
  c.diffusion.schedule = 'vp'
  c.train.batch_size = 32
  c.train.compilation_cache = False
  c.method = tiw.default_config()
  c.method.update(dict(disc_hidden=32, disc_depth=1, disc_pretrain_steps=5,
                       disc_batch_size=32, disc_cache=False, imbalance_ratio=0.1))
  c.method.update(method)
  return c


def _toy_dataset(n=2000):
  r = np.random.default_rng(0)
  labels = r.integers(0, 2, n)
  x = np.where(labels == 0, -1.0, 1.0) + 0.3 * r.standard_normal(n)
  return ArrayDataset(x[:, None].astype(np.float32), labels, 2, 'toy')


@pytest.mark.parametrize('joint', [False, True])
def test_train_step_compiles_once_and_discriminator_is_frozen_or_joint(joint):
  exp = train.build(_toy_config(disc_joint=joint), _toy_dataset())
  assert isinstance(exp.method, tiw.TIW)
  assert [g for g in exp.batcher.group_names] == ['bias', 'ref']
  assert exp.batcher.batch_sizes == [16, 16]
  # The evaluation's training frequencies: the minibatches' mix (p_obs), half from each.
  freq = lambda g: np.bincount(exp.dataset.labels[g], minlength=2) / len(g)
  bias, ref = exp.batcher.groups
  assert abs(freq(bias)[1] - freq(ref)[1]) > 0.2
  np.testing.assert_allclose(exp.objective_class_frequencies(), (freq(bias) + freq(ref)) / 2)
  # A non-finite stop names the discriminator's step size only where it takes steps.
  assert exp.method.step_size_fields == (('method.disc_lr',) if joint else ())
  state = exp.init_state()
  disc0 = jax.tree.map(np.asarray, state.extras['disc']['params'])
  for s in range(3):
    state, m = exp.step(state, parallel.put_batch(exp.batcher.batch(s), exp.mesh))
  assert exp.step.num_traces == 1
  assert np.isfinite(float(m['loss'])) and 'weight_ref' in m and 'correction_rms' in m
  moved = max(float(np.abs(a - np.asarray(b)).max()) for a, b in
              zip(jax.tree.leaves(disc0), jax.tree.leaves(state.extras['disc']['params'])))
  if joint:
    assert moved > 0 and 'disc_bce' in m
  else:
    assert moved == 0.0


@pytest.mark.parametrize('field,value,match', [
    ('variant', 'tiwdsm', 'config.method.variant'),
    ('alpha', -1.0, 'config.method.alpha'),
    ('ref_fraction', 0.0, 'config.method.ref_fraction'),
    ('ref_batch_fraction', 1.0, 'config.method.ref_batch_fraction'),
    ('disc_pretrain_steps', 0, 'config.method.disc_pretrain_steps'),
    ('disc_batch_size', 7, 'config.method.disc_batch_size'),
])
def test_bad_method_config_names_the_field(field, value, match):
  c = _toy_config(**{field: value})
  with pytest.raises(config_lib.ConfigError, match=match):
    train.build(c, _toy_dataset())


def test_a_diverged_discriminator_is_refused_and_not_cached(tmp_path, monkeypatch):
  """A discriminator whose pre-training diverged (T-BCE far above chance) would give every
  example weight 0 or NaN and leave the score model untrained with a finite loss: refused
  in one line naming method.disc_lr, and not written to the discriminator cache; the same
  recipe at the default learning rate passes and is cached."""
  monkeypatch.setenv('CDIFF_JAX_CACHE', str(tmp_path))
  cache = tmp_path / 'discriminators'
  bad = train.build(_toy_config(disc_lr=1e4, disc_pretrain_steps=60, disc_cache=True),
                    _toy_dataset())
  with pytest.raises(config_lib.ConfigError,
                     match=r'^config.method.disc_lr=10000.0: the discriminator diverged in its '
                           r'60 pre-training steps \(T-BCE [0-9.e+]+,'):
    bad.init_state()
  assert not cache.exists() or not list(cache.iterdir())
  good = train.build(_toy_config(disc_pretrain_steps=60, disc_cache=True), _toy_dataset())
  good.init_state()
  assert len(list(cache.glob('*.msgpack'))) == 1


def test_a_frozen_feature_discriminator_is_differentiated_through_its_features():
  """A discriminator on frozen features (the evaluation classifier's) gives TIW-DSM's
  correction grad_x log w through the feature map: its x-gradient matches central finite
  differences and is not zero (the frozen parameters get none, x does)."""
  r = np.random.default_rng(0)
  frozen = jnp.asarray(r.standard_normal((3, 5)), jnp.float32)
  clf = nc.NoisyClassifier(nc.FeatureHead(hidden=8, depth=1), 1,
                           feature_fn=lambda fr, x, t: jnp.tanh(x @ fr))
  params = clf.init(jax.random.key(0), (3,), frozen)
  fn = lambda x1, t1: clf.example_logits(params, x1, t1, frozen)[0]
  x = jnp.asarray(r.standard_normal((4, 3)), jnp.float32)
  t = jnp.asarray([0.1, 0.4, 0.6, 0.9])
  _, grads = nc.per_example_value_and_grad(fn, x, t)
  h = 1e-2
  fd = np.stack([[(float(fn(x[i] + h * e, t[i])) - float(fn(x[i] - h * e, t[i]))) / (2 * h)
                  for e in np.eye(3, dtype=np.float32)] for i in range(4)])
  assert np.abs(fd).max() > 1e-3
  np.testing.assert_allclose(grads, fd, rtol=2e-2, atol=2e-4)


def test_host_warnings_for_a_diverged_joint_discriminator_and_vanishing_weights():
  """The logged figures of a discriminator trained with the score model: a T-BCE far above
  chance (or NaN) says it diverged; weights near 0 on both groups say the score model is
  not training. A constrained run with a TIW-DSM objective passes them on."""
  from cdiff_jax.methods.constrained import Constrained
  method = train.build(_toy_config(disc_joint=True), _toy_dataset()).method
  sane = dict(disc_bce=1.30, weight_bias=0.9, weight_ref=1.2)
  assert method.host_metrics(sane, 10) == []
  # Worse than any constant logit: diverged; a weak but better-than-twice-chance one: not.
  assert method.host_metrics(dict(sane, disc_bce=1.5 * nc.CHANCE_BCE), 10) == []
  for bce in (3 * nc.CHANCE_BCE, 1e6, float('nan')):
    (line,) = method.host_metrics(dict(sane, disc_bce=bce), 10)
    assert line.startswith('the discriminator diverged') and 'method.disc_lr' in line
  (line,) = method.host_metrics(dict(sane, weight_bias=0.0, weight_ref=2e-4), 10)
  assert line.startswith('the importance weights vanish')
  composed = Constrained(base=method, num_constraints=1, thresholds=(0.0,), enabled=False)
  assert composed.host_metrics(dict(sane, disc_bce=1e6), 10) == method.host_metrics(
      dict(sane, disc_bce=1e6), 10)


def test_conditional_tiw_an_unmeasured_attribute_and_an_mlp_discriminator_are_refused():
  """TIW-DSM's correction is the unconditional ratio's grad log w~_t(x_t): on a
  class-conditional model it moves each class's score by it, which is not the score of
  p_data_t(x | y), so the run is refused before any work; IW-DSM (a weight only, which is
  right for labels that are functions of the image) and the weight-only ablation are not.
  An attribute bias other than the label would not be what the evaluation measures. An MLP
  discriminator cannot take images: refused with the field, not a shape error."""
  from configs import digits_tiw
  c = digits_tiw.get_config()
  train.validate(c)
  c.model.conditional = True
  with pytest.raises(config_lib.ConfigError,
                     match=r'^config.model.conditional=True: TIW-DSM corrects the score by '
                           r'the unconditional density ratio.*model.conditional=False'):
    train.validate(c)
  for field, value in (('variant', 'iw'), ('score_correction', False)):
    ok = digits_tiw.get_config()
    ok.model.conditional = True
    ok.method[field] = value
    train.validate(ok)
  # An attribute bias on CelebA is measured by the evaluation only if it is the label.
  c = digits_tiw.get_config()
  c.method.bias, c.method.attribute = 'attribute', 'Young'
  c.eval.enabled = True
  with pytest.raises(config_lib.ConfigError, match=r"^config.method.attribute='Young': the "
                                                   r"evaluation classifies data.label_attribute "
                                                   r"\('Male'\)"):
    train.validate(c)
  c.data.label_attribute = 'Young'
  train.validate(c)
  c = digits_tiw.get_config()
  c.method.disc_net = 'mlp'
  with pytest.raises(config_lib.ConfigError, match=r"^config.method.disc_net='mlp': is for "
                                                   r"vector data \(model.name=mlp\)"):
    train.validate(c)
  # A dropout of 1 (its T-BCE "diverged", blaming disc_lr) and a zero-width discriminator
  # (it trained, at chance) are named.
  for field, value, needle in (('disc_dropout', 1.0, 'must lie in [0, 1)'),
                               ('disc_ch', 0, 'must be positive')):
    c = digits_tiw.get_config()
    c.method[field] = value
    with pytest.raises(config_lib.ConfigError,
                       match=re.escape(f'config.method.{field}={value!r}: {needle}')):
      train.validate(c)


def test_unknown_method_field_is_refused():
  c = _toy_config()
  c.method.disc_lrr = 1.0
  with pytest.raises(config_lib.ConfigError, match='config.method.disc_lrr'):
    train.build(c, _toy_dataset())


def test_composed_per_example_loss_weights_only_the_objective_groups():
  """The drop-in for a composed method (constrained Lagrangian): weight * corrected loss on
  the bias/ref groups, the plain DSM loss on any other group (a constraint set)."""
  method = _image_method()
  batch = _image_batch()
  batch['group'] = jnp.asarray(np.r_[np.zeros(6), np.ones(6), np.full(4, 2)].astype(np.int32))
  params, extras = _init(method, batch)
  vec, terms = method.per_example_loss(params, batch, jax.random.key(4), extras)
  assert vec.shape == (16,)
  np.testing.assert_allclose(vec[:12], (terms['weight'] * terms['loss'])[:12], rtol=1e-6)
  np.testing.assert_allclose(vec[12:], terms['dsm_loss'][12:], rtol=1e-6)
  assert np.abs(np.asarray(terms['loss'] - terms['dsm_loss'])).max() > 0  # correction is on


def test_feature_head_discriminator_uses_the_run_classifier_frozen(tiny_config, tmp_path,
                                                                  monkeypatch):
  """disc_features='eval_classifier': the head sits on the features of the classifier the
  run's evaluation uses (config.eval.classifier_steps), which the step leaves unchanged."""
  from cdiff_jax import evaluation
  monkeypatch.setenv('CDIFF_JAX_CACHE', str(tmp_path))
  trained = []
  real_train = evaluation.train_classifier

  def recording_train(train_set, test_set, steps, *args, **kwargs):
    trained.append(steps)
    return real_train(train_set, test_set, steps, *args, **kwargs)

  monkeypatch.setattr(evaluation, 'train_classifier', recording_train)
  c = tiny_config
  c.eval.classifier_steps = 40
  c.train.num_devices = 1   # the case where placing the state could alias its arrays
  c.method = tiw.default_config()
  c.method.update(dict(variant='tiw', disc_features='eval_classifier', disc_pretrain_steps=3,
                       disc_batch_size=16, disc_cache=False, imbalance_ratio=0.1,
                       ref_fraction=0.2))
  exp = train.build(c)
  state = exp.init_state()
  assert trained == [40]               # the run's classifier, not a default-size one
  clf = evaluation.classifier_for(c)   # now read from the cache
  assert trained == [40]
  frozen = jax.tree.map(np.asarray, state.extras['disc']['frozen'])
  chex.assert_trees_all_equal(frozen, clf.params)
  head0 = jax.tree.map(np.asarray, state.extras['disc']['params'])
  for _ in range(2):
    state, m = exp.step(state, parallel.put_batch(exp.batcher.batch(0), exp.mesh))
  assert np.isfinite(float(m['loss']))
  chex.assert_trees_all_equal(frozen, state.extras['disc']['frozen'])
  # The donated step did not consume the feature extractor's own arrays: a second state
  # (as a resume builds) still initializes from them.
  chex.assert_trees_all_equal(frozen, exp.init_state().extras['disc']['frozen'])
  # The trained parameters are the head's alone (the classifier's live only in 'frozen').
  fresh = exp.method.disc.init(jax.random.key(1), (8, 8, 1), frozen)
  assert jax.tree.structure(fresh) == jax.tree.structure(head0)


def test_iw_discriminator_trains_under_either_time_weighting():
  """IW-DSM's discriminator sees clean data (t = 0), where ``sigma2`` would weight its loss
  by sigma(0)^2 = 0 and leave it at its initialization: the weighting does not apply."""
  batch = _image_batch()
  is_ref = np.asarray(batch['group']) == 1
  results = {}
  for weighting in ('uniform', 'sigma2'):
    method = _image_method(variant='iw', disc_time_weighting=weighting)
    _, extras = _init(method, batch)
    loss_fn = lambda p: method._disc_loss(p, batch['image'], is_ref, ~is_ref,
                                          jax.random.key(5), None)[0]
    loss, grads = jax.value_and_grad(loss_fn)(extras['disc']['params'])
    results[weighting] = float(loss), optax.global_norm(grads)
  np.testing.assert_allclose(results['sigma2'], results['uniform'], rtol=1e-6)
  assert results['sigma2'][0] > 0.1 and results['sigma2'][1] > 0
  # The time-dependent discriminator still weights by sigma(t)^2 (a different loss).
  method = _image_method(variant='tiw', disc_time_weighting='sigma2')
  _, extras = _init(method, batch)
  loss = method._disc_loss(extras['disc']['params'], batch['image'], is_ref, ~is_ref,
                           jax.random.key(5), None)[0]
  assert abs(float(loss) - results['uniform'][0]) > 1e-3


def test_discriminator_cache_key_covers_the_frozen_feature_extractor():
  """A head cached on one feature extractor is not loaded on top of another."""
  method = _image_method()
  method._data.update(dataset=ArrayDataset(np.zeros((4, 4, 4, 1), np.float32),
                                           np.zeros(4, np.int64), 2, 'tiny'),
                      bias=np.arange(2), ref=np.arange(2, 4))
  a = {'w': np.ones((3, 2), np.float32)}
  b = {'w': np.full((3, 2), 2.0, np.float32)}
  assert method._cache_path(10, a) == method._cache_path(10, jax.tree.map(np.copy, a))
  assert method._cache_path(10, a) != method._cache_path(10, b)
  assert method._cache_path(10, None) != method._cache_path(10, a)
  assert method._cache_path(10, None) != method._cache_path(11, None)


# ------------------------------------------------------- tempering, layout, cache, metrics, T-BCE


def _tempered_affine_fit(gauss, t, alpha, pi, schedule):
  """(A, b) of the best affine eps under p_alpha ~ p_obs_t^(1 - alpha) p_data_t^alpha (1-D).

  By Stein's identity the least-squares affine fit of a score under its own density is the
  Gaussian score with that density's mean m and variance v: eps = sigma_t (x - m) / v.
  m and v come from quadrature on a grid, independent of the code under test.
  """
  (mu_d,), (var_d,), (mu_b,), (var_b,) = gauss
  a, s = float(schedule.alpha(t)), float(schedule.sigma(t))
  x = np.linspace(-12.0, 12.0, 200_001)
  normal = lambda m, v: np.exp(-0.5 * (x - m) ** 2 / v) / np.sqrt(2 * np.pi * v)
  p_data = normal(a * mu_d, a ** 2 * var_d + s ** 2)
  p_obs = pi * p_data + (1 - pi) * normal(a * mu_b, a ** 2 * var_b + s ** 2)
  dens = p_obs ** (1 - alpha) * p_data ** alpha
  dens = dens / dens.sum()
  m = np.sum(dens * x)
  v = np.sum(dens * (x - m) ** 2)
  return s / v, -s * m / v


def test_fractional_alpha_minimizer_is_the_score_of_the_tempered_density():
  """alpha = 1/2: weight w~^alpha and correction alpha grad log w~ make the minimizer the score
  of p_obs_t^(1 - alpha) p_data_t^alpha (its affine fit from quadrature moments)."""
  t, alpha = 0.3, 0.5
  (a, b), (a_data, b_data) = affine_minimizer(GAUSS_1D, t, variant='tiw', alpha=alpha)
  a_true, b_true = _tempered_affine_fit(GAUSS_1D, t, alpha, 0.5, FixedTime(t_fixed=t))
  err = max(abs(a.item() - a_true), abs(b.item() - b_true))
  assert err < COEF_TOL, f'alpha={alpha}: minimizer is {err:.4f} from the tempered score'
  # Not vacuous: the tempered target is far from both p_data_t's and p_obs_t's.
  assert abs(b_true - b_data.item()) > 4 * COEF_TOL
  a_obs, b_obs = _tempered_affine_fit(GAUSS_1D, t, 0.0, 0.5, FixedTime(t_fixed=t))
  assert abs(b_true - b_obs) > 4 * COEF_TOL


def test_batch_layout_and_ratio_use_the_actual_reference_share():
  """batch_size 10 at ref_batch_fraction 0.26 gives 3 reference + 7 biased examples, and w~ uses
  that actual share pi = 3/10: w~ = d / (pi d + (1 - pi)(1 - d)) with d = sigmoid(logit)."""
  schedule = schedules.get_schedule(config_lib.base_config().diffusion)
  bias, ref = np.arange(20), np.arange(20, 26)
  method = tiw.TIW(DSM(ScoreModel(MLPFlat(), schedule)), nc.NoisyClassifier(MeanPixelLogit(), 1),
                   split_fn=lambda ds, idx: (bias, ref), batch_size=10, ref_batch_fraction=0.26)
  groups = method.data_groups(None, None)
  assert [(name, size) for name, _, size in groups] == [('bias', 7), ('ref', 3)]
  np.testing.assert_array_equal(groups[0][1], bias)
  np.testing.assert_array_equal(groups[1][1], ref)
  batch = _image_batch(10)
  params = method.disc.init(jax.random.key(1), (4, 4, 1))
  log_ratio = jax.vmap(method.example_log_ratio_fn({'params': params}))(
      batch['image'], jnp.full((10,), 0.3))
  x = np.asarray(batch['image'], np.float64).reshape(10, -1)
  d = 1 / (1 + np.exp(-8.0 * (x.mean(-1) - 0.1)))
  pi = 3 / 10
  np.testing.assert_allclose(np.exp(np.asarray(log_ratio)), d / (pi * d + (1 - pi) * (1 - d)),
                             rtol=1e-5)


def test_discriminator_cache_key_covers_variant_schedule_and_recipe():
  """A cached discriminator is not reused across IW/TIW (clean vs noised inputs), a different
  forward process, or a different discriminator recipe."""
  method = _image_method()
  method._data.update(dataset=ArrayDataset(np.zeros((4, 4, 4, 1), np.float32),
                                           np.zeros(4, np.int64), 2, 'tiny'),
                      bias=np.arange(2), ref=np.arange(2, 4))
  key = method._cache_path(10)
  assert dataclasses.replace(method)._cache_path(10) == key  # the same recipe: the same file
  assert dataclasses.replace(method, variant='iw')._cache_path(10) != key
  other = ScoreModel(MLPFlat(), schedules.VPSchedule(beta_max=10.0))
  assert dataclasses.replace(method, dsm=DSM(other))._cache_path(10) != key
  assert dataclasses.replace(method, disc_signature='{"disc_lr": 1.0}')._cache_path(10) != key
  # the same name, size and split, other pixels (a data set remade under its old name)
  remade = _image_method()
  remade._data.update(method._data, dataset=ArrayDataset(np.ones((4, 4, 4, 1), np.float32),
                                                         np.zeros(4, np.int64), 2, 'tiny'))
  assert remade._cache_path(10) != key


def test_discriminator_signature_holds_the_pretraining_recipe_only():
  """The config fields in the cache key are those the first phase reads: another learning
  rate or width is another discriminator; joint updates after it (``disc_joint``) and the cache
  switch itself are not (a run with disc_joint=True reuses the discriminator pre-trained for
  the same recipe without it)."""
  base = tiw._disc_signature(_toy_config().method)
  assert tiw._disc_signature(_toy_config(disc_joint=True, disc_cache=True).method) == base
  for field, value in [('disc_lr', 1e-3), ('disc_hidden', 64), ('disc_batch_size', 64),
                       ('disc_time_weighting', 'sigma2'), ('imbalance_ratio', 0.2),
                       ('ref_fraction', 0.2), ('split_seed', 1)]:
    assert tiw._disc_signature(_toy_config(**{field: value}).method) != base, field


def test_weight_metrics_are_group_means_and_effective_sample_size():
  """weight_bias / weight_ref are the mean weights of each group and weight_ess is
  (sum w)^2 / (n sum w^2), recomputed from the per-example weights."""
  method = _image_method()
  batch = _image_batch()
  params, extras = _init(method, batch)
  rng = jax.random.key(3)
  w, m = jax.jit(lambda p: (method.per_example_terms(p, extras, batch, rng)['weight'],
                            method.loss(p, extras, batch, rng)[1]['metrics']))(params)
  w = np.asarray(w, np.float64)
  g = np.asarray(batch['group'])
  np.testing.assert_allclose(m['weight_bias'], w[g == 0].mean(), rtol=1e-5)
  np.testing.assert_allclose(m['weight_ref'], w[g == 1].mean(), rtol=1e-5)
  assert abs(w[g == 0].mean() - w[g == 1].mean()) > 0.1  # the groups are told apart
  ess = w.sum() ** 2 / (len(w) * np.sum(w ** 2))
  assert ess < 0.9  # the weights are uneven, so the metric is not trivially 1
  np.testing.assert_allclose(m['weight_ess'], ess, rtol=1e-5)
  np.testing.assert_allclose(m['weight_max'], w.max(), rtol=1e-5)


def test_correction_metric_is_the_closed_form_correction_size():
  """With the logit l = 8 (mean of 16 pixels - 0.1) and log w~ = log d - log(pi d +
  (1 - pi)(1 - d)), d log w~ / dl = (1 - pi)(1 - d) / (pi d + (1 - pi)(1 - d)) (by hand), so
  the eps-target moves by sigma_t (8 / 16) that in every pixel (alpha = 1): correction_rms is
  the rms of those over the batch (rms(target) would be about 1, the noise's size)."""
  method = _image_method()
  batch = _image_batch()
  params, extras = _init(method, batch)
  rng = jax.random.key(4)
  terms, m = jax.jit(lambda p: (method.per_example_terms(p, extras, batch, rng),
                                method.loss(p, extras, batch, rng)[1]['metrics']))(params)
  x_t = np.asarray(terms['x_t'], np.float64).reshape(16, -1)
  d = 1 / (1 + np.exp(-8.0 * (x_t.mean(-1) - 0.1)))
  pi = method.pi
  dlogw = (1 - pi) * (1 - d) / (pi * d + (1 - pi) * (1 - d))
  sigma = np.asarray(method.dsm.model.schedule.sigma(terms['t']), np.float64)
  assert np.ptp(dlogw) > 0.1  # the closed form's d-dependence matters
  np.testing.assert_allclose(m['correction_rms'], np.sqrt(np.mean((sigma * 0.5 * dlogw) ** 2)),
                             rtol=1e-4)


def test_joint_discriminator_step_takes_the_reference_group_as_positive():
  """Joint mode, IW-DSM's clean discriminator (x_t = x0): the step's T-BCE is the closed form
  mean_ref softplus(-l) + mean_bias softplus(l) of the known logits, 5 reference vs 11 biased."""
  method = _image_method(variant='iw', disc_joint=True, disc_tx=optax.sgd(0.1))
  batch = _image_batch()
  g = np.r_[np.ones(5), np.zeros(11)].astype(np.int32)
  batch['group'] = jnp.asarray(g)
  params, extras = _init(method, batch)
  extras['disc']['opt_state'] = method.disc_tx.init(extras['disc']['params'])
  _, aux = method.loss(params, extras, batch, jax.random.key(2))
  new, m = method.update_extras(extras, aux, 0, jax.random.key(3))
  x = np.asarray(batch['image'], np.float64).reshape(16, -1)
  logit = 8.0 * (x.mean(-1) - 0.1)
  ref = g == 1
  bce = np.mean(np.logaddexp(0, -logit[ref])) + np.mean(np.logaddexp(0, logit[~ref]))
  np.testing.assert_allclose(m['disc_bce'], bce, rtol=1e-5)
  acc = (np.sum(logit[ref] > 0) + np.sum(logit[~ref] <= 0)) / 16
  np.testing.assert_allclose(m['disc_accuracy'], acc, rtol=1e-6)
  # The update is one SGD step on that loss: d bce / d scale from the closed form.
  u = x.mean(-1) - 0.1
  dscale = (np.mean(-u[ref] / (1 + np.exp(logit[ref])))
            + np.mean(u[~ref] / (1 + np.exp(-logit[~ref]))))
  np.testing.assert_allclose(new['disc']['params']['scale'], 8.0 - 0.1 * dscale, rtol=1e-5)


class ConstantLogit(nn.Module):
  """A discriminator with one logit c for every input (its T-BCE is known in closed form)."""

  @nn.compact
  def __call__(self, x, t, train=False):
    c = self.param('c', nn.initializers.constant(0.7), ())
    return jnp.full((x.shape[0], 1), c)


def _time_weight_by_hand(weighting, t):
  """lambda(t): 1, or the VP schedule's sigma_t^2 = 1 - alpha_t^2 with
  log alpha_t^2 = -(t^2 (beta_max - beta_min) / 2 + t beta_min), beta 0.1 -> 20."""
  return 1.0 if weighting == 'uniform' else 1 - np.exp(-(0.5 * t ** 2 * 19.9 + 0.1 * t))


@pytest.mark.parametrize('weighting', ['uniform', 'sigma2'])
def test_time_weighted_bce_closed_form_on_unbalanced_sides(weighting):
  """T-BCE of a constant logit c at one t: lambda(t) (softplus(-c) + softplus(c)), each side
  a mean over its own examples (4 reference vs 12 biased); lambda = 1 or sigma_t^2."""
  t0 = 0.3
  clf = nc.NoisyClassifier(ConstantLogit(), 1)
  params = clf.init(jax.random.key(0), (2,))
  x0 = jax.random.normal(jax.random.key(1), (16, 2))
  is_ref = np.r_[np.ones(4), np.zeros(12)].astype(bool)
  loss, m = nc.noised_bce_loss(clf, params, x0, jnp.asarray(is_ref), jnp.asarray(~is_ref),
                               jax.random.key(2), FixedTime(t_fixed=t0), weighting)
  lam = _time_weight_by_hand(weighting, t0)
  c = 0.7
  np.testing.assert_allclose(loss, lam * (np.logaddexp(0, -c) + np.logaddexp(0, c)), rtol=1e-5)
  np.testing.assert_allclose(m['accuracy'], 4 / 16)


class TimeScaledLogits(nn.Module):
  """Three logits c * t for every input: the cross-entropy depends on the t it is given."""

  @nn.compact
  def __call__(self, x, t, train=False):
    c = self.param('c', lambda *_: jnp.array([0.5, -1.0, 2.0]), ())
    return t[:, None] * c[None, :] + 0.0 * x[:, :1]


@pytest.mark.parametrize('weighting', ['uniform', 'sigma2'])
def test_noised_cross_entropy_closed_form_with_a_mask(weighting):
  """Guidance's classifier loss for logits c t at one t: lambda(t) (logsumexp(c t) - c_y t),
  averaged over the masked-in examples only; accuracy likewise (argmax is class 2). A
  classifier handed t = 0 would give log 3 for every label."""
  t0 = 0.3
  clf = nc.NoisyClassifier(TimeScaledLogits(), 3)
  params = clf.init(jax.random.key(0), (2,))
  x0 = jax.random.normal(jax.random.key(1), (8, 2))
  labels = jnp.array([0, 1, 2, 2, 0, 1, 2, 0])
  mask = jnp.array([1, 1, 1, 0, 1, 0, 1, 0], bool)
  loss, m = nc.noised_ce_loss(clf, params, x0, labels, jax.random.key(2),
                              FixedTime(t_fixed=t0), weighting, mask=mask)
  z = t0 * np.array([0.5, -1.0, 2.0])
  ce = np.logaddexp.reduce(z) - z[np.asarray(labels)]
  keep = np.asarray(mask)
  lam = _time_weight_by_hand(weighting, t0)
  np.testing.assert_allclose(loss, lam * ce[keep].mean(), rtol=1e-5)
  np.testing.assert_allclose(m['accuracy'], np.mean(np.asarray(labels)[keep] == 2), rtol=1e-6)


def test_the_feature_head_has_the_depth_it_is_given():
  """method.disc_depth shapes the head on frozen features as it does the MLP (it was
  ignored, the head always had two hidden layers, which is still the default)."""
  x, t = jnp.zeros((3, 5)), jnp.full((3,), 0.5)
  for depth in (1, 2, 3):
    head = nc.build_net('head', 1, hidden=8, depth=depth)
    params = head.init(jax.random.key(0), x, t)['params']
    # time embedding + features + its first layer, depth - 1 more, the output layer
    assert len(params) == 3 + (depth - 1) + 1, sorted(params)
    mlp = nc.build_net('mlp', 1, hidden=8, depth=depth)
    assert mlp.depth == depth


def test_a_loaded_tiw_run_does_not_train_its_discriminator_again(tmp_path, monkeypatch):
  """load_run (and so the sampling command) restores the trained discriminator from the
  checkpoint: the first phase, 20 s and more on a real data set without its cache, is not
  run again to build a state the checkpoint then replaces."""
  from cdiff_jax import checkpoint
  c = _toy_config(disc_pretrain_steps=5)
  data = _toy_dataset()
  exp = train.build(c, data)
  state, _ = train.fit(exp, exp.init_state(), until=2)
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'))
  ckpt.save(2, state, c)
  ckpt.close()
  (tmp_path / 'config.json').write_text(c.to_json_best_effort())
  train.save_training_data(str(tmp_path), data)   # toy data: not loadable from its config

  def no_first_phase(*args, **kwargs):
    raise AssertionError('the discriminator was trained again')

  monkeypatch.setattr(tiw.TIW, '_pretrained', no_first_phase)
  loaded_exp, loaded = train.load_run(str(tmp_path))
  assert int(loaded.step) == 2
  for a, b in zip(jax.tree.leaves(state.extras['disc']), jax.tree.leaves(loaded.extras['disc'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(AssertionError, match='trained again'):   # training builds it as before
    train.build(c, data).init_state()


def test_a_runs_label_names_its_variant_and_temperature():
  """The log line and the class-frequency figure's title tell the arms of a comparison
  apart (all are method.name='tiw')."""
  assert config_lib.method_label(_toy_config(variant='tiw', alpha=0.5)) == 'tiw (tiw, alpha 0.5)'
  assert config_lib.method_label(_toy_config(variant='iw')) == 'tiw (iw, alpha 1)'
  assert config_lib.method_label(_toy_config(variant='dsm_obs')) == 'tiw (dsm_obs)'


def test_a_resumed_run_takes_its_discriminator_from_the_checkpoint(tmp_path, monkeypatch,
                                                                   capfd):
  """A rerun that resumes (after a preemption, or with more train.steps) restores the
  trained discriminator with the state: its pre-training is not run again (it was, on every
  rerun), and the run ends with the parameters of an uninterrupted one. Its learning rate
  is constant, so the longer train.steps draws no warning about the schedule. A checkpoint
  folder with no step to restore (a file named as one) is a fresh start: the discriminator
  is pre-trained."""
  def config(steps):
    c = _toy_config(disc_pretrain_steps=30)
    c.optim.lr_schedule, c.optim.warmup_steps = 'constant', 0
    c.train.steps, c.train.log_every, c.train.checkpoint_every = steps, 2, 2
    c.sample.num_samples, c.sample.num_steps, c.sample.clip = 8, 4, 0.0
    return c

  data = _toy_dataset()
  train.train_and_evaluate(config(4), str(tmp_path / 'run'), data)
  pretrained = []
  real = tiw.TIW._pretrained
  monkeypatch.setattr(tiw.TIW, '_pretrained',
                      lambda self, *a: pretrained.append(1) or real(self, *a))
  capfd.readouterr()
  train.train_and_evaluate(config(8), str(tmp_path / 'run'), data)
  assert not pretrained
  out, err = capfd.readouterr()
  assert 'Resumed from step 4' in out and 'was trained toward' not in out + err, err
  resumed = train.load_run(str(tmp_path / 'run'), data)[1]
  (tmp_path / 'whole' / 'checkpoints').mkdir(parents=True)
  (tmp_path / 'whole' / 'checkpoints' / '3').write_text('')   # named as a step, not one
  train.train_and_evaluate(config(8), str(tmp_path / 'whole'), data)
  assert pretrained == [1]
  whole = train.load_run(str(tmp_path / 'whole'), data)[1]
  chex.assert_trees_all_close(resumed.params, whole.params, atol=1e-6)
  chex.assert_trees_all_equal(resumed.extras['disc']['params'], whole.extras['disc']['params'])
  # Vector samples (they crashed the image-grid writer at the run's end): the array, and
  # for 2-D data a scatter plot.
  final = np.load(tmp_path / 'whole' / 'samples' / 'final.npy')
  assert final.shape == (8, 1) and not (tmp_path / 'whole' / 'samples' / 'final.png').exists()
