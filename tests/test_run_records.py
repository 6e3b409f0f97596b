"""What the launcher records, checked against an independent computation: every
metrics.jsonl record is the mean of the per-step metrics of ``fit`` since the record
before, a run killed or preempted between checkpoints and rerun ends with the parameters
and the records of an uninterrupted run, and samples come from the params the config
names."""

import json
import os
import re

import jax
import numpy as np
import pytest

import run_files
from cdiff_jax import checkpoint, parallel, train, train_step, writers


def _config():
  """A tiny digits config: 8 steps, a record every 3 and a checkpoint every 2 steps."""
  return run_files.tiny_digits_config(log_every=3, checkpoint_every=2)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """Per-step metrics and final state of ``fit`` run in two calls (steps 0-4, 4-8), and an
  uninterrupted launcher run of the same config (on the fake clock)."""
  c = _config()
  exp = train.build(c)
  state, h1 = train.fit(exp, exp.init_state(), until=4)
  assert int(state.step) == 4
  state, h2 = train.fit(exp, state)
  workdir = str(tmp_path_factory.mktemp('full'))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train, 'time', run_files.FakeClock())
    full = train.train_and_evaluate(c, workdir, progress=False)
  return dict(per_step=run_files.per_step(h1 + h2),
              fit=run_files.leaves((state.params, state.ema_params)),
              full=full, workdir=workdir, records=writers.read_metrics(workdir))


def test_records_are_interval_means_of_fit(reference):
  """Every log step and the last step are recorded with the means since the record before;
  the launcher ends with the parameters of ``fit`` continued from step 4 (which trains on
  the batches of steps 4.., not those of 0..); the final metrics are the last record."""
  records, full = reference['records'], reference['full']
  assert {3, 6, 8} <= {r['step'] for r in records}
  run_files.assert_interval_means(records, reference['per_step'], _config().train.batch_size)
  for a, b in zip(reference['fit'],
                  run_files.leaves((full['state'].params, full['state'].ema_params))):
    np.testing.assert_array_equal(a, b)
  last = {key: v for key, v in records[-1].items() if key != 'step'}
  assert full['final_metrics'] == last
  summary = json.load(open(os.path.join(reference['workdir'], 'summary.json')))
  assert summary['final_metrics'] == last


def test_killed_run_resumes_to_the_same_records(reference, tmp_path, monkeypatch):
  """Killed after logging step 3, beyond its last checkpoint (2), then rerun: the stale
  record is dropped and the records and parameters are those of the uninterrupted run; a
  rerun of the finished run changes nothing."""
  c = _config()
  monkeypatch.setattr(train, 'time', run_files.FakeClock())
  calls = {'n': 0}
  original = train_step.CompiledStep.__call__

  def killed(self, state, batch):
    calls['n'] += 1
    if calls['n'] == 4:
      raise KeyboardInterrupt
    return original(self, state, batch)

  monkeypatch.setattr(train_step.CompiledStep, '__call__', killed)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(c, str(tmp_path), progress=False)
  monkeypatch.setattr(train_step.CompiledStep, '__call__', original)
  assert checkpoint.Checkpointer(str(tmp_path / 'checkpoints')).latest_step() == 2
  assert 3 in [r['step'] for r in writers.read_metrics(str(tmp_path))]

  resumed = train.train_and_evaluate(c, str(tmp_path), progress=False)
  assert writers.read_metrics(str(tmp_path)) == reference['records']
  for a, b in zip(reference['fit'], run_files.leaves((resumed['state'].params,
                                                      resumed['state'].ema_params))):
    np.testing.assert_array_equal(a, b)

  before = run_files.snapshot(str(tmp_path / 'checkpoints'))
  again = train.train_and_evaluate(c, str(tmp_path), progress=False)
  assert again['final_step'] == 8
  assert writers.read_metrics(str(tmp_path)) == reference['records']
  assert run_files.snapshot(str(tmp_path / 'checkpoints')) == before


def test_preemption_between_checkpoints_saves_there_and_resumes(reference, tmp_path,
                                                                monkeypatch, capsys):
  """A stop request at step 5 (no log or checkpoint step) writes that step's checkpoint and
  keeps the metrics of step 5 with it, not in a record of their own; the rerun resumes
  there, logs the uninterrupted run's records and ends with its parameters."""
  c = _config()
  monkeypatch.setattr(train, 'time', run_files.FakeClock())
  original = train._PreemptionWatch.should_stop
  monkeypatch.setattr(train._PreemptionWatch, 'should_stop', lambda self, step: step == 5)
  with pytest.raises(train.Preempted) as info:
    train.train_and_evaluate(c, str(tmp_path), progress=False)
  assert info.value.step == 5
  assert checkpoint.Checkpointer(str(tmp_path / 'checkpoints')).latest_step() == 5
  assert [r['step'] for r in writers.read_metrics(str(tmp_path))] == [
      r['step'] for r in reference['records'] if r['step'] < 5]

  monkeypatch.setattr(train._PreemptionWatch, 'should_stop', original)
  out = train.train_and_evaluate(c, str(tmp_path), progress=False)
  assert 'Resumed from step 5' in capsys.readouterr().out
  for a, b in zip(reference['fit'],
                  run_files.leaves((out['state'].params, out['state'].ema_params))):
    np.testing.assert_array_equal(a, b)
  records = writers.read_metrics(str(tmp_path))
  assert [r['step'] for r in records] == [r['step'] for r in reference['records']]
  run_files.assert_interval_means(records, reference['per_step'], c.train.batch_size,
                                  across_a_stop=(6,))


def test_a_notice_while_the_summary_is_written_leaves_the_old_one_whole(reference, tmp_path,
                                                                          monkeypatch):
  """After the last step SIGTERM raises ``Preempted`` wherever it lands; landing inside
  the write of summary.json (here: after the encoder's first piece) must leave no
  truncated summary, which the experiments would read back as a finished run. The rerun of
  a finished run removed the previous invocation's summary when it started (it would vouch
  for a config and outputs being rewritten), so there is none until a rerun ends."""
  import shutil
  workdir = tmp_path / 'run'
  shutil.copytree(reference['workdir'], workdir)
  before = json.loads((workdir / 'summary.json').read_text())

  encode = json.JSONEncoder.iterencode

  def encode_then_stop(self, o, _one_shot=False):
    if not (isinstance(o, dict) and 'final_step' in o):   # not the summary
      yield from encode(self, o, _one_shot)
      return
    yield '{'
    raise train.Preempted(8, str(workdir))

  def notice_arrives(exp, state, wd, samples):   # a hook runs just before the summary
    monkeypatch.setattr(json.JSONEncoder, 'iterencode', encode_then_stop)

  with pytest.raises(train.Preempted):
    train.train_and_evaluate(_config(), str(workdir), progress=False,
                             hooks={'notice': notice_arrives})
  monkeypatch.undo()
  assert not (workdir / 'summary.json').exists()
  assert not [f for f in os.listdir(workdir) if f.endswith('.tmp')]
  train.train_and_evaluate(_config(), str(workdir), progress=False)
  after = json.loads((workdir / 'summary.json').read_text())
  assert after['final_step'] == before['final_step'] == 8


def test_throughput_leaves_out_checkpoint_writes_and_in_loop_sampling(tmp_path, monkeypatch):
  """images_per_sec counts training: on a clock where every reading takes 1 s, drawing
  in-loop samples and writing a checkpoint take 100 s each, and no record's interval holds
  them (an earlier version logged ~1/50 of the throughput after each)."""
  c = run_files.tiny_digits_config(log_every=2, checkpoint_every=4)
  c.train.sample_every = 2
  clock = run_files.FakeClock()
  monkeypatch.setattr(train, 'time', clock)

  def slow(original):
    def call(*args, **kwargs):
      clock.now += 100.0
      return original(*args, **kwargs)
    return call

  monkeypatch.setattr(train, 'save_samples', slow(lambda *args, **kwargs: None))
  monkeypatch.setattr(checkpoint.Checkpointer, 'save', slow(checkpoint.Checkpointer.save))
  train.train_and_evaluate(c, str(tmp_path), progress=False)
  records = writers.read_metrics(str(tmp_path))
  assert [r['step'] for r in records] == [2, 4, 6, 8]
  for r in records:  # 2 steps of 16 images in at most 3 readings of the clock
    assert r['images_per_sec'] >= 32 / 3, r


def test_sample_grids_reuse_the_runs_sampler(tiny_config, tmp_path, monkeypatch):
  """``exp.sampler()`` is one Sampler per setting: the in-loop sample grids and the final
  samples of a run build it once (a new one per grid compiled its programs again: 3.4 s per
  grid on the tiny model, 0.07 s reused), and the same call draws the same images. Another
  setting or eps_fn gets its own."""
  built = []

  class Counting(train.Sampler):
    def __init__(self, *args, **kwargs):
      built.append(kwargs)
      super().__init__(*args, **kwargs)

  monkeypatch.setattr(train, 'Sampler', Counting)
  tiny_config.sample.num_steps, tiny_config.train.sample_every = 2, 2
  train.train_and_evaluate(tiny_config, str(tmp_path), progress=False)
  assert len(os.listdir(tmp_path / 'samples')) == 4      # steps 2, 4, 6 and final
  assert len(built) == 1, built
  exp, state = train.load_run(str(tmp_path))
  sampler = exp.sampler()
  assert exp.sampler() is sampler and len(built) == 2
  rng = jax.random.key(0)
  first = np.asarray(sampler(state.ema_params, rng, 2, exp.sample_labels(2)))
  np.testing.assert_array_equal(first, exp.sampler()(state.ema_params, rng, 2,
                                                     exp.sample_labels(2)))
  assert exp.sampler(num_steps=3) is not sampler
  assert exp.sampler(eps_fn=exp.eps_fn) is not sampler
  exp.config.sample.eta = 1.0
  assert exp.sampler() is not sampler


def test_samples_come_from_the_params_the_config_names(tiny_config, tmp_path):
  """sample.use_ema picks ema_params or params for the sample grids; the number asked for
  is rounded up (not down) to the device count."""
  tiny_config.sample.num_steps, tiny_config.sample.clip = 2, 0.0   # unclipped: params show
  exp = train.build(tiny_config)
  state = exp.init_state()
  # (the zero-initialized output layer would hide a rescaling)
  state = state.replace(ema_params=jax.tree.map(lambda p: p + 0.01, state.params))
  sampler = exp.sampler()
  rng = jax.random.key(3)
  devices = exp.mesh.devices.size

  def direct(params, n):
    return np.asarray(parallel.to_host(sampler(params, rng, n, exp.sample_labels(n))))

  n = -(-3 // devices) * devices
  for use_ema, chosen, other in ((True, state.ema_params, state.params),
                                 (False, state.params, state.ema_params)):
    exp.config.sample.use_ema = use_ema
    images = train.save_samples(exp, state, str(tmp_path / f'{use_ema}.png'), num=3, rng=rng,
                                sampler=sampler)
    assert len(images) == n >= 3
    np.testing.assert_array_equal(images, direct(chosen, n))
    assert not np.array_equal(images, direct(other, n))


def test_a_run_loads_back_from_its_workdir(reference, tmp_path):
  """train.load_run rebuilds the run from config.json and its newest checkpoint: the final
  state of the run, and the same final sample grid, pixel for pixel."""
  from PIL import Image
  exp, state = train.load_run(reference['workdir'])
  assert int(state.step) == exp.config.train.steps == 8
  for a, b in zip(run_files.leaves((state.params, state.ema_params)), reference['fit']):
    np.testing.assert_array_equal(a, b)
  train.save_samples(exp, state, str(tmp_path / 'again.png'))
  final = os.path.join(reference['workdir'], 'samples', 'final.png')
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'again.png')),
                                np.asarray(Image.open(final)))
  with pytest.raises(FileNotFoundError, match='holds no config.json'):
    train.load_run(str(tmp_path))


def _readme_examples() -> list[str]:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, 'README.md')) as f:
    return re.findall(r'```python\n(.*?)```', f.read(), re.S)


def test_the_readme_library_examples_run_as_written(reference, monkeypatch):
  """The README's two library examples, as printed there but for fewer steps and another
  workdir: the build / step / sample loop gives images of the data's shape in [-1, 1]
  after the steps it ran, and load_run gives back the reference run's last state."""
  first, second = _readme_examples()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  monkeypatch.syspath_prepend(root)  # `from configs import ...`, as from the repository root
  for old, new in (('range(200)', 'range(2)'), ('num_steps=50', 'num_steps=3')):
    assert old in first
    first = first.replace(old, new)
  scope = {}
  exec(compile(first, 'README.md', 'exec'), scope)
  assert int(scope['state'].step) == 2
  assert np.isfinite(float(scope['metrics']['loss']))
  images = np.asarray(parallel.to_host(scope['images']))
  assert images.shape == (16, 8, 8, 1) and -1 <= images.min() < images.max() <= 1
  assert "'runs/demo/constrained'" in second
  exec(compile(second.replace("'runs/demo/constrained'", repr(reference['workdir'])),
               'README.md', 'exec'), scope)
  assert int(scope['state'].step) == 8
  loaded = scope['state']
  for a, b in zip(run_files.leaves((loaded.params, loaded.ema_params)), reference['fit']):
    np.testing.assert_array_equal(a, b)
  assert np.asarray(parallel.to_host(scope['images'])).shape == (20, 8, 8, 1)


def test_the_end_state_recorded_is_the_methods_small_arrays():
  """summary.json's final_extras: the multipliers and counters at the last step, not a
  jointly trained discriminator's parameters (a nested dict) or large arrays."""
  import jax.numpy as jnp
  extras = dict(lam=jnp.array([0.25, 0.5]), num_dual_steps=jnp.int32(7),
                disc=dict(params=dict(w=jnp.ones((2, 2)))), big=jnp.zeros(65))
  assert train.small_extras(extras) == dict(lam=[0.25, 0.5], num_dual_steps=7)
