"""The non-finite guard with an injected NaN (``train.debug_nan_step``): 'stop' names the
step and the metric and keeps the last good checkpoint; 'skip' leaves the state of the bad
step untouched and goes on."""

import os

import numpy as np
import pytest

import run_files
from cdiff_jax import checkpoint, train, writers


def test_nan_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path):
  c = tiny_config
  c.train.steps, c.train.checkpoint_every, c.train.log_every = 8, 2, 4
  c.train.debug_nan_step = 5  # the 6th step; checkpoints exist at 2 and 4, the next is due at 6
  with pytest.raises(train.NonFiniteError) as info:
    train.train_and_evaluate(c, str(tmp_path), progress=False)
  msg = str(info.value)
  assert msg.startswith('step 5: loss is not finite'), msg
  assert 'last good checkpoint is step 4' in msg
  ckpt_dir = tmp_path / 'checkpoints'
  assert sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit()) == [2, 4]

  # The kept checkpoint is the clean state of step 4.
  c.train.debug_nan_step = -1
  exp = train.build(c)
  clean4, _ = train.fit(exp, exp.init_state(), until=4)
  saved = checkpoint.load_params(str(tmp_path), 'params')
  for a, b in zip(run_files.leaves(clean4.params), run_files.leaves(saved)):
    np.testing.assert_array_equal(a, b)


def test_nan_skip_keeps_state_and_continues(tiny_config, tmp_path):
  c = tiny_config
  c.train.steps, c.train.checkpoint_every, c.train.log_every = 8, 4, 4
  c.train.debug_nan_step = 5
  c.train.on_nonfinite = 'skip'
  exp = train.build(c)
  before, _ = train.fit(exp, exp.init_state(), until=5)
  before_leaves = run_files.leaves((before.params, before.ema_params, before.opt_state,
                                    before.extras))
  after, history = train.fit(exp, before, until=6)
  assert int(history[-1]['nonfinite']) == 1 and int(after.step) == 6
  for a, b in zip(before_leaves, run_files.leaves((after.params, after.ema_params,
                                                   after.opt_state, after.extras))):
    np.testing.assert_array_equal(a, b)

  out = train.train_and_evaluate(c, str(tmp_path), progress=False)
  assert out['final_step'] == 8
  records = writers.read_metrics(str(tmp_path))
  assert [r['nonfinite'] for r in records] == [0, 1]
  # The interval's loss is the mean over its finite steps (not 'nan' for the whole interval).
  assert isinstance(records[1]['loss'], float) and np.isfinite(records[1]['loss'])
  assert all(np.isfinite(x).all() for x in run_files.leaves(out['state'].params))


def test_interval_means_leave_out_skipped_steps():
  """Logged means over an interval with a skipped step: over the other steps, k per call."""
  calls = [dict(loss=np.array([1.0, np.nan]), lam=np.array([[0.1, 0.2], [9.0, 9.0]]),
                nonfinite=np.array([0, 1])),
           dict(loss=np.array([3.0, 5.0]), lam=np.array([[0.3, 0.4], [0.5, 0.6]]),
                nonfinite=np.array([0, 0]))]
  out = train._summarize(calls, steps_per_call=2)
  assert out['nonfinite'] == 1
  np.testing.assert_allclose(out['loss'], 3.0)
  np.testing.assert_allclose(out['lam'], [0.3, 0.4])
  # All steps skipped: the plain means (NaN), still one record.
  bad = [dict(loss=np.array(np.nan), nonfinite=np.array(1))]
  assert np.isnan(train._summarize(bad)['loss'])


def test_a_non_finite_update_with_finite_loss_and_gradient_is_not_applied(tiny_config):
  """A finite loss and gradient can still give a NaN update (Adam's 0/0 at eps=0, which
  validation now refuses, or any optimizer going wrong): the guard checks the update too,
  so the step is skipped and the parameters stay finite (an earlier version applied it and
  checkpointed NaN parameters as the last good ones). The message says what was finite."""
  import jax
  import jax.numpy as jnp
  import optax
  from cdiff_jax import parallel, train_step
  exp = train.build(tiny_config)
  state = exp.init_state()
  # Adam, with every update NaN at its second step (count 1).
  bad_tx = optax.chain(optax.adam(1e-3),
                       optax.scale_by_schedule(lambda n: jnp.where(n == 1, jnp.nan, 1.0)))
  step = jax.jit(train_step.make_step_fn(exp.method, bad_tx, exp.lr_fn, 0.999))
  state = state.replace(opt_state=bad_tx.init(state.params))
  batch = lambda s: parallel.put_batch(exp.batcher.batch(s), exp.mesh)
  state, m0 = step(state, batch(0))
  before = run_files.leaves((state.params, state.ema_params, state.opt_state))
  state, m1 = step(state, batch(1))
  assert int(m0['nonfinite']) == 0 and int(m1['nonfinite']) == 1
  assert np.isfinite(float(m1['loss'])) and np.isfinite(float(m1['grad_norm']))
  for a, b in zip(before, run_files.leaves((state.params, state.ema_params, state.opt_state))):
    np.testing.assert_array_equal(a, b)
  where, fix = train._first_nonfinite([jax.device_get(m1)], 7, 1)
  assert where.startswith('step 7: the parameter update or the method\'s state is not finite '
                          'although loss'), where
  assert fix.startswith('Check optim.eps, optim.b1, optim.b2 or set'), fix
