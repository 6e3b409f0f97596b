"""The jitted step: compiles once, data-parallel equals single device, scan equals a loop,
and a non-finite step leaves the state untouched."""

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
  _, single, m1 = _run(tiny_config, 4)
  tiny_config.train.steps_per_call = 2
  exp, scanned, m2 = _run(tiny_config, 4)
  assert exp.step.num_traces == 1
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
