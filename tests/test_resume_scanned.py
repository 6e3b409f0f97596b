"""Several steps per compiled call (``train.steps_per_call = k > 1``, a ``lax.scan`` over k
steps) through the launcher, checked against independent computations: a run preempted in
the middle of a call, or killed between checkpoints, and rerun ends with every array of the
state of an uninterrupted run (parameters, EMA, optimizer state, the method's extras, rng)
and with its metrics.jsonl records; each record is the mean of the per-step metrics of its
interval; the scanned step equals k single steps; and after a skipped non-finite step the
count of applied steps, the learning rate and the dual ascent (its lr, window and estimate)
stay where a step-by-step replay of the logged figures puts them. For DSM (the U-Net, with
its loop-friendly convolutions; k = 2 and 4), constrained dual training (k = 2 and 4) and
TIW-DSM with the discriminator trained jointly."""

import signal

import jax
import numpy as np
import pytest

import run_files
from cdiff_jax import checkpoint, config as config_lib, train, train_step, writers
from cdiff_jax.data.sources import ArrayDataset
from cdiff_jax.methods import constrained, tiw


class _Run:
  """One launcher run on the fake clock, without sample grids (not the subject here).

  ``kill_at``: the call (1-based) that raises KeyboardInterrupt instead of running, as a
  killed process would stop; ``sigterm_in``: the call during which the SIGTERM handler
  fires (the run must save and stop at the call's end). ``calls`` holds the metrics each
  call returned, ``error`` the exception that ended the run."""

  def __init__(self, config, workdir, dataset=None, kill_at=None, sigterm_in=None):
    self.calls, self.result, self.error = [], None, None
    watches = []
    step_call = train_step.CompiledStep.__call__
    enter = train._PreemptionWatch.__enter__

    def call(step, state, batch):
      n = len(self.calls) + 1
      if n == kill_at:
        raise KeyboardInterrupt
      state, metrics = step_call(step, state, batch)
      self.calls.append(jax.device_get(metrics))
      if n == sigterm_in:
        watches[-1]._on_sigterm(signal.SIGTERM, None)
      return state, metrics

    def entered(watch):
      watches.append(watch)
      return enter(watch)

    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(train, 'time', run_files.FakeClock())
      mp.setattr(train, 'save_samples', lambda *args, **kwargs: None)
      mp.setattr(train_step.CompiledStep, '__call__', call)
      mp.setattr(train._PreemptionWatch, '__enter__', entered)
      try:
        self.result = train.train_and_evaluate(config, str(workdir), dataset=dataset,
                                               progress=False)
      except (KeyboardInterrupt, train.Preempted) as e:
        self.error = e
    self.records = writers.read_metrics(str(workdir))
    self.saved = checkpoint.Checkpointer(str(workdir / 'checkpoints')).latest_step()


def _assert_same_state(a, b):
  for x, y in zip(run_files.state_leaves(a), run_files.state_leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def _resume_after_kill(config, tmp_path, uninterrupted, kill_at, dataset=None):
  """Kills a run of ``config`` at call ``kill_at`` (after a record beyond its last
  checkpoint), reruns it, and checks the end against ``uninterrupted``: the same state
  array for array and the same records (the killed run's stale one replaced)."""
  killed = _Run(config, tmp_path, dataset, kill_at=kill_at)
  assert isinstance(killed.error, KeyboardInterrupt)
  k = config.train.steps_per_call
  stopped = (kill_at - 1) * k
  assert killed.saved < max(r['step'] for r in killed.records) == stopped, (
      killed.saved, killed.records)
  resumed = _Run(config, tmp_path, dataset)
  assert resumed.error is None and resumed.result['final_step'] == config.train.steps
  assert len(resumed.calls) == (config.train.steps - killed.saved) // k
  _assert_same_state(uninterrupted.result['state'], resumed.result['state'])
  assert resumed.records == uninterrupted.records


def _scan_equals_single_steps(config, scanned, dataset=None):
  """The per-step metrics and the final state of ``scanned`` (k steps per call) against
  ``fit`` of the same config at one step per call: equal up to float rounding (XLA fuses a
  loop body differently; a step on another batch or key is off by far more)."""
  c = config.copy_and_resolve_references()
  c.train.steps_per_call = 1
  exp = train.build(c, dataset)
  state, history = train.fit(exp, exp.init_state())
  single = run_files.per_step(history)
  steps = run_files.per_step(scanned.calls, config.train.steps_per_call)
  assert single.keys() == steps.keys()
  for key in single:
    np.testing.assert_allclose(steps[key], single[key], rtol=2e-4, atol=1e-5, err_msg=key)
  for a, b in zip(run_files.state_leaves(state), run_files.state_leaves(scanned.result['state']),
                  strict=True):
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-5)


# ------------------------------------------------------------------------------- DSM


def _dsm_config():
  """Tiny digits DSM, 2 steps per call: 8 steps, checkpoints at 4, records at 6 and 8
  (and at every checkpoint)."""
  return run_files.tiny_digits_config(log_every=6, checkpoint_every=4, steps_per_call=2)


@pytest.fixture(scope='module')
def dsm_run(tmp_path_factory):
  return _Run(_dsm_config(), tmp_path_factory.mktemp('dsm'))


def test_records_are_interval_means_of_every_scanned_step(dsm_run):
  """Records at the checkpoint, the log step and the end, each the mean over all k steps of
  every call in its interval (not the last step of each call), throughput counting steps
  (not calls); the final metrics are the last record."""
  c = _dsm_config()
  assert [r['step'] for r in dsm_run.records] == [4, 6, 8]
  assert len(dsm_run.calls) == 4
  steps = run_files.per_step(dsm_run.calls, 2)
  assert steps['loss'].shape == (8,)
  run_files.assert_interval_means(dsm_run.records, steps, c.train.batch_size)
  last = {key: v for key, v in dsm_run.records[-1].items() if key != 'step'}
  assert dsm_run.result['final_metrics'] == last


def test_preempted_mid_call_then_killed_resumes_to_the_uninterrupted_run(dsm_run, tmp_path):
  """A SIGTERM during the first call (steps 0-1) is honoured at its end: a checkpoint at
  step 2, then Preempted; the metrics of steps 0-1 go with it, not into a record of their
  own. The rerun resumes at step 2 (on the batches of steps 2.., from the checkpointed
  state) with them, logs step 4 as the mean of steps 0-3, and is killed after logging step
  6, beyond its checkpoint at 4; the next rerun resumes at 4 and ends with every array of
  the uninterrupted run's state and its records (the stale 6 replaced; the throughput of
  the record at 4 spans two invocations)."""
  c = _dsm_config()
  preempted = _Run(c, tmp_path, sigterm_in=1)
  assert isinstance(preempted.error, train.Preempted) and preempted.error.step == 2
  assert len(preempted.calls) == 1 and preempted.saved == 2
  assert preempted.records == []

  killed = _Run(c, tmp_path, kill_at=3)
  assert isinstance(killed.error, KeyboardInterrupt) and killed.saved == 4
  assert [r['step'] for r in killed.records] == [4, 6]

  resumed = _Run(c, tmp_path)
  assert resumed.error is None and len(resumed.calls) == 2
  _assert_same_state(dsm_run.result['state'], resumed.result['state'])
  drop = lambda r: {key: v for key, v in r.items() if key != 'images_per_sec'}
  assert [drop(r) for r in resumed.records] == [drop(r) for r in dsm_run.records]
  assert resumed.records[1:] == dsm_run.records[1:]


def test_a_stop_carries_its_metrics_to_a_rerun_of_another_steps_per_call(tmp_path, capsys):
  """Preempted in its first call of 2 steps (a checkpoint at 2, no record yet), rerun at 1
  step per call: the carried metrics of steps 1-2 are regrouped, so the record at 4 is the
  mean of steps 1-4 and every record the mean of its interval (they were dropped: the
  record at 4 held steps 3-4 only), and no warning says records are lost."""
  c = _dsm_config()
  preempted = _Run(c, tmp_path, sigterm_in=1)
  assert isinstance(preempted.error, train.Preempted) and preempted.saved == 2
  assert preempted.records == []
  c.train.steps_per_call = 1
  capsys.readouterr()
  resumed = _Run(c, tmp_path)
  assert resumed.error is None and len(resumed.calls) == 6
  assert 'metrics.jsonl is missing' not in capsys.readouterr().err
  steps = {key: np.concatenate([v, run_files.per_step(resumed.calls)[key]])
           for key, v in run_files.per_step(preempted.calls, 2).items()}
  assert [r['step'] for r in resumed.records] == [4, 6, 8]
  run_files.assert_interval_means(resumed.records, steps, c.train.batch_size,
                                  across_a_stop=(4,))


def _dsm_k4_config():
  """The same DSM at 4 steps per call: 16 steps, records every 4, checkpoints at 8."""
  c = run_files.tiny_digits_config(log_every=4, checkpoint_every=8, steps_per_call=4)
  c.train.steps = 16
  return c


@pytest.fixture(scope='module')
def dsm_k4_run(tmp_path_factory):
  return _Run(_dsm_k4_config(), tmp_path_factory.mktemp('dsm_k4'))


def test_dsm_k4_killed_resumes_to_the_uninterrupted_run(dsm_k4_run, tmp_path):
  """k = 4: killed before its fourth call (steps 0-11 done, records at 4, 8 and 12, the
  checkpoint at 8), the rerun resumes at 8 and ends with every array of the uninterrupted
  run's state and its records."""
  c = _dsm_k4_config()
  assert [r['step'] for r in dsm_k4_run.records] == [4, 8, 12, 16]
  run_files.assert_interval_means(dsm_k4_run.records, run_files.per_step(dsm_k4_run.calls, 4),
                                  c.train.batch_size)
  _resume_after_kill(c, tmp_path, dsm_k4_run, kill_at=4)


def test_dsm_k4_preempted_mid_call_resumes_to_the_uninterrupted_run(dsm_k4_run, tmp_path):
  """k = 4: a SIGTERM during the first call is honoured at its end (step 4, not a
  checkpoint step): a record and a checkpoint there, then Preempted; the rerun runs the
  three remaining calls from step 4 and ends as the uninterrupted run did."""
  c = _dsm_k4_config()
  preempted = _Run(c, tmp_path, sigterm_in=1)
  assert isinstance(preempted.error, train.Preempted) and preempted.error.step == 4
  assert preempted.saved == 4 and [r['step'] for r in preempted.records] == [4]
  resumed = _Run(c, tmp_path)
  assert resumed.error is None and len(resumed.calls) == 3
  _assert_same_state(dsm_k4_run.result['state'], resumed.result['state'])
  assert resumed.records == dsm_k4_run.records


# ----------------------------------------------------------------- toy data: the methods


def _toy_dataset(n=2000):
  """Four separated 1-D modes, the last one rare (weights .3, .3, .3, .1)."""
  r = np.random.default_rng(0)
  labels = r.choice(4, n, p=[0.3, 0.3, 0.3, 0.1])
  x = np.array([-6.0, -2.0, 2.0, 6.0])[labels] + 0.4 * r.standard_normal(n)
  return ArrayDataset(x[:, None].astype(np.float32), labels, 4, 'toy')


def _toy_config(k, steps, checkpoint_every, log_every):
  c = config_lib.base_config()
  c.data.name = 'toy'
  c.model.name, c.model.hidden, c.model.depth = 'mlp', 32, 1
  c.diffusion.schedule = 'vp'
  c.optim.warmup_steps = 3    # the lr moves at every step: warm-up, then cosine
  c.train.steps, c.train.steps_per_call = steps, k
  c.train.checkpoint_every, c.train.log_every = checkpoint_every, log_every
  c.train.compilation_cache = False
  c.sample.clip = 0.0   # points out to +-7, not images in [-1, 1]
  return c


@pytest.fixture(scope='module')
def dataset():
  return _toy_dataset()


# Constrained runs. k=2 with dual_every=3 (windows end inside calls and a checkpoint at 8
# falls mid-window) and the window estimate; k=4 with dual_every=2 (two windows per call)
# and the EMA estimate. Each skips the NaN step ``nan`` (inside a call, the first step of
# a window for k=2 and the last of one for k=4) and is killed at call ``kill`` after
# logging a step beyond its last checkpoint.
CONSTRAINED = {
    'k2_dual3_window': dict(k=2, steps=12, checkpoint_every=4, log_every=10, dual_every=3,
                            estimate='window', nan=3, kill=6),
    'k4_dual2_ema': dict(k=4, steps=16, checkpoint_every=8, log_every=4, dual_every=2,
                         estimate='ema', nan=5, kill=4),
}


def _constrained_config(p):
  c = _toy_config(p['k'], p['steps'], p['checkpoint_every'], p['log_every'])
  c.method = constrained.default_method_config()
  m = c.method
  m.constraint_classes, m.thresholds = (2, 3), (0.2, 0.3)
  m.objective_batch, m.constraint_batch = 16, 8
  m.dual_every, m.dual_estimate, m.dual_ema, m.dual_start = p['dual_every'], p['estimate'], 0.5, 1
  m.dual_lr, m.dual_lr_schedule, m.init_lambda = 3.0, 'primal', 0.1
  c.train.debug_nan_step, c.train.on_nonfinite = p['nan'], 'skip'
  return c


@pytest.fixture(scope='module', params=sorted(CONSTRAINED))
def constrained_run(request, tmp_path_factory, dataset):
  p = CONSTRAINED[request.param]
  return p, _Run(_constrained_config(p), tmp_path_factory.mktemp(request.param), dataset)


def test_constrained_killed_after_a_skipped_step_resumes_to_the_uninterrupted_run(
    constrained_run, dataset, tmp_path):
  """Multipliers, their estimators' state (window sum, EMA, counts) and everything else
  come back from the checkpoint: the resumed run ends array for array and record for
  record as the uninterrupted one."""
  p, full = constrained_run
  assert [r['nonfinite'] for r in full.records].count(1) == 1
  _resume_after_kill(_constrained_config(p), tmp_path, full, p['kill'], dataset)


def test_constrained_skipped_step_leaves_lr_and_dual_ascent_in_step(constrained_run):
  """A replay of the dual ascent from the logged per-step constraint losses: only applied
  (finite) steps count, for the optimizer's schedule (the lr logged and applied at a step is
  lr_fn(applied steps before it)), for the dual lr (dual_lr_schedule='primal': the same
  lr_fn), for the windows (dual_every applied steps each, their mean the window estimate) and
  for the bias-corrected EMA estimate; lambda moves at each window's end once dual_start
  steps have been applied, by eta (estimate - b). The records' means leave the skipped step out."""
  p, full = constrained_run
  c, exp = _constrained_config(p), full.result['experiment']
  steps = run_files.per_step(full.calls, p['k'])
  n = c.train.steps
  bad = steps['nonfinite'] != 0
  assert np.flatnonzero(bad).tolist() == [p['nan']]
  applied = np.cumsum(~bad) - ~bad          # applied steps before each step
  lr = np.array([float(exp.lr_fn(a)) for a in applied])
  np.testing.assert_allclose(steps['lr'], lr, rtol=1e-6)

  m, b = c.method, np.asarray(c.method.thresholds)
  lam = np.full(2, m.init_lambda)
  window, ema, dual_steps = [], np.zeros(2), 0
  for s in range(n):
    if bad[s]:
      continue
    loss = steps['constraint_loss'][s]
    window.append(loss)
    ema = m.dual_ema * ema + (1 - m.dual_ema) * loss
    estimate = (np.mean(window, 0) if m.dual_estimate == 'window'
                else ema / (1 - m.dual_ema ** (applied[s] + 1)))
    np.testing.assert_allclose(steps['constraint_gap'][s], estimate - b, rtol=1e-5,
                               atol=1e-6, err_msg=f'step {s}')
    if len(window) == m.dual_every:
      if applied[s] >= m.dual_start:
        eta = m.dual_lr * lr[s] / c.optim.lr
        lam = np.maximum(0.0, lam + eta * (estimate - b))
        dual_steps += 1
      window = []
    np.testing.assert_allclose(steps['lam'][s], lam, rtol=1e-5, atol=1e-7, err_msg=f'step {s}')
    assert steps['num_dual_steps'][s] == dual_steps, s
  assert dual_steps >= 3
  extras = jax.device_get(full.result['state'].extras)
  opt_count = train_step.schedule_step(jax.device_get(full.result['state'].opt_state), None)
  assert int(extras['ema_count']) == int(opt_count) == n - 1
  assert int(extras['num_dual_steps']) == dual_steps
  np.testing.assert_allclose(extras['lam'], lam, rtol=1e-5, atol=1e-7)
  run_files.assert_interval_means(full.records, steps, exp.batcher.global_batch_size)


def test_constrained_scanned_call_equals_single_steps(constrained_run, dataset):
  """Every per-step metric (multipliers, gaps, lr, the skipped step's flag) and the final
  state of the k-step calls equal those of one step per call."""
  p, full = constrained_run
  _scan_equals_single_steps(_constrained_config(p), full, dataset)


# ---------------------------------------------------------------------- TIW-DSM, joint


def _tiw_config():
  """TIW-DSM with the discriminator trained inside every score step (no first phase), 2
  steps per call: 8 steps, checkpoints at 4, records at 6 and 8."""
  c = _toy_config(2, 8, 4, 6)
  c.train.batch_size = 32
  c.method = tiw.default_config()
  c.method.update(dict(disc_hidden=32, disc_depth=1, disc_pretrain_steps=0, disc_joint=True,
                       disc_batch_size=32, disc_cache=False, imbalance_ratio=0.1))
  return c


@pytest.fixture(scope='module')
def tiw_run(tmp_path_factory, dataset):
  return _Run(_tiw_config(), tmp_path_factory.mktemp('tiw'), dataset)


def test_tiw_joint_discriminator_killed_resumes_to_the_uninterrupted_run(tiw_run, dataset,
                                                                         tmp_path):
  """The jointly trained discriminator (parameters and optimizer state in the extras)
  comes back from the checkpoint with the score model's state."""
  assert 'disc_bce' in tiw_run.calls[0] and 'opt_state' in tiw_run.result['state'].extras['disc']
  _resume_after_kill(_tiw_config(), tmp_path, tiw_run, 4, dataset)


def test_tiw_joint_scanned_call_equals_single_steps(tiw_run, dataset):
  """The discriminator's and the score model's steps inside a scanned call equal those of
  one step per call (each draws from the rng of its own step)."""
  _scan_equals_single_steps(_tiw_config(), tiw_run, dataset)
