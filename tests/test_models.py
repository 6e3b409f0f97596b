"""Network shapes at every supported size, conditioning, and the energy parameterization."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdiff_jax import parallel, schedules
from cdiff_jax.models import ConvClassifier, MLPScore, ScoreModel, UNet


@pytest.mark.parametrize('size,channels,ch_mult', [(8, 1, (1, 2)), (28, 1, (1, 2, 2)),
                                                   (32, 3, (1, 2, 2, 2)), (64, 3, (1, 1, 2, 2))])
def test_unet_shapes(size, channels, ch_mult):
  net = UNet(ch=8, ch_mult=ch_mult, num_res_blocks=1, attn_levels=(len(ch_mult) - 1,),
             num_groups=4, dropout=0.1, num_classes=10)
  x = jnp.ones((2, size, size, channels))
  t = jnp.array([0.1, 0.9])
  # Shapes and dtypes by abstract evaluation (compiling four UNets would take a minute).
  params = jax.eval_shape(net.init, jax.random.key(0), x, t, jnp.array([1, 2]))['params']
  out = jax.eval_shape(net.apply, {'params': params}, x, t, jnp.array([1, 2]))
  assert out.shape == x.shape and out.dtype == jnp.float32
  # Dropout is active only with train=True and a dropout rng.
  out_train = jax.eval_shape(lambda p, k: net.apply(p, x, t, None, train=True, rngs={'dropout': k}),
                             {'params': params}, jax.random.key(1))
  assert out_train.shape == x.shape


def test_initializer_compiled_for_compile_speed_gives_the_same_parameters():
  # parallel.run_once (XLA:CPU backend optimization off) is how runs initialize parameters;
  # the values must be those of the ordinary compiled initializer.
  net = UNet(ch=8, ch_mult=(1,), num_res_blocks=1, attn_levels=(0,), num_groups=4)
  args = (jax.random.key(5), jnp.ones((2, 8, 8, 1)), jnp.array([0.1, 0.9]))
  fast = parallel.run_once(net.init, *args)
  ref = jax.jit(net.init)(*args)
  assert jax.tree.structure(fast) == jax.tree.structure(ref)
  for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  other = parallel.run_once(net.init, jax.random.key(6), *args[1:])
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(fast)))


@pytest.mark.slow  # 50 s on a 2-core CPU (make test-all)
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


def test_mlp_score_against_numpy():
  """MLPScore, conditional, against a numpy forward pass of its documented wiring: the time
  (and class) embedding added before every hidden layer's SiLU; the null label by default."""
  from cdiff_jax.models.unet import timestep_embedding
  mlp = MLPScore(hidden=16, depth=2, num_classes=3, time_dim=8)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((5, 2)), jnp.float32)
  t = jnp.asarray(rng.uniform(0, 1, 5), jnp.float32)
  y = jnp.asarray([0, 1, 2, 0, 1])
  p = mlp.init(jax.random.key(0), x, t, y)['params']
  # Non-zero biases, so a bias left out shows.
  p = jax.tree.map(lambda a: a + 0.1 * jnp.asarray(rng.standard_normal(a.shape), a.dtype), p)
  silu = lambda v: v / (1 + np.exp(-v))
  dense = lambda name, v: v @ np.asarray(p[name]['kernel'], np.float64) + np.asarray(p[name]['bias'])

  def forward(labels):
    emb = silu(dense('Dense_0', np.asarray(timestep_embedding(t, 8), np.float64)))
    emb = emb + np.asarray(p['Embed_0']['embedding'], np.float64)[labels]
    h = dense('Dense_1', np.asarray(x, np.float64))
    for k in range(2):
      h = dense(f'Dense_{3 + 2 * k}', silu(h + dense(f'Dense_{2 + 2 * k}', emb)))
    return dense('Dense_6', silu(h))

  np.testing.assert_allclose(mlp.apply({'params': p}, x, t, y), forward(np.asarray(y)),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(mlp.apply({'params': p}, x, t), forward(np.full(5, 3)),
                             rtol=1e-4, atol=1e-5)


def test_classifier_features_are_what_its_head_reads():
  """ConvClassifier's features (the classifier FID's) are the pooled activations its last
  layer maps to the logits: the head reads exactly them (after the final GroupNorm + SiLU)."""
  clf = ConvClassifier(ch=8, ch_mult=(1, 2), num_groups=4, num_outputs=7)
  xi = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
  t = jnp.array([0.1, 0.5, 0.9])
  pc = clf.init(jax.random.key(0), xi, t)['params']
  logits, feats = clf.apply({'params': pc}, xi, t, return_features=True)
  assert logits.shape == (3, 7) and feats.shape == (3, 16)
  head = pc[sorted((k for k in pc if k.startswith('Dense_')), key=lambda k: int(k[6:]))[-1]]
  np.testing.assert_allclose(logits, feats @ head['kernel'] + head['bias'], rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(clf.apply({'params': pc}, xi, t), logits, rtol=1e-6)
  # Pooled SiLU outputs: never below SiLU's minimum, -0.2785.
  assert float(feats.min()) >= -0.2785 and float(jnp.abs(feats).max()) < 3


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


@pytest.mark.parametrize('parameterization', ['eps', 'energy'])
def test_one_time_for_every_example(parameterization):
  """A scalar t means that time for every example (as the schedules take it); a t of any
  other shape than (batch,) is refused by name."""
  model = ScoreModel(MLPScore(hidden=16, depth=1), schedules.VPSchedule(), parameterization)
  x = jax.random.normal(jax.random.key(0), (4, 2))
  params = model.init(jax.random.key(1), x, 0.4)
  full = jnp.full((4,), 0.4)
  for fn in ('eps', 'score') + (('energy',) if parameterization == 'energy' else ()):
    np.testing.assert_array_equal(getattr(model, fn)(params, x, 0.4),
                                  getattr(model, fn)(params, x, full))
  with pytest.raises(ValueError, match=r't has shape \(3,\); give one time per example'):
    model.eps(params, x, jnp.ones(3))


@pytest.mark.parametrize('name', ['unet', 'mlp'])
def test_energy_network_trains_from_its_initialization(name):
  """An energy model's DSM gradient is not zero at the start. With E = ||f||^2 / (2 sigma)
  and a zero-initialized output layer (right for eps-networks) f = 0 and its Jacobian
  J = 0, so eps = sigma J^T f / sigma and every parameter gradient were exactly 0."""
  from cdiff_jax import config as config_lib
  from cdiff_jax.models import build_net
  c = config_lib.base_config().model
  c.update(name=name, ch=8, ch_mult=(1,), num_res_blocks=1, attn_levels=(), num_groups=4,
           hidden=16, depth=1, parameterization='energy')
  shape = (2, 8, 8, 1) if name == 'unet' else (2, 2)
  x = jax.random.normal(jax.random.key(0), shape)
  noise = jax.random.normal(jax.random.key(1), shape)
  t = jnp.array([0.3, 0.7])
  model = ScoreModel(build_net(c), schedules.VPSchedule(), 'energy')
  params = model.init(jax.random.key(2), x, t)
  grads = jax.grad(lambda p: jnp.mean((model.eps(p, x, t) - noise) ** 2))(params)
  # (Branches behind zero-initialized residual layers start at 0, as in an eps-UNet.)
  assert sum(float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)) > 1e-3
  if name == 'unet':   # the eps-network keeps its zero start (eps = 0 at initialization)
    c.parameterization = 'eps'
    eps_model = ScoreModel(build_net(c), schedules.VPSchedule(), 'eps')
    assert float(jnp.abs(eps_model.eps(eps_model.init(jax.random.key(2), x, t), x, t)).max()) == 0


def test_group_norm_names_groups_that_do_not_divide_the_channels():
  from cdiff_jax.models import unet
  with pytest.raises(ValueError, match='4 groups do not divide 6 channels'):
    unet.GroupNorm(4).init(jax.random.key(0), jnp.ones((1, 2, 2, 6)))


def test_bad_parameterization_message():
  with pytest.raises(ValueError, match='model.parameterization'):
    ScoreModel(MLPScore(), schedules.VPSchedule(), 'score')


@pytest.mark.parametrize('silu', [True, False])
@pytest.mark.parametrize('dtype', [None, jnp.bfloat16])
def test_fused_group_norm_matches_flax(silu, dtype):
  """The hand-written GroupNorm(+SiLU) and its custom gradient against flax's GroupNorm and
  autodiff: same parameters, values and gradients (x, scale, bias)."""
  import flax.linen as nn
  from cdiff_jax.models import unet
  x = jax.random.normal(jax.random.key(0), (3, 5, 4, 8)) * 2.0 + 0.5
  x = x if dtype is None else x.astype(dtype)
  ours = unet.GroupNorm(4, silu=silu, dtype=dtype)
  ref_gn = nn.GroupNorm(4, dtype=dtype)
  params = ours.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref_gn.init(jax.random.key(1), x))
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(2), p.shape), params)
  ref = lambda p, x: nn.silu(ref_gn.apply(p, x)) if silu else ref_gn.apply(p, x)
  w = jax.random.normal(jax.random.key(3), x.shape)
  loss = lambda f: lambda p, x: jnp.sum(f(p, x).astype(jnp.float32) * w)
  tol = 1e-5 if dtype is None else 3e-2
  np.testing.assert_allclose(np.asarray(ours.apply(params, x), np.float32),
                             np.asarray(ref(params, x), np.float32), atol=tol, rtol=tol)
  g_ours = jax.grad(loss(ours.apply), (0, 1))(params, x)
  g_ref = jax.grad(loss(ref), (0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    scale = float(np.abs(np.asarray(b, np.float32)).max())
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               atol=tol * max(scale, 1.0) * (1 if dtype is None else 4))
  if dtype is None:
    # Differentiable twice (energy models train on the gradient of the network): the
    # custom gradient's own gradient against autodiff of flax's layer.
    def grad_norm(f):
      return lambda p, x: jnp.sum(jax.grad(loss(f), 1)(p, x) ** 2)
    gg_ours = jax.grad(grad_norm(ours.apply), (0, 1))(params, x)
    gg_ref = jax.grad(grad_norm(ref), (0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(gg_ours), jax.tree.leaves(gg_ref)):
      np.testing.assert_allclose(a, b, atol=1e-4 * max(float(np.abs(b).max()), 1.0))


def test_pointwise_conv_and_upsample_match_the_plain_ops():
  import flax.linen as nn
  from cdiff_jax.models import unet
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 6))
  plain, fast = nn.Conv(5, (1, 1)), nn.Conv(5, (1, 1), conv_general_dilated=unet.pointwise_conv)
  p = plain.init(jax.random.key(1), x)
  np.testing.assert_allclose(fast.apply(p, x), plain.apply(p, x), atol=1e-5)
  gf = jax.grad(lambda p: jnp.sum(fast.apply(p, x) ** 2))(p)
  gp = jax.grad(lambda p: jnp.sum(plain.apply(p, x) ** 2))(p)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), gf, gp)
  up = unet.upsample_nearest(x, (8, 8))
  np.testing.assert_array_equal(up, jax.image.resize(x, (2, 8, 8, 6), 'nearest'))


@pytest.mark.parametrize('dtype,strides,size', [(None, 1, (6, 5)), (jnp.bfloat16, 1, (6, 5)),
                                                 (None, 2, (8, 8)), (None, 2, (7, 5)),
                                                 (jnp.bfloat16, 2, (6, 7))])
def test_loop_friendly_conv_matches_lax_in_value_and_gradient(dtype, strides, size):
  """The convolution with hand-written gradients equals flax's lax convolution in value,
  input gradient and kernel gradient (stride 1 and the stride-2 downsampling, even and odd
  sizes), also inside a fori_loop (where it is used for speed); dilated convolutions fall
  through to lax."""
  import flax.linen as nn
  from cdiff_jax.models import unet
  x = jax.random.normal(jax.random.key(0), (3,) + size + (4,))
  plain = nn.Conv(7, (3, 3), strides=strides, dtype=dtype)
  with unet.loop_friendly_conv_grads():
    fast = unet.conv3x3(7, dtype, strides=strides)
  assert fast.conv_general_dilated is unet.loop_friendly_conv
  p = plain.init(jax.random.key(1), x)
  from unittest import mock
  with mock.patch.object(unet, '_conv_vjp', wraps=unet._conv_vjp) as custom:
    fast.apply(p, x)
  assert custom.called   # the hand-written gradients, not a fall-through to lax
  tol = 1e-5 if dtype is None else 3e-2
  np.testing.assert_allclose(np.asarray(fast.apply(p, x), np.float32),
                             np.asarray(plain.apply(p, x), np.float32), atol=tol * 10)

  def loss(layer):
    def f(p, x):
      y = layer.apply(p, x).astype(jnp.float32)
      return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape) / y.size)
    return f
  for argnums in (0, 1):
    ga = jax.grad(loss(fast), argnums)(p, x)
    gb = jax.grad(loss(plain), argnums)(p, x)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
      scale = max(float(np.abs(np.asarray(b, np.float32)).max()), 1.0)
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                 atol=tol * scale * 4)

  def walk(layer):  # ten input-gradient steps in one compiled loop
    step = lambda i, x: x - 0.01 * jax.grad(loss(layer), 1)(p, x)
    return jax.jit(lambda x: jax.lax.fori_loop(0, 10, step, x))(x)
  np.testing.assert_allclose(np.asarray(walk(fast), np.float32),
                             np.asarray(walk(plain), np.float32), atol=tol * 10)
  dilated = nn.Conv(7, (3, 3), kernel_dilation=2, conv_general_dilated=unet.loop_friendly_conv)
  np.testing.assert_allclose(dilated.apply(p, x), nn.Conv(7, (3, 3), kernel_dilation=2).apply(p, x),
                             atol=1e-6)


def test_dropout_keeps_units_at_the_right_rate_and_ignores_sharding():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from cdiff_jax.models.unet import Dropout
  x = jnp.ones((8, 16, 16, 32))
  drop = Dropout(0.25)

  def apply(x, seed):
    return drop.apply({}, x, rngs={'dropout': jax.random.key(seed)})

  y = np.asarray(jax.jit(apply)(x, 0))
  kept = y != 0
  # Inverted dropout: kept units scaled by 1/(1 - rate), 75% kept (65k units: 4 sigma ~ 0.007).
  np.testing.assert_allclose(y[kept], 1 / 0.75, rtol=1e-6)
  assert abs(kept.mean() - 0.75) < 0.007
  # Independent of the position: per-example and per-channel keep rates agree.
  assert np.abs(kept.mean(axis=(1, 2, 3)) - 0.75).max() < 0.03
  assert np.abs(kept.mean(axis=(0, 1, 2)) - 0.75).max() < 0.06
  # A new key, a new mask; the same key, the same mask; eval mode is the identity.
  assert (np.asarray(jax.jit(apply)(x, 1)) != y).mean() > 0.2
  np.testing.assert_array_equal(np.asarray(jax.jit(apply)(x, 0)), y)
  np.testing.assert_array_equal(Dropout(0.25, deterministic=True).apply({}, x), x)
  # Data-parallel: the batch split over 2 devices gets the same mask as on one device.
  mesh = Mesh(np.array(jax.devices()[:2]), ('data',))
  sharded = NamedSharding(mesh, P('data'))
  y2 = jax.jit(apply, in_shardings=(sharded, None), out_shardings=sharded)(
      jax.device_put(x, sharded), 0)
  np.testing.assert_array_equal(np.asarray(y2), y)


@pytest.mark.parametrize('padding,size', [('VALID', (8, 8)), (((1, 1), (1, 1)), (8, 7)),
                                          (((0, 2), (1, 0)), (6, 7))])
def test_loop_friendly_conv_gradients_with_cropping_paddings(padding, size):
  """Stride-2 convolutions whose padding leaves input rows unused (VALID, explicit pads):
  the hand-written kernel gradient keeps the right window (against lax's gradients)."""
  import flax.linen as nn
  from cdiff_jax.models import unet
  x = jax.random.normal(jax.random.key(0), (2,) + size + (3,))
  plain = nn.Conv(5, (3, 3), strides=2, padding=padding)
  fast = nn.Conv(5, (3, 3), strides=2, padding=padding,
                 conv_general_dilated=unet.loop_friendly_conv)
  p = plain.init(jax.random.key(1), x)
  from unittest import mock
  with mock.patch.object(unet, '_conv_vjp', wraps=unet._conv_vjp) as custom:
    fast.apply(p, x)
  assert custom.called
  w = jax.random.normal(jax.random.key(2), plain.apply(p, x).shape)
  loss = lambda layer: lambda p, x: jnp.sum(layer.apply(p, x) * w)
  ga = jax.grad(loss(fast), (0, 1))(p, x)
  gb = jax.grad(loss(plain), (0, 1))(p, x)
  for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_group_norm_epsilon_on_low_variance_and_constant_groups():
  """GroupNorm's epsilon (1e-6, flax's) matters where a group's variance is small: against
  the closed form (x - mean) / sqrt(var + 1e-6), a constant group gives the bias, not NaN."""
  from cdiff_jax.models import unet
  x = 1e-3 * jax.random.normal(jax.random.key(0), (2, 3, 3, 4))   # variance ~ epsilon
  x = x.at[1].set(2.0)   # example 1: constant groups (variance 0)
  gn = unet.GroupNorm(2)
  bias = jnp.arange(4.0)
  params = {'params': {'scale': jnp.ones(4), 'bias': bias}}
  xg = np.asarray(x, np.float64).reshape(2, 9, 2, 2)
  mean = xg.mean(axis=(1, 3), keepdims=True)
  var = xg.var(axis=(1, 3), keepdims=True)
  want = ((xg - mean) / np.sqrt(var + 1e-6)).reshape(x.shape) + np.asarray(bias)
  out = np.asarray(gn.apply(params, x))
  np.testing.assert_allclose(out, want, rtol=1e-3, atol=1e-3)
  np.testing.assert_array_equal(out[1], np.broadcast_to(np.asarray(bias), out[1].shape))


@pytest.mark.parametrize('dtype', [None, jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize('x_dtype', [jnp.float32, jnp.bfloat16])
def test_group_norm_output_dtype_matches_flax(dtype, x_dtype):
  """The fused GroupNorm's output dtype follows flax's GroupNorm: ``dtype`` when given,
  else the promotion of the input and the float32 parameters."""
  import flax.linen as nn
  from cdiff_jax.models import unet
  x = jnp.ones((1, 2, 2, 4), x_dtype)
  ours = unet.GroupNorm(2, dtype=dtype)
  ref = nn.GroupNorm(2, dtype=dtype)
  assert (ours.apply(ours.init(jax.random.key(0), x), x).dtype ==
          ref.apply(ref.init(jax.random.key(0), x), x).dtype)


def test_timestep_embedding_is_the_ddpm_sinusoid():
  """emb(t)[i] = sin(1000 t / 10000^(i/half)) for i < half, then the cosines (DDPM's, t
  scaled to the step range); an odd dim gets a zero column."""
  from cdiff_jax.models import unet
  t = np.array([0.0, 0.013, 0.5, 1.0])
  for dim in (8, 9):
    half = dim // 2
    args = 1000.0 * t[:, None] * 10000.0 ** (-np.arange(half) / half)[None]
    want = np.concatenate([np.sin(args), np.cos(args)] + ([np.zeros((4, 1))] if dim % 2 else []),
                          axis=-1)
    np.testing.assert_allclose(unet.timestep_embedding(jnp.asarray(t), dim), want, atol=2e-4)


def test_energy_is_half_the_squared_output_over_sigma():
  """E(x, t) = ||net(x, t)||^2 / (2 sigma_t), from the network's own output."""
  sched = schedules.VPSchedule()
  net = MLPScore(hidden=16, depth=1)
  model = ScoreModel(net, sched, 'energy')
  x = jax.random.normal(jax.random.key(0), (4, 2))
  t = jnp.array([0.05, 0.3, 0.6, 0.9])
  params = model.init(jax.random.key(1), x, t)
  f = np.asarray(net.apply({'params': params}, x, t), np.float64)
  want = 0.5 * (f ** 2).sum(-1) / np.asarray(sched.sigma(t), np.float64)
  np.testing.assert_allclose(model.energy(params, x, t), want, rtol=1e-5)
