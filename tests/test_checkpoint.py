"""Interrupted-and-resumed training equals uninterrupted training, bit for bit; an
incompatible checkpoint is refused."""

import os

import jax
import numpy as np
import pytest

import run_files
from cdiff_jax import checkpoint, train, train_step


def _params(result):
  state = result['state']
  state = state.replace(rng=jax.random.key_data(state.rng))
  return [np.asarray(x) for x in jax.tree.leaves(state)]


def test_resume_is_exact(tiny_config, tmp_path, monkeypatch):
  tiny_config.train.keep_checkpoints = 1
  full = train.train_and_evaluate(tiny_config, str(tmp_path / 'full'), progress=False)
  assert os.listdir(tmp_path / 'full' / 'checkpoints') == ['8']   # step 4 deleted

  calls = {'n': 0}
  original = train_step.CompiledStep.__call__

  def interrupted(self, state, batch):
    calls['n'] += 1
    if calls['n'] == 6:  # after the checkpoint at step 4, mid-way to the end
      raise KeyboardInterrupt
    return original(self, state, batch)

  monkeypatch.setattr(train_step.CompiledStep, '__call__', interrupted)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(tiny_config, str(tmp_path / 'resumed'), progress=False)
  monkeypatch.setattr(train_step.CompiledStep, '__call__', original)
  resumed = train.train_and_evaluate(tiny_config, str(tmp_path / 'resumed'), progress=False)

  assert resumed['final_step'] == full['final_step'] == 8
  for a, b in zip(_params(full), _params(resumed)):
    np.testing.assert_array_equal(a, b)
  # The resumed run appended to the metrics instead of losing the first half.
  from cdiff_jax import writers
  steps = [r['step'] for r in writers.read_metrics(str(tmp_path / 'resumed'))]
  assert steps == [4, 8]
  # TensorBoard is told to hide what the killed run logged after the checkpoint (step 4).
  assert run_files.tensorboard_events(tmp_path / 'resumed' / 'tensorboard')[1] == [5]


def test_incompatible_checkpoint_is_refused(tiny_config, tmp_path, capsys):
  train.train_and_evaluate(tiny_config, str(tmp_path), progress=False)
  tiny_config.model.ch = 24
  with pytest.raises(checkpoint.IncompatibleCheckpoint, match='model.ch: checkpoint 16'):
    train.train_and_evaluate(tiny_config, str(tmp_path), progress=False)
  # A state of another layout that the fingerprint does not name: one clear error too (a
  # resume names the optimizer field first; loading the run meets the layout).
  tiny_config.model.ch = 16
  tiny_config.optim.grad_clip = 0.0
  with pytest.raises(checkpoint.IncompatibleCheckpoint, match=r'\(optim.grad_clip: checkpoint'):
    train.train_and_evaluate(tiny_config, str(tmp_path), progress=False)
  with pytest.raises(checkpoint.IncompatibleCheckpoint, match='another layout'):
    train.load_run(str(tmp_path), config=tiny_config)
  tiny_config.optim.grad_clip = 1.0
  # The optimizer's and the EMA's settings shape every step: a resume that changed them
  # would train a run no config describes while its config.json named the new values.
  # Loading the run (for samples) is not training it, and needs no such match.
  for field, value in (('optim.lr', 5e-4), ('train.ema_decay', 0.9), ('optim.warmup_steps', 3)):
    changed = tiny_config.copy_and_resolve_references()
    changed.update_from_flattened_dict({field: value})
    with pytest.raises(checkpoint.IncompatibleCheckpoint,
                       match=rf'trained with other settings \({field}: checkpoint .* vs now '
                             rf'{value}\); a resumed run keeps them.*init_from'):
      train.train_and_evaluate(changed, str(tmp_path), progress=False)
    assert train.load_run(str(tmp_path), config=changed)[1].step == 8
  # The resume checks hold the step restored, not the newest folder: under an unreadable
  # step 12 the run resumes from 8, which 3 steps per call do not divide (it checked 12,
  # resumed from 8 and ran past train.steps without a final checkpoint).
  from cdiff_jax import config as config_lib
  (tmp_path / 'checkpoints' / '12').mkdir()
  scanned = tiny_config.copy_and_resolve_references()
  scanned.update_from_flattened_dict({'train.steps': 12, 'train.steps_per_call': 3,
                                      'train.log_every': 3, 'train.checkpoint_every': 6})
  with pytest.raises(config_lib.ConfigError,
                     match='steps_per_call=3: the checkpoint is at step 8; use a divisor'):
    train.train_and_evaluate(scanned, str(tmp_path), progress=False)
  # A longer run of the same config resumes (a run may be extended), and so does one that
  # finds its data elsewhere or logs at another cadence; with metrics.jsonl gone it warns
  # that the records before its checkpoint are lost.
  tiny_config.train.log_every = 2
  tiny_config.train.steps = 12
  (tmp_path / 'moved').mkdir()
  tiny_config.data.data_dir = str(tmp_path / 'moved')
  (tmp_path / 'metrics.jsonl').unlink()
  capsys.readouterr()
  out = train.train_and_evaluate(tiny_config, str(tmp_path), progress=False)
  assert out['final_step'] == 12
  err = capsys.readouterr().err
  assert 'the records of the steps before 8 are lost' in err
  # Said once, at the resume: the cosine schedule from step 8 is that of 12 steps.
  assert err.count('the checkpoint at step 8 was trained toward train.steps=8, this run goes '
                   'to 12: its learning rate from here follows the cosine schedule') == 1, err


def test_fingerprint_covers_the_method_but_not_paths():
  from cdiff_jax import config as config_lib
  from configs import digits_minority
  c = digits_minority.get_config()
  base = config_lib.fingerprint(c)
  for field, value in [('method.enabled', False), ('method.dual_lr', 0.5),
                       ('method.objective_batch', 8), ('method.constraint_t_min', 0.0)]:
    changed = digits_minority.get_config()
    changed.update_from_flattened_dict({field: value})
    assert [d.split(':')[0] for d in config_lib.fingerprint_mismatch(
        base, config_lib.fingerprint(changed))] == [field]
  for field, value in [('method.reference_workdir', '/elsewhere'), ('data.data_dir', '/data'),
                       ('optim.lr', 1.0), ('train.steps', 7)]:
    changed = digits_minority.get_config()
    changed.update_from_flattened_dict({field: value})
    assert config_lib.fingerprint(changed) == base, field
  # A checkpoint written before a field joined the fingerprint still resumes; one whose
  # recorded fields differ does not.
  older = {k: v for k, v in base.items() if not k.startswith('method.') or k == 'method.name'}
  assert config_lib.fingerprint_mismatch(older, base) == []
  older['model.ch'] = base['model.ch'] + 1
  assert [d.split(':')[0] for d in config_lib.fingerprint_mismatch(older, base)] == ['model.ch']


def test_fingerprint_covers_seed_and_batch_size():
  """Every structural field but paths is in the fingerprint: seed, batch size, optimizer,
  model, data and diffusion fields each show up as the one difference."""
  from cdiff_jax import config as config_lib
  base_cfg = config_lib.base_config()
  base = config_lib.fingerprint(base_cfg)
  for field in ('seed', 'train.batch_size', 'optim.name', 'model.ch', 'diffusion',
                'data.name', 'method.name'):
    assert any(k == field or k.startswith(field + '.') for k in base), field
  for field, value in [('seed', base_cfg.seed + 1),
                       ('train.batch_size', base_cfg.train.batch_size * 2)]:
    changed = config_lib.base_config()
    changed.update_from_flattened_dict({field: value})
    assert [d.split(':')[0] for d in config_lib.fingerprint_mismatch(
        base, config_lib.fingerprint(changed))] == [field]


def test_hash_pytree_depends_on_every_leaf_value():
  """hash_pytree keys a cache: equal trees hash equal, a change in any leaf changes it."""
  import hashlib
  tree = {'a': np.arange(6, dtype=np.float32).reshape(2, 3), 'b': [np.ones(4, np.float32),
                                                                   np.zeros((), np.int32)]}
  def digest(t):
    h = hashlib.sha256()
    checkpoint.hash_pytree(h, t)
    return h.hexdigest()
  base = digest(tree)
  assert digest(jax.tree.map(np.copy, tree)) == base
  assert digest(jax.tree.map(jax.numpy.asarray, tree)) == base
  for i in range(len(jax.tree.leaves(tree))):
    leaves, treedef = jax.tree.flatten(tree)
    leaves[i] = leaves[i] + 1
    assert digest(jax.tree.unflatten(treedef, leaves)) != base, i


def test_a_reader_beside_a_training_run_takes_the_newest_checkpoint_left(tiny_config, tmp_path,
                                                                        monkeypatch):
  """A reader (load_run, the sampling command) beside a run that is still training can see
  its newest step deleted (keep_checkpoints) between listing and reading it: it then reads
  the newest step that is left, instead of failing as if there were none."""
  import shutil
  tiny_config.train.keep_checkpoints = 0   # keep every step: 4 and 8
  train.train_and_evaluate(tiny_config, str(tmp_path), progress=False)
  ckpt_dir = tmp_path / 'checkpoints'
  reader = checkpoint.Checkpointer(str(ckpt_dir))
  real = checkpoint.Checkpointer._restore

  def deleted_first(self, step, abstract_state, config, resume=False):
    if step == 8 and (ckpt_dir / '8').exists():   # the run deletes it just now
      shutil.rmtree(ckpt_dir / '8')
    return real(self, step, abstract_state, config, resume)

  monkeypatch.setattr(checkpoint.Checkpointer, '_restore', deleted_first)
  exp = train.build(tiny_config)
  state, step = reader.restore_latest(exp.init_state(), tiny_config)
  reader.close()
  assert step == 4 and int(state.step) == 4


def test_a_run_loads_without_the_paths_only_training_reads(tiny_config, tmp_path):
  """A run whose data folder is gone loads from its checkpoint when it kept its training
  data (training_data.npz); without it, the one error names the missing data."""
  import json
  from cdiff_jax.data import sources
  tiny_config.data.source = 'npz'
  tiny_config.data.data_dir = str(tmp_path / 'digits.npz')
  digits = sources.load_digits('train')
  np.savez(tmp_path / 'digits.npz', train_images=digits.images, train_labels=digits.labels)
  wd = tmp_path / 'run'
  train.train_and_evaluate(tiny_config, str(wd), progress=False)
  (tmp_path / 'digits.npz').unlink()
  with pytest.raises(FileNotFoundError, match='digits.npz'):
    train.load_run(str(wd))
  train.save_training_data(str(wd), digits)
  exp, state = train.load_run(str(wd))
  assert int(state.step) == 8 and exp.dataset.images.shape == digits.images.shape
  assert json.load(open(wd / 'config.json'))['data']['data_dir'] == str(tmp_path / 'digits.npz')


def test_a_checkpoint_without_its_meta_item_is_refused_by_name(tiny_config, tmp_path):
  # Checkpoint folders another program wrote, or copied by hand without their ``meta``
  # item, are refused with what is missing instead of Orbax's own error.
  import shutil
  # (Only the newest step without it: the one before is read instead, see below.)
  train.train_and_evaluate(tiny_config, str(tmp_path), progress=False)
  for step_dir in (tmp_path / 'checkpoints').iterdir():
    shutil.rmtree(step_dir / 'meta')
  with pytest.raises(checkpoint.IncompatibleCheckpoint, match="step 8 .* no 'meta' item"):
    train.train_and_evaluate(tiny_config, str(tmp_path), progress=False)


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')  # Orbax's reads
def test_unreadable_newest_checkpoints_fall_back_to_the_newest_readable_one(tiny_config,
                                                                          tmp_path, capsys):
  """Step folders damaged (an array file cut short by a full disk or a copy, a truncated
  meta file, a folder left empty): a reader takes the newest readable step, and a rerun
  resumes from it, keeps each damaged folder aside (STEP.unreadable) and ends with the
  uninterrupted run's parameters. It stopped with Orbax's or json's traceback, or named a
  missing 'meta' item."""
  import shutil
  tiny_config.train.steps, tiny_config.train.checkpoint_every = 12, 4
  tiny_config.train.keep_checkpoints = 0   # keep every step: 4, 8 and 12
  full = train.train_and_evaluate(tiny_config, str(tmp_path / 'full'), progress=False)
  wd = tmp_path / 'run'
  shutil.copytree(tmp_path / 'full', wd)
  (wd / 'summary.json').unlink()
  ckpts = wd / 'checkpoints'
  data = max((p for p in (ckpts / '12' / 'state').rglob('*') if p.is_file()),
             key=lambda p: p.stat().st_size)
  with open(data, 'r+b') as f:
    f.truncate(data.stat().st_size // 2)
  meta = ckpts / '8' / 'meta' / 'metadata'
  meta.write_text(meta.read_text()[:20])
  (ckpts / '10').mkdir()
  capsys.readouterr()
  exp, state = train.load_run(str(wd))   # a reader: the newest readable step, nothing renamed
  assert int(state.step) == 4 and all((ckpts / s).exists() for s in ('8', '10', '12'))
  assert 'reading step 4, the newest readable one' in capsys.readouterr().err
  tiny_config.train.steps = 12
  resumed = train.train_and_evaluate(tiny_config, str(wd), progress=False)
  err = capsys.readouterr().err
  for s in (8, 10, 12):
    assert f'at step {s} ' in err and f'{s}.unreadable' in err, err[-3000:]
    assert (ckpts / f'{s}.unreadable').is_dir()
  assert 'resuming from step 4' in err
  assert resumed['final_step'] == full['final_step'] == 12
  for a, b in zip(_params(full), _params(resumed)):
    np.testing.assert_array_equal(a, b)


def test_a_stop_inside_a_logging_interval_logs_what_an_uninterrupted_run_logs(
    tiny_config, tmp_path, monkeypatch):
  """Preempted at step 3 of a 4-step logging interval: the three steps' metrics go with the
  checkpoint, and the rerun's record at step 4 is the mean over steps 1-4, as in an
  uninterrupted run (it logged a record of steps 1-3 at the stop and one of step 4 alone,
  and the run's final metrics, which the experiments' tables read, moved with it)."""
  import json
  import os
  from cdiff_jax import writers
  tiny_config.train.steps, tiny_config.train.log_every = 8, 4
  tiny_config.train.checkpoint_every = 0
  full = train.train_and_evaluate(tiny_config, str(tmp_path / 'full'), progress=False)
  wd = str(tmp_path / 'stopped')
  real = train._PreemptionWatch.should_stop
  monkeypatch.setattr(train._PreemptionWatch, 'should_stop',
                      lambda self, step: step == 3 or real(self, step))
  with pytest.raises(train.Preempted, match='at step 3'):
    train.train_and_evaluate(tiny_config, wd, progress=False)
  monkeypatch.undo()
  resumed = train.train_and_evaluate(tiny_config, wd, progress=False)
  for a, b in zip(_params(full), _params(resumed)):
    np.testing.assert_array_equal(a, b)
  drop = lambda r: {k: v for k, v in r.items() if k != 'images_per_sec'}
  full_records = [drop(r) for r in writers.read_metrics(str(tmp_path / 'full'))]
  assert [r['step'] for r in full_records] == [4, 8]
  assert [drop(r) for r in writers.read_metrics(wd)] == full_records
  summaries = [json.load(open(os.path.join(d, 'summary.json'))) for d in (tmp_path / 'full', wd)]
  assert drop(summaries[0]['final_metrics']) == drop(summaries[1]['final_metrics'])
