"""Guidance and composition: AND/NOT against closed-form Gaussian products, one batched
call over conditions, classifier-free and classifier guidance through the core samplers,
mixtures/differences of energies against the exact toy densities."""

import dataclasses
import types

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

  potential_terms = ScoreModel.potential_terms  # the library's own rule, on this model


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


def test_compositions_that_do_not_fit_are_refused_by_name():
  """A composition built for another batch size, or weights that do not match the
  components: one ValueError naming the fix (a shape error deep in a matmul before)."""
  model = _gaussian_model()
  x = jax.random.normal(jax.random.key(0), (5, 2))
  t = jnp.full((5,), 0.5)
  cond = guidance.make_composition((0, 1), (1.0, 1.0), 4, null_label=2)
  with pytest.raises(ValueError, match='batch of 4 and x has 5 .* batch_size=5'):
    guidance.composed_eps_fn(model, null_label=2)(None, x, t, cond)
  g = toys.ring()
  pot = guidance.combine(guidance.analytic_components([g.log_prob, g.log_prob], SCHED),
                         'product', (1.0,))
  with pytest.raises(ValueError, match='1 weights for 2 components'):
    pot.fn(None, x, t, None)


def test_compositions_differ_per_row():
  """Two compositions stacked along the batch (concepts in either order, one with a NOT):
  each row gets its own product Gaussian, in eps and in the potential's gradient."""
  model = _gaussian_model()
  x = jax.random.normal(jax.random.key(4), (6, 2))
  t = jnp.linspace(0.05, 0.9, 6)
  cond = guidance.stack_compositions([
      guidance.make_composition((0, 1), (2.0, 0.5), 3, null_label=2),
      guidance.make_composition((1, 0), (1.0, -0.5), 3, null_label=2)])
  # Per row, the weights of classes (0, 1).
  want = np.concatenate([_product_gaussian_eps(model, x, t, np.array([2.0, 0.5]))[:3],
                         _product_gaussian_eps(model, x, t, np.array([-0.5, 1.0]))[3:]])
  got = jax.jit(guidance.composed_eps_fn(model, null_label=2))(None, x, t, cond)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  _, grad = jax.jit(guidance.composed_potential(model, null_label=2).fn)(None, x, t, cond)
  np.testing.assert_allclose(grad, want / np.asarray(SCHED.sigma(t))[:, None], rtol=1e-4,
                             atol=1e-5)


def test_composed_potential_of_a_score_only_model():
  """A score-only (eps) model: zero energies, no Metropolis test, and the gradient is the
  composed eps over sigma, i.e. the closed-form product Gaussian's score."""
  model = dataclasses.replace(_gaussian_model(), parameterization='eps')
  pot = guidance.composed_potential(model, null_label=2)
  assert not pot.has_energy
  x = jax.random.normal(jax.random.key(3), (6, 2))
  t = jnp.linspace(0.05, 0.9, 6)
  cond = guidance.make_composition((0, 1), (1.0, -0.5), 6, null_label=2)
  energy, grad = pot.fn(None, x, t, cond)
  np.testing.assert_array_equal(energy, np.zeros(6))
  np.testing.assert_allclose(grad * SCHED.sigma(t)[:, None],
                             _product_gaussian_eps(model, x, t, np.array([1.0, -0.5])),
                             rtol=1e-5, atol=1e-5)


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
  # Errors name the function's arguments, or the config field the composition came from.
  with pytest.raises(ConfigError, match=r'^make_composition\(weights=\(-1.0,\)\): NOT needs '
                                        'at least one positive'):
    guidance.make_composition((1,), (-1.0,), 4, null_label=2)
  with pytest.raises(ConfigError, match=r'^config.sample.compose.concepts: \[7\] are not classes'):
    guidance.make_composition((0, 7), (1.0, -1.0), 4, null_label=2, field='sample.compose')
  with pytest.raises(ConfigError, match=r'^make_composition\(concepts, weights\): give one '):
    guidance.make_composition((0, 1), (1.0,), 4, null_label=2)


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
  # Labels as a Python list and a scalar time: the same answer.
  np.testing.assert_allclose(guidance.cfg_eps(model, params, x, 0.4, [0, 1, 2, 0, 1], 3.0, 3),
                             got, rtol=1e-6)
  for bad in ([0, 1], jnp.zeros((5,)), jnp.zeros((5, 1), jnp.int32)):
    with pytest.raises(ValueError, match=r'one int class per example, shape \(5,\)'):
      guidance.cfg_eps(model, params, x, t, bad, 3.0, 3)


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


def test_conditional_samples_cycle_over_the_trained_classes():
  """sample_labels runs over the classes the model was trained on: every class when all
  were (class i mod C), only the kept ones after data.keep_classes / drop_classes (a class
  it never saw would be a column of noise in the grid and a ghost class in evaluation)."""
  exp = _toy_experiment(1.0)
  np.testing.assert_array_equal(exp.sample_labels(7, offset=2), (2 + np.arange(7)) % 3)
  for field, value in (('keep_classes', (0, 2)), ('drop_classes', (1,))):
    c = exp.config.copy_and_resolve_references()
    c.data[field] = value
    sub = train.build(c, exp.dataset)
    np.testing.assert_array_equal(sub.sample_classes, [0, 2])
    np.testing.assert_array_equal(sub.sample_labels(5, offset=1), [2, 0, 2, 0, 2])


def test_guidance_scale_reaches_every_core_sampler():
  exp = _toy_experiment(4.0)
  state = exp.init_state()
  y = jnp.array([0, 1, 2, 0])
  x = jax.random.normal(jax.random.key(0), (4, 2))
  t = jnp.full((4,), 0.3)
  np.testing.assert_allclose(exp.eps_fn(state.params, x, t, y),
                             guidance.cfg_eps(exp.model, state.params, x, t, y, 4.0, 3),
                             rtol=1e-6)
  from cdiff_jax.sampling.diffusion import Sampler
  sc = exp.config.sample
  by_hand = lambda p, x, t, c: guidance.cfg_eps(exp.model, p, x, t, c, 4.0, 3)
  guided = {}
  for name in SAMPLERS:
    guided[name] = exp.sampler(sampler=name, num_chunks=1)(state.params, jax.random.key(1), 4, y)
    # The same draw from a sampler built by hand over the guided eps.
    want = Sampler(by_hand, exp.model.schedule, exp.image_shape, name, sc.num_steps, sc.eta,
                   sc.clip or None, num_chunks=1)(state.params, jax.random.key(1), 4, y)
    np.testing.assert_allclose(guided[name], want, rtol=1e-4, atol=1e-4, err_msg=name)
  kept = exp.sampler(sampler='ddim', num_chunks=1)
  exp.config.sample.guidance_scale = 1.0
  plain = exp.sampler(sampler='ddim', num_chunks=1)(state.params, jax.random.key(1), 4, y)
  assert not np.allclose(guided['ddim'], plain)
  # A sampler keeps the scale it was built with: a batch size it first traces after the
  # config changed is still guided with 4.0.
  want = Sampler(by_hand, exp.model.schedule, exp.image_shape, 'ddim', sc.num_steps, sc.eta,
                 sc.clip or None, num_chunks=1)(state.params, jax.random.key(2), 2, y[:2])
  np.testing.assert_allclose(kept(state.params, jax.random.key(2), 2, y[:2]), want,
                             rtol=1e-4, atol=1e-4)


def test_the_runs_sampler_checks_its_labels_before_sampling():
  """exp.sampler() refuses labels it would misuse, at any guidance scale, before anything
  runs: a wrong shape (a JAX broadcasting error at scale 1), a class past the last (NaN
  samples), -1 (the null class), labels for an unconditional model (ignored); a list is
  taken as the array."""
  exp = _toy_experiment(1.0)
  state = exp.init_state()
  sampler, key = exp.sampler(num_chunks=1), jax.random.key(0)
  want = sampler(state.params, key, 4, jnp.array([0, 1, 2, 0]))
  np.testing.assert_array_equal(sampler(state.params, key, 4, [0, 1, 2, 0]), want)
  for labels, match in ((jnp.zeros((4, 1), jnp.int32), r'shape \(4,\); got int32 of shape '
                                                       r'\(4, 1\)'),
                        (jnp.zeros(3, jnp.int32), r'shape \(4,\); got int32 of shape \(3,\)'),
                        (jnp.zeros(4), r'one int class per sample.*float32'),
                        (jnp.array([0, 3, 1, 3]), r'labels \[3\] are not classes of this '
                                                  r'model \(0..2\)'),
                        (jnp.array([-1, 0, 0, 0]), r'labels \[-1\] are not classes')):
    with pytest.raises(ValueError, match=match):
      sampler(state.params, key, 4, labels)
  c = exp.config.copy_and_resolve_references()
  c.model.conditional = False
  plain = train.build(c, exp.dataset)
  with pytest.raises(ValueError, match='unconditional model .* would be ignored; pass None'):
    plain.sampler(num_chunks=1)(plain.init_state().params, key, 4, jnp.arange(4) % 3)


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


@pytest.mark.parametrize('w', [1.0, 0.5, 3.0])
def test_classifier_guidance_with_the_bayes_classifier_gives_the_class_model(w):
  """-sigma grad log p(y | x_t) = eps(x_t | y) - eps_u when p(y | x_t) is exact, so guidance
  at scale w gives eps_u + w (eps(x_t | y) - eps_u): at w = 1 the class model. Checks the
  sign, the sigma_t scaling and the scale of classifier guidance."""
  model = _gaussian_model()

  def mixture_eps(params, x, t, cond):  # unconditional = equal mixture of classes 0 and 1
    del params, cond
    e0, eps0 = model.energy_and_eps(None, x, t, jnp.zeros(x.shape[0], jnp.int32))
    e1, eps1 = model.energy_and_eps(None, x, t, jnp.ones(x.shape[0], jnp.int32))
    r = jax.nn.softmax(jnp.stack([-e0, -e1]), axis=0)[..., None]
    return r[0] * eps0 + r[1] * eps1

  guided = guidance.classifier_guided_eps_fn(mixture_eps, BayesClassifier(model), SCHED, w)
  x = jax.random.normal(jax.random.key(5), (6, 2))
  t = jnp.linspace(0.05, 0.8, 6)
  y = jnp.array([0, 1, 0, 1, 0, 1])
  got = guided(dict(model=None, classifier=None), x, t, y)
  eps_u = mixture_eps(None, x, t, None)
  want = eps_u + w * (model.eps(None, x, t, y) - eps_u)
  assert float(jnp.abs(model.eps(None, x, t, y) - eps_u).max()) > 0.5  # the term is there
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


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
  # The default network follows the data: an MLP for vectors (the same classifier), and a
  # convolutional one asked for vectors is refused by name.
  _, auto_params, _ = guidance.train_guidance_classifier(
      ArrayDataset(x, y, 2, 'toy'), SCHED, steps=150, batch_size=64, hidden=32)
  jax.tree.map(np.testing.assert_array_equal, auto_params, params)
  with pytest.raises(ValueError, match="net='conv' needs images"):
    guidance.train_guidance_classifier(ArrayDataset(x, y, 2, 'toy'), SCHED, steps=1, net='conv')
  # ... and a convolutional one for images (3x3 kernels, not only dense layers).
  images = rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32)
  _, image_params, _ = guidance.train_guidance_classifier(
      ArrayDataset(images, y[:8], 2, 'toy'), SCHED, steps=1, batch_size=8)
  assert (3, 3) in {leaf.shape[:2] for leaf in jax.tree.leaves(image_params) if leaf.ndim == 4}


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


def test_cfg_eps_fn_without_labels_is_the_null_model():
  """labels=None samples the unconditional (null-label) model: the exact class-2 Gaussian."""
  model = _gaussian_model()
  x = jax.random.normal(jax.random.key(6), (4, 2))
  t = jnp.linspace(0.1, 0.7, 4)
  got = guidance.cfg_eps_fn(model, 3.0, null_label=2)(None, x, t, None)
  a, s = SCHED.alpha(t)[:, None], SCHED.sigma(t)[:, None]
  var = (a * 1.5) ** 2 + s ** 2                       # class 2: N(0, 1.5^2 I)
  np.testing.assert_allclose(got, s * x / var, rtol=1e-5, atol=1e-6)


def test_guidance_of_a_model_without_classes_or_with_another_null_class_is_refused():
  """An unconditional network ignores labels: its guided and composed samplers sampled it
  unguided, without a word; a wrong null label guided towards a real class instead."""
  from cdiff_jax import config as config_lib
  from cdiff_jax import train
  c = config_lib.base_config()
  c.model.ch, c.model.ch_mult, c.model.attn_levels = 16, (1,), ()
  unconditional = train.build_score_model(c, 10)
  for make in (lambda m, k: guidance.cfg_eps_fn(m, 3.0, k), guidance.composed_eps_fn,
               guidance.composed_potential):
    with pytest.raises(ValueError, match='the model is unconditional'):
      make(unconditional, 10)
  c.model.conditional = True
  conditional = train.build_score_model(c, 10)
  guidance.composed_eps_fn(conditional, 10)   # its null class: num_classes
  with pytest.raises(ValueError, match=r'null_label=9, but this model\'s null class is 10'):
    guidance.cfg_eps_fn(conditional, 3.0, 9)
  # Plain labels given to a composition's sampler (a TypeError about string indexing).
  with pytest.raises(ValueError, match='a composition samples with cond=make_composition'):
    guidance.composed_eps_fn(conditional, 10)(None, jnp.zeros((2, 8, 8, 1)), jnp.ones(2),
                                              jnp.zeros(2, jnp.int32))


def test_composed_potential_equals_the_product_gaussian():
  """Energy-parameterized AND/NOT: the composed gradient is the product Gaussian's score
  (null weight 1 - sum w) and energy differences are the weighted sum of the experts'."""
  model = _gaussian_model()
  pot = guidance.composed_potential(model, null_label=2)
  x = jax.random.normal(jax.random.key(7), (6, 2))
  t = jnp.linspace(0.05, 0.9, 6)
  weights = np.array([1.5, -0.5])
  cond = guidance.make_composition((0, 1), weights, 6, null_label=2)
  energy, grad = jax.jit(pot.fn)(None, x, t, cond)
  s = SCHED.sigma(t)[:, None]
  np.testing.assert_allclose(grad, _product_gaussian_eps(model, x, t, weights) / s,
                             rtol=1e-4, atol=1e-5)
  coefs = np.concatenate([weights, [1.0 - weights.sum()]])
  expected = 0.0
  for k, c in enumerate(coefs):
    mean, var, _ = model._noised(t, jnp.full((6,), k))
    expected = expected + c * 0.5 * jnp.sum((x - mean) ** 2 / var + jnp.log(var), axis=-1)
  np.testing.assert_allclose(energy, expected, rtol=1e-5, atol=1e-5)


def test_mixture_uses_the_log_normalizers():
  """Unnormalized component energies E_k = -log p_k - log Z_k with log_normalizer = log Z_k
  give the exact (normalized) mixture with unequal weights."""
  g1 = toys.GaussianMixture(((0.5, 0.0),), ((0.3, 0.3),), (1.0,))
  g2 = toys.GaussianMixture(((0.0, -0.4),), ((0.5, 0.5),), (1.0,))
  log_z = jnp.array([0.7, -1.3])
  exact_comps = guidance.analytic_components([g1.log_prob, g2.log_prob], SCHED)

  def comps(params, x, t, cond):
    energies, grads = exact_comps(params, x, t, cond)
    return energies - log_z[:, None], grads

  pot = guidance.combine(comps, 'mixture', (0.3, 0.7), log_normalizer=lambda t_: log_z)
  x = jax.random.normal(jax.random.key(8), (5, 2))
  t = jnp.full((5,), 0.2)
  energy, _ = pot.fn(None, x, t, None)
  exact = toys.Mixture((g1, g2), (0.3, 0.7)).log_prob(x, SCHED.alpha(t), SCHED.sigma(t))
  np.testing.assert_allclose(-energy, exact, rtol=1e-5, atol=1e-5)


def test_stacked_models_product_applies_the_weights():
  """product_eps_fn with unequal and negative weights: sum_k w_k eps_k over the stacked
  models (here eps_k = a_k x, so the answer is (sum_k w_k a_k) x)."""
  model = types.SimpleNamespace(eps=lambda p, x, t, cond: p['a'] * x)
  x = jax.random.normal(jax.random.key(9), (4, 2))
  stacked = guidance.stack_params([dict(a=jnp.float32(2.0)), dict(a=jnp.float32(-3.0))])
  got = guidance.product_eps_fn(model, (0.7, -0.4))(stacked, x, jnp.full((4,), 0.5), None)
  np.testing.assert_allclose(got, (0.7 * 2.0 + 0.4 * 3.0) * x, rtol=1e-6)


def test_potential_from_model_gives_the_exact_energy_gradient():
  """The potential of an exact Gaussian model: grad E = (x - a m) / v (eps / sigma_t), for the
  energy and the score-only parameterization; eps_fn_from_potential maps it back to eps."""
  model = _gaussian_model()
  x = jax.random.normal(jax.random.key(10), (6, 2))
  t = jnp.linspace(0.05, 0.9, 6)
  y = jnp.array([0, 1, 2, 0, 1, 2])
  mean, var, _ = model._noised(t, y)
  for m in (model, dataclasses.replace(model, parameterization='eps')):
    pot = mcmc.potential_from_model(m)
    energy, grad = pot.fn(None, x, t, y)
    np.testing.assert_allclose(grad, (x - mean) / var, rtol=1e-5, atol=1e-5)
    assert pot.has_energy == (m.parameterization == 'energy')
    np.testing.assert_allclose(mcmc.eps_fn_from_potential(pot, SCHED)(None, x, t, y),
                               model.eps(None, x, t, y), rtol=1e-5, atol=1e-6)
  energy = mcmc.potential_from_model(model).fn(None, x, t, y)[0]
  np.testing.assert_allclose(energy, 0.5 * jnp.sum((x - mean) ** 2 / var + jnp.log(var), axis=-1),
                             rtol=1e-5)


def test_noised_smooth_box_matches_quadrature():
  """SmoothBox.log_prob at (alpha, sigma) = log of int U(u; lo, hi) N(x; alpha u,
  alpha^2 tau^2 + sigma^2) du per axis, by midpoint quadrature over u."""
  b = toys.SmoothBox((-0.2, -0.6), (0.4, 1.0), tau=0.05)
  x = np.random.default_rng(1).uniform(-1.0, 1.0, (16, 2)).astype(np.float32)
  for alpha, sigma in ((1.0, 0.0), (0.8, 0.3), (0.3, 0.9)):
    got = np.asarray(b.log_prob(jnp.asarray(x), alpha, sigma))
    var = (alpha * b.tau) ** 2 + sigma ** 2
    expected = 0.0
    for d in range(2):
      n = 4000
      u = b.lo[d] + (b.hi[d] - b.lo[d]) * (np.arange(n) + 0.5) / n
      dens = np.exp(-(x[:, d, None] - alpha * u) ** 2 / (2 * var)) / np.sqrt(2 * np.pi * var)
      expected = expected + np.log(dens.mean(1))
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)


def _grid_integral(log_prob, bounds=1.6, num=200):
  pts, cell = toys.grid_points(bounds, num)
  return float(np.sum(np.exp(np.asarray(jax.jit(log_prob)(jnp.asarray(pts)), np.float64))) * cell)


def test_the_ring_has_eight_equal_modes_evenly_around_the_circle():
  """The benchmarks' ring (the tests build their references from it too, so its geometry
  is pinned here): 8 modes of radius 0.5, 45 degrees apart, equal weights and widths."""
  means, stds, weights = toys.ring().arrays
  np.testing.assert_allclose(np.linalg.norm(means, axis=1), 0.5, rtol=1e-6)
  angles = np.sort(np.mod(np.arctan2(means[:, 1], means[:, 0]), 2 * np.pi))
  np.testing.assert_allclose(np.diff(angles), 2 * np.pi / 8, rtol=1e-5)
  np.testing.assert_allclose(means.mean(0), 0.0, atol=1e-6)
  assert np.all(stds == stds[0, 0]) and np.all(weights == weights[0])


def test_toy_targets_are_normalized_densities():
  """Every composed target integrates to 1 on a grid (the ring-x-bar normalizer, unequal
  mixture weights), and the box difference is flat, 1 / (|A| - |B|), on A minus B and 0 on B."""
  ring, vbar, hbar = toys.ring(), toys.vertical_bar(), toys.horizontal_bar()
  assert abs(_grid_integral(toys.ProductTarget(ring, vbar).log_prob) - 1.0) < 1e-2
  assert abs(_grid_integral(toys.Mixture((vbar, hbar), (1.0, 3.0)).log_prob) - 1.0) < 1e-2
  diff = toys.BoxDifference(toys.box(1.0, tau=0.01), toys.box(0.5, tau=0.01))
  assert abs(_grid_integral(diff.log_prob, 1.2) - 1.0) < 1e-2
  ring_pts = jnp.asarray([[0.75, 0.0], [-0.1, 0.8], [-0.9, -0.9], [0.6, -0.7]])
  np.testing.assert_allclose(np.exp(diff.log_prob(ring_pts)), 1.0 / (4.0 - 1.0), rtol=1e-4)
  assert np.all(np.exp(np.asarray(diff.log_prob(jnp.asarray([[0.0, 0.0], [0.3, -0.2]])))) < 1e-6)


def test_box_difference_is_finite_inside_the_hole():
  """Inside the inner box the blurred difference is tiny but positive: the masses of the two
  strips between the boxes, ~Phi(-d / tau). Computed as a signed mixture of the two boxes it
  cancelled to -inf there (NaN gradients). Against float64 where float64 resolves it; deep in
  the hole (beyond float64) against the strips' leading term."""
  from scipy.special import log_ndtr as log_ndtr64, ndtr
  diff = toys.benchmarks()['negation'].target           # [-1, 1]^2 minus [-0.5, 0.5]^2
  outer, inner, tau = diff.outer, diff.inner, diff.outer.tau

  def float64(p, alpha, sigma):
    w = np.hypot(alpha * tau, sigma)
    mass = lambda b: np.prod(ndtr((p - alpha * np.asarray(b.lo)) / w)
                             - ndtr((p - alpha * np.asarray(b.hi)) / w), -1)
    return np.log((mass(outer) - mass(inner)) / (alpha ** 2 * (outer.area - inner.area)))

  pts = np.array([[0.3, 0.0], [0.4, -0.4], [0.9, 0.9], [0.5, 0.1], [1.2, 0.0], [0.0, 0.7]])
  for alpha, sigma in ((1.0, 0.0), (0.9, 0.3), (0.5, 0.8)):
    got = np.asarray(diff.log_prob(jnp.asarray(pts, jnp.float32), alpha, sigma))
    np.testing.assert_allclose(got, float64(pts, alpha, sigma), rtol=1e-4, atol=1e-4)
  assert float(diff.log_prob(jnp.asarray([[0.3, 0.0]]))[0]) == pytest.approx(-26.158, abs=1e-2)
  # The centre, 0.5 / tau = 16.7 blur widths from both strips of both axes.
  strip = log_ndtr64(-0.5 / tau)
  centre = np.log(4) + strip - np.log(outer.area - inner.area)
  assert float(diff.log_prob(jnp.zeros((1, 2)))[0]) == pytest.approx(centre, abs=0.01)
  grad = jax.grad(lambda p: diff.log_prob(p[None])[0])(jnp.asarray([0.3, 0.0]))
  assert np.all(np.isfinite(np.asarray(grad))) and float(grad[0]) > 100  # towards the strip


def _chi_square_against_density(samples, log_prob, bounds=1.4, bins=28, sub=8):
  """Pearson's statistic of the samples' 2-D histogram against the bin masses of
  exp(log_prob) (midpoint rule on sub x sub points per bin), with the mass outside the grid
  as one more bin; returns (statistic, degrees of freedom)."""
  edges = np.linspace(-bounds, bounds, bins + 1)
  width = edges[1] - edges[0]
  fine = -bounds + (np.arange(bins * sub) + 0.5) * width / sub
  pts = np.stack(np.meshgrid(fine, fine, indexing='ij'), -1).reshape(-1, 2)
  dens = np.exp(np.asarray(jax.jit(log_prob)(jnp.asarray(pts, jnp.float32)), np.float64))
  mass = dens.reshape(bins, sub, bins, sub).sum((1, 3)) * (width / sub) ** 2
  n = len(samples)
  counts = np.histogram2d(samples[:, 0], samples[:, 1], [edges, edges])[0]
  expected = np.append(n * mass.ravel(), n * max(1.0 - mass.sum(), 0.0))
  observed = np.append(counts.ravel(), n - counts.sum())
  use = expected >= 5
  rest_e, rest_o = expected[~use].sum(), observed[~use].sum()
  stat = np.sum((observed[use] - expected[use]) ** 2 / expected[use])
  stat += (rest_o - rest_e) ** 2 / max(rest_e, 1.0)
  return stat, int(use.sum())


def test_toy_samplers_draw_from_their_densities():
  """Each target's ``sample`` (rejection for the product and the box difference, the blur,
  the mixture's weights) against its ``log_prob``: Pearson's chi-square of a 28 x 28 grid of
  100k samples stays within 6 standard deviations of its degrees of freedom (measured: 77 /
  72, 228 / 224, 459 / 416, 131 / 160). Blur-free bars give 7,152 (224), a blur-free box
  difference 5,652 (416), swapped mixture weights 100,305, no hole or no rejection 10^7."""
  ring, vbar, hbar = toys.ring(), toys.vertical_bar(), toys.horizontal_bar()
  targets = {
      'product': toys.ProductTarget(ring, vbar),
      'mixture': toys.Mixture((vbar, hbar), (1.0, 3.0)),
      'difference': toys.BoxDifference(toys.box(1.0), toys.box(0.5)),
      'ring': ring,
  }
  for i, (name, target) in enumerate(targets.items()):
    x = target.sample(np.random.default_rng(i), 100_000)
    assert x.shape == (100_000, 2), name
    stat, dof = _chi_square_against_density(x, target.log_prob)
    assert stat < dof + 6 * np.sqrt(2 * dof), (name, stat, dof)


def test_sliced_wasserstein_of_a_shifted_sample_set():
  """Shifting a sample set by d moves every projection by <d, theta>: SW2 = |d| / sqrt(2) in
  2-D (up to the Monte Carlo error of the random directions); 0 against itself."""
  a = np.random.default_rng(0).standard_normal((500, 2))
  assert toys.sliced_wasserstein(a, a) < 1e-9
  d = np.array([3.0, 0.0])
  got = toys.sliced_wasserstein(a, a + d, num_projections=2000)
  assert abs(got - 3.0 / np.sqrt(2)) < 0.05 * 3.0 / np.sqrt(2), got


def test_sliced_wasserstein_quantiles_are_numpys():
  """The sorted-sample quantiles are numpy's 'linear' quantiles (a second implementation),
  for equal and unequal set sizes."""
  rng = np.random.default_rng(3)
  for n_a, n_b in ((300, 300), (200, 450), (37, 5)):
    a, b = rng.standard_normal((n_a, 2)), 2.0 * rng.standard_normal((n_b, 2)) + 1.0
    dirs = np.random.default_rng(0).standard_normal((64, 2))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    n = max(n_a, n_b)
    levels = (np.arange(n) + 0.5) / n
    qa, qb = (np.quantile(s @ dirs.T, levels, axis=0, method='linear') for s in (a, b))
    want = float(np.sqrt(np.mean((qa - qb) ** 2)))
    assert toys.sliced_wasserstein(a, b, num_projections=64) == pytest.approx(want, rel=1e-12)


def test_signed_mixture_is_floored_at_a_fraction_of_its_positive_part():
  """Where a signed mixture's sum is negative (w = (1, -2) on one density p) the density is
  floor * (positive part) = floor * p: E = -log(floor) - log p, grad = -grad log p."""
  g = toys.GaussianMixture(((0.3, -0.2),), ((0.4, 0.4),), (1.0,))
  pot = guidance.combine(guidance.analytic_components([g.log_prob, g.log_prob], SCHED),
                         'mixture', (1.0, -2.0), floor=1e-3)
  x = jax.random.normal(jax.random.key(11), (5, 2))
  t = jnp.full((5,), 0.3)
  a, s = SCHED.alpha(t), SCHED.sigma(t)
  energy, grad = jax.jit(pot.fn)(None, x, t, None)
  grad_log_p = jax.jit(jax.grad(lambda x_: jnp.sum(g.log_prob(x_, a, s))))(x)
  np.testing.assert_allclose(energy, -np.log(1e-3) - g.log_prob(x, a, s), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad, -grad_log_p, rtol=1e-4, atol=1e-5)


def test_score_only_components_admit_no_metropolis_test_and_no_mixture():
  """Components of score-only (eps) models have zero energies: their product potential says
  so (MALA and HMC are refused, ULA runs) and a mixture, weighed by energies, is refused;
  an energy model's components keep their energies. Analytic components have energies."""
  for parameterization, has_energy in (('eps', False), ('energy', True)):
    model = ScoreModel(MLPScore(hidden=8, depth=1), SCHED, parameterization)
    comps = guidance.model_components(model)
    pot = guidance.combine(comps, 'product', (1.0, 1.0))
    assert pot.has_energy is has_energy
    if has_energy:
      guidance.combine(comps, 'mixture', (0.5, 0.5))
      mcmc.AnnealedMCMC(pot, SCHED, (2,), kind='mala', num_steps=2, steps_per_level=1)
    else:
      with pytest.raises(ConfigError, match="mixture weighs its components by their energies"):
        guidance.combine(comps, 'mixture', (0.5, 0.5))
      with pytest.raises(mcmc.SettingError, match='Metropolis test needs energies'):
        mcmc.AnnealedMCMC(pot, SCHED, (2,), kind='mala', num_steps=2, steps_per_level=1)
      mcmc.AnnealedMCMC(pot, SCHED, (2,), kind='ula', num_steps=2, steps_per_level=1)
  comps = guidance.analytic_components([toys.GaussianMixture(((0.0, 0.0),), ((1.0, 1.0),),
                                                             (1.0,)).log_prob], SCHED)
  assert guidance.combine(comps, 'product', (1.0,)).has_energy


def test_toy_samples_take_a_seed_and_any_dimension():
  """An int seed draws what np.random.default_rng(seed) draws; a mixture of 3-D Gaussians
  samples in 3-D with its components' moments (the sampler was 2-D only)."""
  ring = toys.ring()
  np.testing.assert_array_equal(ring.sample(3, 50), ring.sample(np.random.default_rng(3), 50))
  mix = toys.GaussianMixture(((0.0, 1.0, -1.0),), ((0.5, 0.2, 1.0),), (1.0,))
  x = mix.sample(0, 20_000)
  assert x.shape == (20_000, 3)
  np.testing.assert_allclose(x.mean(0), [0.0, 1.0, -1.0], atol=0.03)
  np.testing.assert_allclose(x.std(0), [0.5, 0.2, 1.0], rtol=0.03)
  # Its density in 3-D: the product of the three normal densities.
  from scipy.stats import norm
  p = np.asarray([[0.1, 0.9, -0.5]], np.float32)
  want = sum(norm.logpdf(p[0, d], m, s) for d, (m, s) in enumerate(zip((0.0, 1.0, -1.0),
                                                                        (0.5, 0.2, 1.0))))
  assert float(mix.log_prob(jnp.asarray(p))[0]) == pytest.approx(want, rel=1e-5)


def test_a_long_thin_box_difference_is_exact_where_only_its_short_side_is_a_speck():
  """A 2 x 0.2 frame minus a 1 x 0.1 hole, noised at alpha 0.08, sigma 0.2: the short side
  is far below the noise, the long one is not, so the exact form holds (the Gaussian stand-in
  for a speck is off by 0.05 in log density here); against midpoint quadrature in float64."""
  d = toys.BoxDifference(toys.SmoothBox((-1.0, -0.1), (1.0, 0.1)),
                         toys.SmoothBox((-0.5, -0.05), (0.5, 0.05)))
  a, s = 0.08, 0.2
  w2 = (a * 0.03) ** 2 + s ** 2
  u1 = np.linspace(-1, 1, 2001)
  u2 = np.linspace(-0.1, 0.1, 201)
  u1, u2 = np.meshgrid((u1[1:] + u1[:-1]) / 2, (u2[1:] + u2[:-1]) / 2)
  frame = ~((np.abs(u1) <= 0.5) & (np.abs(u2) <= 0.05))
  xs = np.array([[0.0, 0.0], [0.3, 0.1], [0.6, -0.2], [-0.9, 0.0]])
  kernel = lambda x: np.exp(-((x[0] - a * u1) ** 2 + (x[1] - a * u2) ** 2) / (2 * w2)) / (2 * np.pi * w2)
  want = [np.log((kernel(x) * frame).sum() * (2 / 2000) * (0.2 / 200) / (0.4 - 0.1)) for x in xs]
  np.testing.assert_allclose(d.log_prob(jnp.asarray(xs, jnp.float32), a, s), want, atol=2e-5)


def test_noised_boxes_are_exact_down_to_alpha_zero():
  """As alpha -> 0 a noised box tends to N(alpha * mean, sigma^2 I); the exact formula
  (Phi(u) - Phi(v) of nearly equal u, v, over alpha) lost digits there (8e-4 at alpha =
  1e-3) and was NaN at alpha = 0. Against float64 at every alpha, N(0, sigma^2 I) at 0 with
  finite gradients, for the blurred box and the box difference."""
  from scipy.special import ndtr
  from scipy.stats import norm
  box = toys.SmoothBox((-0.2, -0.6), (0.4, 1.0), tau=0.05)
  diff = toys.benchmarks()['negation'].target
  x = np.random.default_rng(0).standard_normal((400, 2)).astype(np.float32)

  def mass(b, p, alpha, w):
    lo, hi = np.asarray(b.lo), np.asarray(b.hi)
    return np.prod(ndtr((p - alpha * lo) / w) - ndtr((p - alpha * hi) / w), -1)

  p = x.astype(np.float64)
  for alpha in (0.3, 0.06, 0.05, 0.03, 1e-3, 1e-5):
    w = np.hypot(alpha * box.tau, 1.0)
    want = np.log(mass(box, p, alpha, w) / (alpha ** 2 * box.area))
    np.testing.assert_allclose(box.log_prob(x, alpha, 1.0), want, atol=3e-5, err_msg=alpha)
    w = np.hypot(alpha * diff.outer.tau, 1.0)
    want = np.log((mass(diff.outer, p, alpha, w) - mass(diff.inner, p, alpha, w))
                  / (alpha ** 2 * (diff.outer.area - diff.inner.area)))
    np.testing.assert_allclose(diff.log_prob(x, alpha, 1.0), want, atol=3e-5, err_msg=alpha)
  for target in (box, diff):
    np.testing.assert_allclose(target.log_prob(x, 0.0, 0.7), norm.logpdf(x, 0, 0.7).sum(-1),
                               atol=1e-5)
    grad = jax.grad(lambda q: target.log_prob(q, 0.0, 0.7))(jnp.ones(2))
    np.testing.assert_allclose(grad, -np.ones(2) / 0.49, rtol=1e-5)


def test_box_difference_moments_match_its_samples():
  """The mean and covariance of an off-centre box difference in 3-D (the Gaussian it tends
  to at small alpha) against 200k exact samples (blur tau^2 added to the covariance)."""
  diff = toys.BoxDifference(toys.SmoothBox((-1, -1, -1), (1, 1, 1)),
                            toys.SmoothBox((0, -0.5, 0), (1, 0.5, 1)))
  mean, cov = diff.moments
  x = diff.sample(0, 200_000)
  assert x.shape == (200_000, 3)
  np.testing.assert_allclose(x.mean(0), mean, atol=4e-3)
  np.testing.assert_allclose(np.cov(x.T), cov + diff.outer.tau ** 2 * np.eye(3), atol=4e-3)
  assert abs(cov[0, 2]) > 0.02 and mean[0] < -0.05        # off-centre, correlated


def test_toy_log_probs_take_one_point():
  """``log_prob`` of one point of shape (D,) is the scalar of the same point in a batch;
  other ranks are refused by name."""
  bench = toys.benchmarks()
  pt = jnp.asarray([0.35, -0.2])
  targets = [toys.ring(), toys.vertical_bar(), bench['negation'].target,
             bench['product'].target, toys.Mixture((toys.vertical_bar(), toys.box(0.5)), (1, 2))]
  for target in targets:
    one = target.log_prob(pt)
    assert one.shape == (), type(target)
    assert float(one) == pytest.approx(float(target.log_prob(pt[None])[0]), rel=1e-6)
  with pytest.raises(ValueError, match=r'shape \(B, D\) or one point of shape \(D,\)'):
    toys.ring().log_prob(jnp.zeros((2, 3, 2)))
