"""The jitted step: compiles once, data-parallel equals single device, scan equals a loop,
and a non-finite step leaves the state untouched."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdiff_jax import parallel, train


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _run(config, steps, dataset=None):
  exp = train.build(config, dataset)
  state = exp.init_state()
  k = config.train.steps_per_call
  metrics = []
  for s in range(0, steps, k):
    host = exp.batcher.batch(s) if k == 1 else exp.batcher.stacked(s, k)
    state, m = exp.step(state, parallel.put_batch(host, exp.mesh, 0 if k == 1 else 1))
    metrics.append(m)
  return exp, state, metrics


def test_step_compiles_once_and_learns(tiny_config):
  tiny_config.optim.lr = 3e-3
  exp, state, metrics = _run(tiny_config, 30)
  assert exp.step.num_traces == 1
  assert exp.mesh.devices.size == 2  # conftest gives two CPU devices
  losses = [float(m['loss']) for m in metrics]
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
  assert int(state.step) == 30


def test_two_devices_equal_one_device(tiny_config):
  tiny_config.train.num_devices = 2
  _, s2, _ = _run(tiny_config, 4)
  tiny_config.train.num_devices = 1
  _, s1, _ = _run(tiny_config, 4)
  assert _max_diff(s1.params, s2.params) < 1e-5
  assert _max_diff(s1.ema_params, s2.ema_params) < 1e-5


def test_scan_over_steps_equals_single_steps(tiny_config):
  """... and a batch of the other kind (stacked for a single step, one step's or stacked
  another depth for a scanned one) is refused, naming what to give."""
  exp1, single, m1 = _run(tiny_config, 4)
  tiny_config.train.steps_per_call = 2
  exp, scanned, m2 = _run(tiny_config, 4)
  assert exp.step.num_traces == 1
  with pytest.raises(ValueError, match=r"one step's batch .*steps_per_call=2 for "
                     r'batcher.stacked\(step, 2\)'):
    exp1.step(single, exp.batcher.stacked(4, 2))
  for wrong in (exp.batcher.batch(4), exp.batcher.stacked(4, 3)):
    with pytest.raises(ValueError, match=r'runs 2 steps per call .*batcher.stacked\(step, 2\)'):
      exp.step(scanned, wrong)
    with pytest.raises(ValueError, match=r'runs 2 steps per call'):
      exp.step.lower(scanned, wrong)
  assert exp1.step.num_traces == 1 and exp.step.num_traces == 1
  assert _max_diff(single.params, scanned.params) < 1e-5
  np.testing.assert_allclose([float(m['loss']) for m in m1],
                             np.concatenate([np.asarray(m['loss']) for m in m2]), rtol=1e-5)


def test_scanned_step_on_cpu_uses_loop_friendly_convolutions(tiny_config):
  """On CPU the scanned step traces its 3x3 convolutions with unet.loop_friendly_conv: every
  gradient is a forward convolution in the canonical NHWC/HWIO layout (lax's gradients are
  convolutions in other layouts, which XLA:CPU runs 20-100x slower in a loop body), and the
  result equals the scan with lax's gradients."""
  from cdiff_jax import train_step as train_step_lib
  tiny_config.train.steps_per_call = 2
  exp = train.build(tiny_config)
  assert exp.step.loop_friendly_conv  # the mesh is on CPU
  plain = train_step_lib.CompiledStep(exp.step.step_fn, exp.mesh, 2, loop_friendly_conv=False)
  batch = parallel.put_batch(exp.batcher.stacked(0, 2), exp.mesh, 1)
  state = exp.init_state()

  def layouts(step):
    text = step.lower(state, batch).as_text()
    return re.findall(r'stablehlo\.convolution.*?dim_numbers = (\[.*?\]x\[.*?\]->\[.*?\])',
                      text)

  canonical = '[b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f]'
  friendly, lax_grads = layouts(exp.step), layouts(plain)
  assert len(friendly) == len(lax_grads) > 0
  assert set(friendly) == {canonical}, set(friendly)
  assert len(set(lax_grads)) > 1, set(lax_grads)
  s_lf, m_lf = exp.step(state, batch)
  s_plain, m_plain = plain(exp.init_state(), batch)
  assert _max_diff(s_lf.params, s_plain.params) < 1e-5
  np.testing.assert_allclose(np.asarray(m_lf['loss']), np.asarray(m_plain['loss']), rtol=1e-5)


def test_nonfinite_step_keeps_state(tiny_config):
  from cdiff_jax import data
  ds = data.load_digits('train')
  ds.images = ds.images.copy()
  ds.images[:] = np.nan
  exp = train.build(tiny_config, ds)
  state = exp.init_state()
  before = jax.tree.map(np.asarray, state.params)
  state, m = exp.step(state, parallel.put_batch(exp.batcher.batch(0), exp.mesh))
  assert int(m['nonfinite']) == 1 and int(state.step) == 1
  assert _max_diff(before, state.params) == 0.0


def test_training_loop_stops_on_nonfinite(tiny_config, tmp_path):
  from cdiff_jax import data
  ds = data.load_digits('train')
  ds.images = ds.images.copy()
  ds.images[:] = np.nan
  with pytest.raises(train.NonFiniteError, match='step 0: loss is not finite'):
    train.train_and_evaluate(tiny_config, str(tmp_path), dataset=ds, progress=False)


@pytest.mark.parametrize('skipped_first', [False, True])
def test_ema_after_one_step_is_the_warmup_average(tiny_config, skipped_first):
  """EMA starts as the parameters; after the first applied step it is d init + (1 - d) new,
  d = min(decay, 1/10), also when a non-finite step was skipped before it (the warm-up
  counts applied steps, as the learning rate does)."""
  tiny_config.optim.warmup_steps = 0  # (a warm-up step has lr 0 and moves nothing)
  tiny_config.train.debug_nan_step = 0 if skipped_first else -1
  tiny_config.train.on_nonfinite = 'skip'
  from cdiff_jax.data.sources import ArrayDataset
  tiny_config.data.name = 'toy'
  tiny_config.model.name, tiny_config.model.hidden, tiny_config.model.depth = 'mlp', 16, 1
  rng = np.random.default_rng(0)
  data = ArrayDataset(rng.standard_normal((64, 2)).astype(np.float32), rng.integers(0, 3, 64),
                      3, 'toy')
  exp = train.build(tiny_config, data)
  state = exp.init_state()
  init = jax.tree.map(np.array, state.params)
  assert _max_diff(init, state.ema_params) == 0.0
  for s in range(1 + skipped_first):
    state, metrics = exp.step(state, parallel.put_batch(exp.batcher.batch(s), exp.mesh))
  assert int(metrics['nonfinite']) == 0 and int(state.step) == 1 + skipped_first
  d = min(tiny_config.train.ema_decay, 1 / 10)
  expected = jax.tree.map(lambda e, p: d * e + (1 - d) * np.asarray(p), init, state.params)
  assert _max_diff(init, state.params) > 1e-4  # the step moved the parameters
  assert _max_diff(expected, state.ema_params) < 1e-6


def test_learning_rate_warmup_then_cosine_to_the_final_fraction():
  """Linear warm-up to lr, then a half cosine down to final_lr_fraction * lr at the last step."""
  import ml_collections
  from cdiff_jax import optim
  oc = ml_collections.ConfigDict(dict(lr=2e-3, lr_schedule='cosine', warmup_steps=10,
                                      final_lr_fraction=0.1))
  lr = optim.learning_rate_schedule(oc, 110)
  s = np.arange(111)
  cosine = 2e-4 + (2e-3 - 2e-4) * 0.5 * (1 + np.cos(np.pi * np.clip(s - 10, 0, 100) / 100))
  expected = np.where(s < 10, 2e-3 * s / 10, cosine)
  np.testing.assert_allclose([float(lr(i)) for i in s], expected, rtol=1e-5, atol=1e-10)


def test_an_optim_section_without_final_lr_fraction_ends_where_base_config_does():
  """A hand-made optim section that leaves the field out decays to base_config's fraction."""
  import ml_collections
  from cdiff_jax import optim
  from cdiff_jax.config import base_config
  oc = ml_collections.ConfigDict(dict(lr=2e-3, lr_schedule='cosine', warmup_steps=0))
  end = float(optim.learning_rate_schedule(oc, 100)(100))
  assert abs(end - base_config().optim.final_lr_fraction * 2e-3) < 1e-9 and end > 0


def test_a_warmup_longer_than_the_run_still_reaches_the_peak_lr():
  """The default warm-up (100 steps) in an 8-step run ends at its last step, at optim.lr."""
  import ml_collections
  from cdiff_jax import optim
  for schedule in ('constant', 'cosine'):
    oc = ml_collections.ConfigDict(dict(lr=2e-3, lr_schedule=schedule, warmup_steps=100,
                                        final_lr_fraction=0.05))
    lr = optim.learning_rate_schedule(oc, 8)
    np.testing.assert_allclose([float(lr(i)) for i in range(8)], 2e-3 * np.arange(8) / 7,
                               rtol=1e-6)


@pytest.mark.parametrize('weight_decay', [0.5, 0.0])
def test_adamw_decays_the_weights_by_the_configs_weight_decay(weight_decay):
  """With zero gradients AdamW's update is -lr * weight_decay * params (none with 0.0:
  optax's own default, 1e-4, must not stand in for the config's value)."""
  import ml_collections
  from cdiff_jax import optim
  oc = ml_collections.ConfigDict(dict(name='adamw', lr=0.1, lr_schedule='constant',
                                      warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8,
                                      weight_decay=weight_decay, grad_clip=0.0))
  tx, _ = optim.make_optimizer(oc, 100)
  params = {'w': jnp.array([1.0, -2.0, 4.0])}
  updates, _ = tx.update({'w': jnp.zeros(3)}, tx.init(params), params)
  np.testing.assert_allclose(updates['w'], -0.1 * weight_decay * np.asarray(params['w']),
                             rtol=1e-6, atol=0)


@pytest.mark.parametrize('grad_clip', [1.0, 0.0])
def test_optimizer_clips_the_global_gradient_norm(grad_clip):
  """Adam's first moment after a step is (1 - b1) g / ||g|| with grad_clip = 1, else (1 - b1) g."""
  import ml_collections
  import optax
  from cdiff_jax import optim
  oc = ml_collections.ConfigDict(dict(name='adamw', lr=1e-3, lr_schedule='constant',
                                      warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8,
                                      weight_decay=0.0, grad_clip=grad_clip))
  tx, _ = optim.make_optimizer(oc, 100)
  params = {'a': jnp.zeros(2), 'b': jnp.zeros((1, 1))}
  g = {'a': jnp.array([60.0, 0.0]), 'b': jnp.array([[80.0]])}
  _, opt_state = tx.update(g, tx.init(params), params)
  mu = optax.tree_utils.tree_get(opt_state, 'mu')
  scale = 1 / 100 if grad_clip else 1.0
  for k in g:
    np.testing.assert_allclose(mu[k], 0.1 * scale * np.asarray(g[k]), rtol=1e-5)


def test_dsm_labels_drop_to_the_null_class_at_the_dropout_rate():
  """CFG training: labels become the null class with probability class_dropout, others kept."""
  from cdiff_jax.methods.dsm import DSM
  y = jnp.arange(20_000) % 10
  out = np.asarray(DSM(None, num_classes=10, class_dropout=0.25).labels({'label': y},
                                                                        jax.random.key(0)))
  dropped = out == 10
  assert abs(dropped.mean() - 0.25) < 0.015  # sampling noise 0.003
  np.testing.assert_array_equal(out[~dropped], np.asarray(y)[~dropped])
  assert DSM(None).labels({'label': y}, jax.random.key(0)) is None


def _unet_dsm(dropout):
  from cdiff_jax import schedules
  from cdiff_jax.methods.dsm import DSM
  from cdiff_jax.models import ScoreModel, UNet
  net = UNet(ch=8, ch_mult=(1,), num_res_blocks=1, attn_levels=(), num_groups=4,
             dropout=dropout, zero_init_out=False)
  return DSM(ScoreModel(net, schedules.DDPMSchedule()), batch_size=8)


def test_dsm_loss_is_the_mean_squared_eps_error_with_training_dropout():
  """Per-example loss mean((eps_theta - eps)^2), loss their mean, with the net's dropout active."""
  x = jax.random.normal(jax.random.key(0), (8, 4, 4, 1))
  batch, rng = {'image': x}, jax.random.key(2)
  plain, dropout = _unet_dsm(0.0), _unet_dsm(0.5)

  def run():
    params = plain.model.init(jax.random.key(1), x, jnp.full((8,), 0.5))
    # Away from the zero-initialized residual convolutions, which hide what dropout drops.
    params = jax.tree.map(
        lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape), params)
    per_example, aux = plain.per_example_loss(params, batch, rng)
    eps_hat = plain.model.eps(params, aux['x_t'], aux['t'])
    return (per_example, aux, eps_hat, plain.loss(params, {}, batch, rng)[0],
            dropout.per_example_loss(params, batch, rng))

  per_example, aux, eps_hat, loss, (dropped, aux_d) = parallel.run_once(run)  # fast compile
  np.testing.assert_allclose(per_example, jnp.mean((eps_hat - aux['eps']) ** 2, axis=(1, 2, 3)),
                             rtol=1e-5)
  np.testing.assert_allclose(loss, per_example.mean(), rtol=1e-6)
  np.testing.assert_array_equal(aux_d['t'], aux['t'])  # the same times and noise
  assert np.abs(np.asarray(dropped) - np.asarray(per_example)).max() > 1e-3 * float(loss)


class _Quadratic:
  """loss = 1/2 ||w - batch||^2 (gradient w - batch); the rng draw is logged as a metric;
  ``sqrt=True`` adds sqrt|w - batch|, whose gradient is infinite where w == batch."""

  def __init__(self, sqrt=False):
    self.sqrt = sqrt

  def loss(self, params, extras, batch, rng):
    r = params['w'] - batch
    loss = 0.5 * jnp.sum(r ** 2) + (jnp.sum(jnp.sqrt(jnp.abs(r))) if self.sqrt else 0.0)
    return loss, dict(metrics=dict(draw=jax.random.uniform(rng)))

  def update_extras(self, extras, aux, step, rng):
    return extras, {}


def test_step_fn_update_ema_and_lr_match_hand_computation():
  """SGD steps on a quadratic: params, the warm-up EMA d_s = min(decay, (1+s)/(10+s)) of the
  *updated* parameters, and the logged lr = lr_fn(s), against a hand-rolled loop."""
  import optax
  from cdiff_jax import state as state_lib
  from cdiff_jax import train_step as train_step_lib
  lr_fn = lambda s: 0.1 + 0.05 * s
  tx = optax.sgd(lr_fn)
  decay = 0.15  # the warm-up (1/10) rules step 0, the decay (< 2/11) the later steps
  step_fn = jax.jit(train_step_lib.make_step_fn(_Quadratic(), tx, lr_fn, decay))
  w0 = np.array([1.0, -2.0, 0.5], np.float32)
  st = state_lib.create_train_state(dict(w=jnp.asarray(w0)), tx, jax.random.key(0))
  batches = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, -1.0], [2.0, 0.0, 1.0], [0.5, 0.5, 0.5]],
                     np.float32)
  w, ema, draws = w0.astype(np.float64), w0.astype(np.float64), []
  for s, b in enumerate(batches):
    st, m = step_fn(st, jnp.asarray(b))
    w = w - lr_fn(s) * (w - b)
    d = min(decay, (1 + s) / (10 + s))
    ema = d * ema + (1 - d) * w
    np.testing.assert_allclose(np.asarray(st.params['w']), w, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(st.ema_params['w']), ema, rtol=1e-5)
    np.testing.assert_allclose(float(m['lr']), lr_fn(s), rtol=1e-6)
    draws.append(float(m['draw']))
  # Each step draws fresh random numbers (the key is folded with the step).
  assert len(set(draws)) == len(draws), draws


class _BadDual(_Quadratic):
  """_Quadratic with a method state of two leaves; the dual step makes one entry of one
  leaf infinite at every step (a step size too large), the loss stays finite."""

  def update_extras(self, extras, aux, step, rng):
    lam = extras['lam'].at[1].set(jnp.inf)
    return dict(extras, lam=lam, count=extras['count'] + 1), dict(lam=lam)


def test_a_nonfinite_method_state_with_finite_loss_keeps_the_whole_state():
  """A finite loss and gradient whose method state (extras) is not finite in one entry of
  one of its leaves is a non-finite step: parameters, EMA and extras stay as they were."""
  import optax
  from cdiff_jax import state as state_lib
  from cdiff_jax import train_step as train_step_lib
  tx = optax.sgd(0.1)
  step_fn = jax.jit(train_step_lib.make_step_fn(_BadDual(), tx, lambda s: 0.1, 0.9))
  w0 = jnp.asarray([1.0, -2.0])
  extras = dict(lam=jnp.zeros(3), count=jnp.zeros(2))
  st = state_lib.create_train_state(dict(w=w0), tx, jax.random.key(0), extras)
  st, m = step_fn(st, jnp.asarray([0.0, 0.0]))
  assert np.isfinite(float(m['loss'])) and np.isfinite(float(m['grad_norm']))
  assert int(m['nonfinite']) == 1 and int(st.step) == 1
  np.testing.assert_array_equal(np.asarray(st.params['w']), np.asarray(w0))
  np.testing.assert_array_equal(np.asarray(st.extras['lam']), np.zeros(3))
  np.testing.assert_array_equal(np.asarray(st.extras['count']), np.zeros(2))


def test_nonfinite_gradient_with_finite_loss_keeps_state():
  """A finite loss whose gradient is infinite (sqrt|r| at r = 0) is a non-finite step too."""
  import optax
  from cdiff_jax import state as state_lib
  from cdiff_jax import train_step as train_step_lib
  tx = optax.sgd(0.1)
  step_fn = jax.jit(train_step_lib.make_step_fn(_Quadratic(sqrt=True), tx, lambda s: 0.1, 0.9))
  w0 = jnp.asarray([1.0, -2.0])
  st = state_lib.create_train_state(dict(w=w0), tx, jax.random.key(0))
  st, m = step_fn(st, jnp.asarray([1.0, 0.0]))   # r = (0, -2): loss finite, gradient not
  assert np.isfinite(float(m['loss'])) and not np.isfinite(float(m['grad_norm']))
  assert int(m['nonfinite']) == 1 and int(st.step) == 1
  np.testing.assert_array_equal(np.asarray(st.params['w']), np.asarray(w0))
  np.testing.assert_array_equal(np.asarray(st.ema_params['w']), np.asarray(w0))


def test_first_nonfinite_names_the_step_within_a_scanned_call():
  """With k steps per call the reported step is first_step + call * k + position in the call,
  and the metric named is the one that is not finite."""
  calls = [dict(loss=np.array([1.0, 2.0]), grad_norm=np.array([1.0, 1.0]),
                nonfinite=np.array([0, 0])),
           dict(loss=np.array([1.0, np.nan]), grad_norm=np.array([1.0, np.nan]),
                nonfinite=np.array([0, 1]))]
  assert train._first_nonfinite(calls, 10, 2)[0].startswith('step 13: loss is not finite')
  calls[1] = dict(loss=np.array([1.0, 1.0]), grad_norm=np.array([np.inf, 1.0]),
                  nonfinite=np.array([1, 0]))
  assert train._first_nonfinite(calls, 10, 2)[0].startswith('step 12: grad_norm is not finite')


def test_first_nonfinite_names_the_method_state_and_its_step_size():
  """A finite loss and gradient with non-finite multipliers (a dual step too large) names
  them and the method's step-size field, not the primal learning rate; without a non-finite
  figure it names the optimizer's constants and that field."""
  from cdiff_jax.methods import constrained, dsm
  call = dict(loss=np.array(3.0), grad_norm=np.array(2.0), nonfinite=np.array(1),
              lam=np.array([0.5, np.inf, np.inf]), threshold=np.array([0.1, 0.1, 0.1]))
  fields = constrained.Constrained(dsm.DSM(model=None), 3, (0.1,)).step_size_fields
  assert fields == ('method.dual_lr',)
  where, fix = train._first_nonfinite([call], 4, 1, fields)
  assert where.startswith("step 4: the method's lam is not finite although loss (3.0)"), where
  assert fix == 'Lower config.method.dual_lr.'
  call['lam'] = np.array([0.5, 0.5, 0.5])
  where, fix = train._first_nonfinite([call], 4, 1, fields)
  assert where.startswith("step 4: the parameter update or the method's state is not finite")
  assert 'optim.eps' in fix and 'config.method.dual_lr' in fix and 'optim.lr' not in fix, fix
  # Scanned calls: a vector figure's row for the failing step, not its first row.
  call = {k: np.stack([np.asarray(v)] * 2) for k, v in call.items()}
  call['nonfinite'] = np.array([0, 1])
  call['lam'] = np.array([[np.inf, 0.0, 0.0], [0.5, 0.5, 0.5]])
  assert 'lam' not in train._first_nonfinite([call], 4, 2, fields)[0]
  call['nonfinite'] = np.array([1, 0])
  assert train._first_nonfinite([call], 4, 2, fields)[0].startswith("step 4: the method's lam")
  assert constrained.Constrained(dsm.DSM(model=None), 3, (0.1,),
                                 enabled=False).step_size_fields == ()


def test_logged_lr_is_the_one_applied_after_a_skipped_step():
  """A skipped non-finite step does not advance the optimizer's schedule, and the logged lr
  follows the schedule's own count: step 1 after a skipped step 0 applies and logs lr_fn(0)."""
  import optax
  from cdiff_jax import state as state_lib
  from cdiff_jax import train_step as train_step_lib
  lr_fn = lambda s: 0.1 * (s + 1)
  tx = optax.sgd(lr_fn)
  step_fn = jax.jit(train_step_lib.make_step_fn(_Quadratic(), tx, lr_fn, 0.9, debug_nan_step=0))
  st = state_lib.create_train_state(dict(w=jnp.asarray([1.0])), tx, jax.random.key(0))
  st, m = step_fn(st, jnp.asarray([0.0]))
  assert int(m['nonfinite']) == 1 and float(st.params['w'][0]) == 1.0
  st, m = step_fn(st, jnp.asarray([0.0]))   # gradient w - 0 = 1, so w moves by the lr applied
  applied = 1.0 - float(st.params['w'][0])
  np.testing.assert_allclose([float(m['lr']), applied], [lr_fn(0), lr_fn(0)], rtol=1e-6)


def test_sample_clip_that_would_cut_the_data_is_refused_before_training(tiny_config, tmp_path):
  """Points out to +-4 with the image default sample.clip=1: the run's sampler would clip
  every denoised prediction to [-1, 1]. train_and_evaluate stops before writing anything,
  exp.sampler() names the fix; an explicit clip override, or clip 0 in the config, samples."""
  from cdiff_jax import config as config_lib
  from cdiff_jax.data.sources import ArrayDataset
  tiny_config.data.name = 'toy'
  tiny_config.model.name, tiny_config.model.hidden, tiny_config.model.depth = 'mlp', 16, 1
  x = np.linspace(-4.0, 4.0, 64, dtype=np.float32)[:, None].repeat(2, 1)
  data = ArrayDataset(x, np.zeros(64, np.int32), 1, 'toy')
  fix = (r"config.sample.clip=1.0: the training data reach \+-4, so clipping the sampler's "
         r"denoised prediction to \+-1 would cut them; set sample.clip=0 \(no clipping\) or "
         r">= 4.")
  with pytest.raises(config_lib.ConfigError, match=fix):
    train.train_and_evaluate(tiny_config, str(tmp_path / 'run'), dataset=data, progress=False)
  assert not (tmp_path / 'run').exists() or not os.listdir(tmp_path / 'run')
  exp = train.build(tiny_config, data)
  with pytest.raises(config_lib.ConfigError, match=fix):
    exp.sampler()
  exp.sampler(clip=None)   # an explicit override is the caller's own choice
  tiny_config.sample.clip = 0.0
  train.build(tiny_config, data).sampler()
  # digits (uint8 images) reach 1, the default clip
  import run_files
  assert train.build(run_files.tiny_digits_config(4, 0)).data_reach == 1.0
