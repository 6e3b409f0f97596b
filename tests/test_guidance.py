"""Guidance and composition: AND/NOT against closed-form Gaussian products, one batched
call over conditions, classifier-free and classifier guidance through the core samplers,
mixtures/differences of energies against the exact toy densities."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdiff_jax import schedules, toys, train
from cdiff_jax.config import ConfigError, base_config, validate
from cdiff_jax.data.sources import ArrayDataset
from cdiff_jax.methods import guidance
from cdiff_jax.models import MLPScore, ScoreModel
from cdiff_jax.sampling import SAMPLERS, mcmc

SCHED = schedules.DDPMSchedule()


@dataclasses.dataclass(eq=False)
class GaussianClasses:
  """An exact 'conditional model': class y is N(means[y], stds[y]^2 I) in 2-D; the last
  class plays the null (unconditional) label. Counts its own calls while being traced."""

  means: np.ndarray
  stds: np.ndarray
  schedule: schedules.Schedule = SCHED
  parameterization: str = 'energy'
  calls: int = 0

  def _noised(self, t, y):
    a, s = self.schedule.alpha(t)[:, None], self.schedule.sigma(t)[:, None]
    mean = a * jnp.asarray(self.means, jnp.float32)[y]
    var = (a * jnp.asarray(self.stds, jnp.float32)[y][:, None]) ** 2 + s ** 2
    return mean, var, s

  def energy_and_eps(self, params, x, t, y):
    self.calls += 1
    mean, var, s = self._noised(t, y)
    energy = 0.5 * jnp.sum((x - mean) ** 2 / var + jnp.log(var), axis=-1)
    return energy, s * (x - mean) / var

  def eps(self, params, x, t, y):
    return self.energy_and_eps(params, x, t, y)[1]


def _gaussian_model():
  # classes 0, 1: the experts; class 2: the null / unconditional (broad) Gaussian.
  return GaussianClasses(np.array([[0.5, 0.0], [0.0, -0.4], [0.0, 0.0]]),
                         np.array([0.3, 0.5, 1.5]))


def _product_gaussian_eps(model, x, t, weights):
  """eps of prod_k N_k^{w_k} * N_u^{1 - sum w}: precisions and precision-weighted means add."""
  coefs = np.concatenate([weights, [1.0 - np.sum(weights)]])
  prec, lin = 0.0, 0.0
  for k, c in enumerate(coefs):
    mean, var, s = model._noised(t, jnp.full((x.shape[0],), k))
    prec = prec + c / var
    lin = lin + c * mean / var
  return s * (prec * x - lin)


@pytest.mark.parametrize('weights', [(1.0, 1.0), (2.0, 0.5), (1.0, -0.5)])
def test_and_not_of_gaussian_experts_equals_the_product_gaussian(weights):
  model = _gaussian_model()
  x = jax.random.normal(jax.random.key(0), (6, 2))
  t = jnp.linspace(0.05, 0.9, 6)
  cond = guidance.make_composition((0, 1), weights, 6, null_label=2)
  eps_fn = jax.jit(guidance.composed_eps_fn(model, null_label=2))
  got = eps_fn(None, x, t, cond)
  np.testing.assert_allclose(got, _product_gaussian_eps(model, x, t, np.array(weights)),
                             rtol=1e-5, atol=1e-5)
  # All conditions (and the null one) went through the model in ONE traced call.
  assert model.calls == 1


def test_product_of_separate_experts_equals_product_gaussian_score():
  """AND of two separately given Gaussian experts (no unconditional model): the composed
  energy's gradient is the score of the product Gaussian."""
  g1 = toys.GaussianMixture(((0.5, 0.0),), ((0.3, 0.3),), (1.0,))
  g2 = toys.GaussianMixture(((0.0, -0.4),), ((0.5, 0.5),), (1.0,))
  pot = guidance.combine(guidance.analytic_components([g1.log_prob, g2.log_prob], SCHED),
                         'product', (1.0, 1.0))
  x = jax.random.normal(jax.random.key(1), (5, 2))
  t = jnp.full((5,), 0.2)
  _, grad = pot.fn(None, x, t, None)
  a, s = SCHED.alpha(t)[:, None], SCHED.sigma(t)[:, None]
  v1, v2 = (a * 0.3) ** 2 + s ** 2, (a * 0.5) ** 2 + s ** 2
  m1, m2 = a * jnp.array([0.5, 0.0]), a * jnp.array([0.0, -0.4])
  prec = 1 / v1 + 1 / v2
  mean = (m1 / v1 + m2 / v2) / prec
  np.testing.assert_allclose(grad, prec * (x - mean), rtol=1e-5, atol=1e-5)


def test_not_weight_signs():
  """A negative weight raises the energy where the negated concept is likely, a positive
  one lowers it; and a composition with only negative weights is refused."""
  model = _gaussian_model()
  pot = guidance.composed_potential(model, null_label=2)
  at_concept_1 = jnp.asarray([[0.0, -0.4]])
  elsewhere = jnp.asarray([[0.5, 0.0]])
  t = jnp.full((1,), 0.1)

  def gap(w1):
    cond = guidance.make_composition((0, 1), (1.0, w1), 1, null_label=2)
    return float(pot.fn(None, at_concept_1, t, cond)[0][0] - pot.fn(None, elsewhere, t, cond)[0][0])

  assert gap(-1.0) > gap(0.0) > gap(1.0)
  with pytest.raises(ConfigError, match='NOT needs at least one positive'):
    guidance.make_composition((1,), (-1.0,), 4, null_label=2)
  with pytest.raises(ConfigError, match='not classes'):
    guidance.make_composition((0, 7), (1.0, -1.0), 4, null_label=2)


def test_composed_energy_and_gradient_agree():
  """For every composition kind, the gradient returned with a composed energy is that
  energy's gradient (finite differences), with learned-style energy networks."""
  model = ScoreModel(MLPScore(hidden=32, depth=2), SCHED, 'energy')
  x = jax.random.normal(jax.random.key(2), (4, 2)) * 0.5
  t = jnp.full((4,), 0.3)
  stacked = guidance.stack_params([model.init(jax.random.key(i), x, t) for i in range(3)])
  comps = guidance.model_components(model)
  h = 1e-2
  # x, then x +- h e_d for d = 0, 1: one batched call per composition.
  shifts = [jnp.zeros(2), h * jnp.eye(2)[0], -h * jnp.eye(2)[0], h * jnp.eye(2)[1], -h * jnp.eye(2)[1]]
  xs = jnp.concatenate([x + d for d in shifts])
  ts = jnp.concatenate([t] * len(shifts))
  for kind, w in (('product', (1.0, -0.5, 0.7)), ('mixture', (0.5, 0.5, 0.2)),
                  ('mixture', (1.2, 0.3, -0.5))):
    pot = guidance.combine(comps, kind, w, log_normalizer=lambda t_: jnp.array([0.1, -0.2, 0.3]))
    energy, grad = jax.jit(pot.fn)(stacked, xs, ts, None)
    e = energy.reshape(5, 4)
    for d in range(2):
      fd = (e[1 + 2 * d] - e[2 + 2 * d]) / (2 * h)
      np.testing.assert_allclose(grad[:4, d], fd, rtol=2e-2, atol=2e-3)


def test_mixture_and_box_difference_match_the_exact_noised_targets():
  """-logsumexp of normalized component energies is the exact mixture at every noise
  level; with a negative weight it is the box minus the smaller box."""
  bench = toys.benchmarks()
  x = jnp.asarray(np.random.default_rng(0).uniform(-1.2, 1.2, (64, 2)).astype(np.float32))
  for name in ('mixture', 'negation'):
    b = bench[name]
    pot = guidance.combine(guidance.analytic_components([c.log_prob for c in b.components], SCHED),
                           'mixture', b.weights)

    @jax.jit
    def both(x, t, b=b, pot=pot):
      a, s = SCHED.alpha(t), SCHED.sigma(t)
      exact, exact_grad = jax.value_and_grad(lambda x_: jnp.sum(b.target.log_prob(x_, a, s)))(x)
      return pot.fn(None, x, t, None), b.target.log_prob(x, a, s), exact_grad

    for t0 in (0.02, 0.3):
      (energy, grad), exact, exact_grad = both(x, jnp.full((64,), t0))
      ok = np.isfinite(np.asarray(exact)) & (np.asarray(exact) > -8)
      np.testing.assert_allclose(-energy[ok], exact[ok], rtol=1e-4, atol=1e-4)
      np.testing.assert_allclose(-grad[ok], exact_grad[ok], rtol=1e-3, atol=2e-3)
      assert np.all(np.isfinite(np.asarray(energy)))  # floored inside the removed box


def test_stacked_models_product_is_one_vmapped_sum():
  model = ScoreModel(MLPScore(hidden=16, depth=1), SCHED, 'eps')
  x = jax.random.normal(jax.random.key(3), (4, 2))
  t = jnp.full((4,), 0.5)
  params = [model.init(jax.random.key(i), x, t) for i in range(2)]
  got = guidance.product_eps_fn(model, (1.0, 1.0))(guidance.stack_params(params), x, t, None)
  np.testing.assert_allclose(got, model.eps(params[0], x, t) + model.eps(params[1], x, t),
                             rtol=1e-5, atol=1e-6)
  other = ScoreModel(MLPScore(hidden=8, depth=1), SCHED, 'eps').init(jax.random.key(0), x, t)
  with pytest.raises(ValueError, match='same family'):
    guidance.stack_params([params[0], other])


def test_cfg_combination_in_one_call():
  model = ScoreModel(MLPScore(hidden=16, depth=1, num_classes=3), SCHED, 'eps')
  x = jax.random.normal(jax.random.key(4), (5, 2))
  t = jnp.full((5,), 0.4)
  y = jnp.array([0, 1, 2, 0, 1])
  params = model.init(jax.random.key(0), x, t, y)
  eps_c, eps_u = model.eps(params, x, t, y), model.eps(params, x, t, jnp.full((5,), 3))
  got = guidance.cfg_eps(model, params, x, t, y, 3.0, null_label=3)
  np.testing.assert_allclose(got, eps_u + 3.0 * (eps_c - eps_u), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(guidance.cfg_eps(model, params, x, t, y, 1.0, 3), eps_c, rtol=1e-6)


def _toy_experiment(scale):
  c = base_config()
  c.data.name = 'toy'
  c.model.name, c.model.hidden, c.model.depth = 'mlp', 16, 1
  c.model.conditional, c.model.class_dropout = True, 0.1
  c.train.batch_size, c.train.compilation_cache = 8, False
  c.sample.num_steps, c.sample.clip, c.sample.guidance_scale = 4, 0.0, scale
  rng = np.random.default_rng(0)
  data = ArrayDataset(rng.standard_normal((64, 2)).astype(np.float32),
                      rng.integers(0, 3, 64), 3, 'toy')
  return train.build(c, data)


def test_guidance_scale_reaches_every_core_sampler():
  exp = _toy_experiment(4.0)
  state = exp.init_state()
  y = jnp.array([0, 1, 2, 0])
  x = jax.random.normal(jax.random.key(0), (4, 2))
  t = jnp.full((4,), 0.3)
  np.testing.assert_allclose(exp.eps_fn(state.params, x, t, y),
                             guidance.cfg_eps(exp.model, state.params, x, t, y, 4.0, 3),
                             rtol=1e-6)
  guided = {}
  for name in SAMPLERS:
    guided[name] = exp.sampler(sampler=name, num_chunks=1)(state.params, jax.random.key(1), 4, y)
    assert np.all(np.isfinite(np.asarray(guided[name]))), name
  exp.config.sample.guidance_scale = 1.0
  plain = exp.sampler(sampler='ddim', num_chunks=1)(state.params, jax.random.key(1), 4, y)
  assert not np.allclose(guided['ddim'], plain)


def test_guidance_config_errors_name_the_field():
  c = base_config()
  c.sample.guidance_scale = 3.0
  with pytest.raises(ConfigError, match=r'sample\.guidance_scale.*model\.conditional'):
    validate(c)
  c.model.conditional, c.model.class_dropout = True, 0.0
  with pytest.raises(ConfigError, match='class_dropout'):
    validate(c)


@dataclasses.dataclass(frozen=True)
class BayesClassifier:
  """The exact posterior p(y | x_t) of a two-Gaussian mixture, as a noisy classifier."""

  model: GaussianClasses

  def example_logits(self, params, x, t, frozen=None):
    del params, frozen
    t = jnp.reshape(t, (1,))
    logits = []
    for k in (0, 1):
      mean, var, _ = self.model._noised(t, jnp.array([k]))
      logits.append(-0.5 * jnp.sum((x - mean[0]) ** 2 / var[0] + jnp.log(var[0])))
    return jnp.stack(logits)  # equal class priors


def test_classifier_guidance_with_the_bayes_classifier_gives_the_class_model():
  """eps_u - sigma grad log p(y | x_t) = eps(x_t | y) when p(y | x_t) is exact: checks the
  sign and the sigma_t scaling of classifier guidance (w = 1)."""
  model = _gaussian_model()

  def mixture_eps(params, x, t, cond):  # unconditional = equal mixture of classes 0 and 1
    del params, cond
    e0, eps0 = model.energy_and_eps(None, x, t, jnp.zeros(x.shape[0], jnp.int32))
    e1, eps1 = model.energy_and_eps(None, x, t, jnp.ones(x.shape[0], jnp.int32))
    r = jax.nn.softmax(jnp.stack([-e0, -e1]), axis=0)[..., None]
    return r[0] * eps0 + r[1] * eps1

  guided = guidance.classifier_guided_eps_fn(mixture_eps, BayesClassifier(model), SCHED, 1.0)
  x = jax.random.normal(jax.random.key(5), (6, 2))
  t = jnp.linspace(0.05, 0.8, 6)
  y = jnp.array([0, 1, 0, 1, 0, 1])
  got = guided(dict(model=None, classifier=None), x, t, y)
  np.testing.assert_allclose(got, model.eps(None, x, t, y), rtol=1e-4, atol=1e-5)


def test_guidance_classifier_trains_on_noised_data():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 2, 512)
  x = (np.where(y[:, None] == 0, -0.6, 0.6) + 0.2 * rng.standard_normal((512, 2))).astype(np.float32)
  clf, params, metrics = guidance.train_guidance_classifier(
      ArrayDataset(x, y, 2, 'toy'), SCHED, steps=150, batch_size=64, net='mlp', hidden=32)
  # Noised inputs at random t: well above chance, not perfect (t near 1 is pure noise).
  assert 0.6 < metrics['accuracy'] < 0.98
  logits = clf.logits(params, jnp.asarray(x[:64]), jnp.zeros(64))
  assert float(jnp.mean(logits.argmax(-1) == y[:64])) > 0.95


def test_classifier_guided_sampling_same_with_loop_friendly_gradients():
  """A ConvClassifier (stride-1 and stride-2 convs) differentiated inside the compiled DDIM
  loop gives the same samples with loop-friendly gradients as with XLA's own, and the
  guidance term is really there (the samples move with the labels)."""
  from cdiff_jax.methods import noisy_classifier as nc
  from cdiff_jax.sampling.diffusion import Sampler
  clf = nc.NoisyClassifier(nc.build_net('conv', 3, ch=8, ch_mult=(1, 2), num_groups=4), 3)
  params = dict(model=None, classifier=clf.init(jax.random.key(0), (8, 8, 1)))
  eps_fn = lambda p, x, t, c: 0.1 * x   # a stand-in diffusion model
  out = {}
  for friendly in (False, True):
    guided = guidance.classifier_guided_eps_fn(eps_fn, clf, SCHED, 3.0,
                                               loop_friendly_grads=friendly)
    s = Sampler(guided, SCHED, (8, 8, 1), 'ddim', 8)
    out[friendly] = [np.asarray(s(params, jax.random.key(1), 4, jnp.full((4,), y)))
                     for y in (0, 2)]
  for a, b in zip(out[False], out[True]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  assert np.abs(out[True][0] - out[True][1]).max() > 1e-3
