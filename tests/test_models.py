"""Network shapes at every supported size, conditioning, and the energy parameterization."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdiff_jax import schedules
from cdiff_jax.models import ConvClassifier, MLPScore, ScoreModel, UNet


@pytest.mark.parametrize('size,channels,ch_mult', [(8, 1, (1, 2)), (28, 1, (1, 2, 2)),
                                                   (32, 3, (1, 2, 2, 2)), (64, 3, (1, 1, 2, 2))])
def test_unet_shapes(size, channels, ch_mult):
  net = UNet(ch=8, ch_mult=ch_mult, num_res_blocks=1, attn_levels=(len(ch_mult) - 1,),
             num_groups=4, dropout=0.1, num_classes=10)
  x = jnp.ones((2, size, size, channels))
  t = jnp.array([0.1, 0.9])
  params = net.init(jax.random.key(0), x, t, jnp.array([1, 2]))['params']
  out = net.apply({'params': params}, x, t, jnp.array([1, 2]))
  assert out.shape == x.shape and out.dtype == jnp.float32
  # Dropout is active only with train=True and a dropout rng.
  out_train = net.apply({'params': params}, x, t, None, train=True,
                        rngs={'dropout': jax.random.key(1)})
  assert out_train.shape == x.shape


def test_unet_uses_time_and_class():
  net = UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), num_groups=4,
             num_classes=3)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  params = net.init(jax.random.key(1), x, jnp.array([0.5, 0.5]), jnp.array([0, 0]))['params']
  # Perturb all params away from the zero init so every path matters.
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)
  f = lambda t, y: net.apply({'params': params}, x, jnp.full((2,), t), y)
  assert not np.allclose(f(0.1, jnp.array([0, 0])), f(0.9, jnp.array([0, 0])))
  assert not np.allclose(f(0.5, jnp.array([0, 0])), f(0.5, jnp.array([1, 1])))
  # y=None is the null class (index num_classes).
  np.testing.assert_allclose(f(0.5, None), f(0.5, jnp.array([3, 3])), rtol=1e-6)


def test_mlp_and_classifier_shapes():
  mlp = MLPScore(hidden=32, depth=2)
  x = jnp.ones((5, 2))
  p = mlp.init(jax.random.key(0), x, jnp.ones(5))['params']
  assert mlp.apply({'params': p}, x, jnp.ones(5)).shape == (5, 2)
  clf = ConvClassifier(ch=8, ch_mult=(1, 2), num_groups=4, num_outputs=7)
  xi = jnp.ones((3, 8, 8, 1))
  pc = clf.init(jax.random.key(0), xi, jnp.zeros(3))['params']
  logits, feats = clf.apply({'params': pc}, xi, jnp.zeros(3), return_features=True)
  assert logits.shape == (3, 7) and feats.shape == (3, 16)


def test_energy_parameterization_is_a_gradient():
  sched = schedules.VPSchedule()
  model = ScoreModel(MLPScore(hidden=16, depth=1), sched, 'energy')
  x = jax.random.normal(jax.random.key(0), (4, 2))
  t = jnp.array([0.1, 0.3, 0.6, 0.9])
  params = model.init(jax.random.key(1), x, t)
  energy, eps = model.energy_and_eps(params, x, t)
  assert energy.shape == (4,) and eps.shape == (4, 2)
  np.testing.assert_allclose(model.eps(params, x, t), eps, rtol=1e-5)
  # eps = sigma * dE/dx, checked against central differences of the energy.
  h = 1e-3
  for d in range(2):
    dx = jnp.zeros_like(x).at[:, d].set(h)
    fd = (model.energy(params, x + dx, t) - model.energy(params, x - dx, t)) / (2 * h)
    np.testing.assert_allclose(eps[:, d], sched.sigma(t) * fd, rtol=2e-2, atol=1e-3)
  # score = -grad E
  np.testing.assert_allclose(model.score(params, x, t), -eps / sched.sigma(t)[:, None], rtol=1e-5)


def test_bad_parameterization_message():
  with pytest.raises(ValueError, match='model.parameterization'):
    ScoreModel(MLPScore(), schedules.VPSchedule(), 'score')
