"""The five experiment scripts end to end: each ``main()`` runs once on a tiny config (in a
subprocess: the scripts define their flags at import; one test per script, so that under
pytest-xdist no script runs twice), and what it writes is checked
against figures recomputed here from the files it leaves (the arms' saved samples, the
evaluation classifier, the data), never against stored numbers. A second call of the
script must reuse the finished stages and leave their files as they were.

The models are a few training steps old, so the figures mean nothing as science; what is
checked is that main() computes and reports them from the right arm, class and samples.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import run_files
from cdiff_jax import checkpoint, evaluation
from cdiff_jax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CLASSIFIER_STEPS = 60   # the evaluation classifier (trained once, cached, shared by all)
# A one-level UNet trained for 4 steps; small samplers and evaluations.
IMAGE_TINY = {'model.ch': 8, 'model.ch_mult': (1,), 'model.num_res_blocks': 1,
              'model.attn_levels': (), 'train.steps': 4, 'train.batch_size': 16,
              'train.log_every': 2, 'train.checkpoint_every': 0, 'optim.warmup_steps': 1,
              'sample.num_steps': 4, 'sample.num_samples': 8, 'eval.num_samples': 40,
              'eval.classifier_steps': CLASSIFIER_STEPS}


def _config(module: str, overrides: dict):
  """The config the script builds from ``configs/<module>.py`` and ``overrides``."""
  import importlib
  c = importlib.import_module(f'configs.{module}').get_config()
  c.update_from_flattened_dict(overrides)
  return c


def _launch(script: str, workdir, config: str, overrides: dict, *extra, stderr=False,
            xla_flags=None):
  """Runs ``python -m experiments.<script>`` (two host devices, as every test); its stdout
  (and its stderr with ``stderr=True``). ``xla_flags``: the script's XLA_FLAGS (by default
  this process's, which hold the run's XLA:CPU options already)."""
  args = [f'--config.{k}={v!r}' for k, v in overrides.items()]
  env = dict(os.environ, **({} if xla_flags is None else {'XLA_FLAGS': xla_flags}))
  out = subprocess.run([sys.executable, '-m', f'experiments.{script}',
                        f'--config=configs/{config}.py', f'--workdir={workdir}', '--noprogress',
                        *args, *extra], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=env)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  return (out.stdout, out.stderr) if stderr else out.stdout


def _classifier():
  from configs import digits_dsm
  return evaluation.get_classifier(digits_dsm.get_config().data, steps=CLASSIFIER_STEPS)


def _frequencies(clf, samples) -> np.ndarray:
  labels = clf.predict(np.asarray(samples, np.float32))
  return np.bincount(labels, minlength=clf.num_classes) / len(labels)


def _assert_frequencies(got, samples, clf):
  """``got`` are the class frequencies of ``samples`` (saved as float16, labelled in
  float32 by the script: one sample on a decision boundary may flip)."""
  want = _frequencies(clf, samples)
  assert np.abs(np.asarray(got) - want).sum() <= 2 / len(samples) + 1e-9, (got, want)


def _json(path):
  with open(path) as f:
    return json.load(f)


# ----------------------------------------------------------------------------- minority

MINORITY = dict(IMAGE_TINY, **{'method.objective_batch': 16, 'method.constraint_batch': 4,
                               'method.dual_start': 0, 'method.dual_lr': 0.5})


def _check_minority_reports_each_arms_own_run(minority_run):
  """comparison.json holds each arm's own eval.json, run time and final multipliers and
  thresholds (the last metrics record of the constrained arm); the class frequencies are
  those of the arm's saved samples under the evaluation classifier; the unconstrained arm
  is the same config with the method off, and the constrained one takes its thresholds
  from it."""
  wd, clf = minority_run, _classifier()
  comparison = _json(wd / 'comparison.json')
  assert list(comparison) == ['unconstrained', 'constrained']
  config = _config('digits_minority', MINORITY)
  for name, row in comparison.items():
    arm = wd / name
    assert row['eval'] == _json(arm / 'eval.json'), name
    assert row['seconds'] == _json(arm / 'summary.json')['seconds'] > 0
    _assert_frequencies(row['eval']['class_frequencies'], np.load(arm / 'eval_samples.npy'), clf)
    saved = _json(arm / 'config.json')
    assert saved['method']['enabled'] == (name == 'constrained')
    assert saved['optim']['lr'] == config.optim.lr and saved['model']['ch'] == 8
  last = [json.loads(l) for l in open(wd / 'constrained' / 'metrics.jsonl')][-1]
  assert last['step'] == 4
  # The multipliers at the end: the final checkpoint's (a record holds interval means).
  end = checkpoint.load_params(str(wd / 'constrained'), 'extras')['lam']
  np.testing.assert_array_equal(comparison['constrained']['lam'], np.asarray(end).tolist())
  np.testing.assert_allclose(comparison['constrained']['thresholds'], last['threshold'])
  assert np.ptp(end) > 0   # the multipliers moved, each on its own
  assert comparison['unconstrained']['lam'] == [0.0] * 3   # fixed at 0
  assert (_json(wd / 'constrained' / 'config.json')['method']['reference_workdir']
          == str(wd / 'unconstrained'))


def _check_minority_table_and_figures_agree_with_the_json(minority_run):
  """comparison.md's rows are the JSON's figures (minority column: data.minority_classes);
  comparison_samples.png puts the arms' own sample grids side by side, unconstrained
  first."""
  from PIL import Image
  wd = minority_run
  comparison = _json(wd / 'comparison.json')
  rows = run_files.markdown_rows((wd / 'comparison.md').read_text())
  minority = sorted(_config('digits_minority', MINORITY).data.minority_classes)
  for name, arm in comparison.items():
    row, ev = rows[name], arm['eval']
    assert abs(float(row['TV to uniform']) - ev['tv_to_uniform']) <= 5e-4
    assert abs(float(row['classifier FID']) - ev['classifier_fid']) <= 5e-3
    col = f"minority freq. ({', '.join(map(str, minority))})"
    np.testing.assert_allclose(run_files.floats(row[col]),
                               [ev['class_frequencies'][c] for c in minority], atol=5e-4)
  np.testing.assert_allclose(run_files.floats(rows['constrained']['lambda (end)']),
                             comparison['constrained']['lam'], atol=5e-4)
  side = np.asarray(Image.open(wd / 'comparison_samples.png'))
  grids = [np.asarray(Image.open(wd / n / 'samples' / 'eval_samples.png')) for n in comparison]
  from experiments.minority import LABEL_HEIGHT as top   # the arm's name above its grid
  np.testing.assert_array_equal(side[top:top + grids[0].shape[0], :grids[0].shape[1]], grids[0])
  w = grids[0].shape[1] + 8
  np.testing.assert_array_equal(side[top:top + grids[1].shape[0], w:w + grids[1].shape[1]],
                                grids[1])


def _check_minority_rerun_reuses_both_arms(minority_run):
  """A second call trains nothing: both arms are read back, their files stay as they were,
  and the table is written again with the same figures."""
  wd = minority_run
  arms = {n: run_files.snapshot(wd / n) for n in ('unconstrained', 'constrained')}
  table = (wd / 'comparison.md').read_text()
  comparison = _json(wd / 'comparison.json')
  out = _launch('minority', wd, 'digits_minority', MINORITY)
  assert out.count('finished earlier, reusing it') == 2, out[-2000:]
  for name, snap in arms.items():
    assert run_files.snapshot(wd / name) == snap, name
  assert (wd / 'comparison.md').read_text() == table
  assert _json(wd / 'comparison.json') == comparison


def _check_minority_resumed_arm_runs_with_the_xla_options(minority_run):
  """A finished constrained arm that lost its samples (which tiw_compare and finetune read
  back: a traceback) is run again, which redoes its sampling and evaluation from its final
  checkpoint, beside the reused reference. The reference's parameters, read first for the
  arm's key, must not start JAX before the run's XLA:CPU options are set (they did: the arm
  then sampled and evaluated without them, and its figures moved in the last digits)."""
  wd = minority_run
  evaluated = _json(wd / 'constrained' / 'eval.json')
  (wd / 'constrained' / 'eval_samples.npy').unlink()
  out, err = _launch('minority', wd, 'digits_minority', MINORITY, stderr=True,
                     xla_flags='--xla_force_host_platform_device_count=2')
  assert out.count('finished earlier, reusing it') == 1, out[-2000:]
  assert 'not applied' not in err, err[-2000:]
  assert _json(wd / 'constrained' / 'eval.json') == evaluated
  assert (wd / 'constrained' / 'eval_samples.npy').exists()


def test_minority_main(tmp_path):
  """experiments/minority.py end to end, then again (see the checks)."""
  _launch('minority', tmp_path, 'digits_minority', MINORITY)
  _check_minority_reports_each_arms_own_run(tmp_path)
  _check_minority_table_and_figures_agree_with_the_json(tmp_path)
  _check_minority_rerun_reuses_both_arms(tmp_path)
  _check_minority_resumed_arm_runs_with_the_xla_options(tmp_path)


# ----------------------------------------------------------------------------- finetune

FINETUNE = dict(IMAGE_TINY, **{
    'finetune.pretrain_steps': 4, 'finetune.pretrain_batch': 16, 'finetune.num_generated': 20,
    'finetune.new_data_size': 12, 'finetune.new_data_seed': 3,
    # Large steps: pre-training moves the parameters far from their initialization (so
    # where the fine-tuned arms started from shows in their parameters), and fine-tuning
    # moves them on far enough that the three models' samples differ.
    'finetune.pretrain_lr': 0.1, 'optim.lr': 0.02,
    'method.objective_batch': 8, 'method.constraint_batch': 8, 'method.dual_start': 0})


def _new_data(config):
  """The new, small data set, drawn here as the script documents it."""
  full = sources.load_dataset(config.data, 'train')
  rng = np.random.default_rng(config.finetune.new_data_seed)
  idx = np.sort(rng.choice(len(full), config.finetune.new_data_size, replace=False))
  return sources.to_float(full.images[idx]), full.labels[idx], full


def _check_finetune_pretrained_model_never_saw_the_dropped_class(finetune_run):
  """The pre-training run drops finetune.pretrain_drop_classes from its data (its training
  class frequencies, counted here, are 0 there) with its own steps, batch and rate."""
  wd = finetune_run
  config = _config('digits_finetune', FINETUNE)
  drop = config.finetune.pretrain_drop_classes[0]
  saved = _json(wd / 'pretrained' / 'config.json')
  assert saved['data']['drop_classes'] == [drop] and saved['method'] == {'name': 'dsm'}
  assert (saved['train']['steps'], saved['train']['batch_size'], saved['optim']['lr']) == (
      4, 16, 0.1)
  assert saved['train']['init_from'] == ''
  labels = sources.load_dataset(config.data, 'train').labels
  kept = labels[labels != drop]
  ev = _json(wd / 'pretrained' / 'eval.json')
  np.testing.assert_allclose(ev['training_class_frequencies'],
                             np.bincount(kept, minlength=10) / len(kept))
  # Measured against the classes it was trained on: uniform over them, their test images.
  assert ev['uniform_over'] == [c for c in range(10) if c != drop]
  freqs = np.asarray(ev['class_frequencies'])
  target = np.where(np.arange(10) == drop, 0.0, 1 / 9)
  assert ev['tv_to_uniform'] == pytest.approx(0.5 * np.abs(freqs - target).sum())
  test_labels = sources.load_dataset(config.data, 'test').labels
  assert ev['num_reference'] == int(np.sum(test_labels != drop))


def _check_finetune_arms_start_from_the_pretrained_model(finetune_run):
  """Both arms name the pre-trained run as init_from and the q_pre samples they were
  trained against; their parameters lie nearer the pre-trained EMA parameters than a
  fresh initialization; the q_pre samples are labelled by the evaluation classifier."""
  import jax
  from cdiff_jax import checkpoint, train
  wd = finetune_run
  pre_dir = str(wd / 'pretrained')
  with np.load(wd / 'pretrained_samples.npz') as f:
    key, images, labels = str(f['key']), f['images'], f['labels']
  assert images.shape == (20, 8, 8, 1)
  np.testing.assert_array_equal(labels, _classifier().predict(images))
  pre = checkpoint.load_params(pre_dir, 'ema_params')
  import ml_collections
  config = _config('digits_finetune', FINETUNE)
  config.method = ml_collections.ConfigDict(dict(name='dsm'))   # the same network, plain data
  fresh = train.build(config).init_state().params
  dist = lambda a, b: float(np.sqrt(sum(np.sum((np.asarray(x) - np.asarray(y)) ** 2)
                                        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))))
  for name in ('unconstrained', 'constrained'):
    saved = _json(wd / name / 'config.json')
    assert saved['train']['init_from'] == pre_dir
    assert saved['finetune']['q_pre_samples'] == key[:16]
    assert saved['method']['enabled'] == (name == 'constrained')
    arm = checkpoint.load_params(str(wd / name), 'params')
    assert dist(arm, pre) < dist(arm, fresh), (name, dist(arm, pre), dist(arm, fresh))
  saved = _json(wd / 'constrained' / 'config.json')['method']
  assert (saved['threshold_mode'], saved['reference_workdir']) == ('reference', pre_dir)


def _check_finetune_table_recomputed_from_the_saved_samples(finetune_run):
  """'fraction of 9s' is the frequency of the dropped class among each arm's (and the
  pre-trained model's) saved samples under the evaluation classifier; the distance column
  is recomputed by a brute-force loop over the new images; comparison.json holds each
  run's own eval.json and agrees with comparison.md; the arms' objective data are the new
  images (their training class frequencies)."""
  wd, clf = finetune_run, _classifier()
  config = _config('digits_finetune', FINETUNE)
  drop = config.finetune.pretrain_drop_classes[0]
  new_images, new_labels, _ = _new_data(config)
  comparison = _json(wd / 'comparison.json')
  assert list(comparison) == ['pretrained', 'unconstrained', 'constrained']
  text = (wd / 'comparison.md').read_text()
  rows = run_files.markdown_rows(text.split('fraction of 9s')[0])
  extra = run_files.markdown_rows('| arm | fraction of 9s' + text.split('fraction of 9s')[1])
  for name, ev in comparison.items():
    samples = np.load(wd / name / 'eval_samples.npy').astype(np.float32)
    freqs = _frequencies(clf, samples)
    row = extra['pretrained (no 9s)' if name == 'pretrained' else name]
    assert abs(float(row['fraction of 9s']) - freqs[drop]) <= 1 / len(samples) + 5e-4
    assert abs(float(row['fraction of 9s']) - ev['class_frequencies'][drop]) <= 5e-4
    _assert_frequencies(ev['class_frequencies'], samples, clf)
    if name == 'pretrained':
      assert ev == _json(wd / name / 'eval.json')
      assert row['mean distance to nearest new-data image'] == '-'
      assert row['loss on q_pre (last log interval)'] == '-'
      continue
    last = [json.loads(line) for line in open(wd / name / 'metrics.jsonl')][-1]
    assert last['step'] == config.train.steps
    assert abs(float(row['loss on q_pre (last log interval)']) - last['constraint_loss'][0]) <= 5e-5
    brute = np.mean([min(np.sqrt(np.mean((s - d) ** 2)) for d in new_images) for s in samples])
    assert abs(ev['nearest_new_data_distance'] - brute) < 1e-6
    assert abs(float(row['mean distance to nearest new-data image']) - brute) <= 5e-5
    assert {k: v for k, v in ev.items() if k != 'nearest_new_data_distance'} == _json(
        wd / name / 'eval.json')
    np.testing.assert_allclose(ev['training_class_frequencies'],
                               np.bincount(new_labels, minlength=10) / len(new_labels))
    assert abs(float(rows[name]['TV to uniform']) - ev['tv_to_uniform']) <= 5e-4
    assert abs(float(rows[name]['classifier FID']) - ev['classifier_fid']) <= 5e-3


def _check_finetune_arms_are_sampled_again_from_their_workdirs(finetune_run):
  """An arm trains on data the script builds (the new images + the q_pre samples, tagged by
  source), not on its config's data: it keeps them in its workdir, so that
  ``cdiff_jax.sample`` builds the arm again from the workdir alone, and its evaluation seed
  redraws the arm's evaluation samples. The pre-trained run the arms started from (and the
  constrained arm took its threshold from) is not needed for that: it is moved away here."""
  from cdiff_jax import sample, train
  wd = finetune_run
  new_images, new_labels, _ = _new_data(config := _config('digits_finetune', FINETUNE))
  with np.load(wd / 'pretrained_samples.npz') as f:
    q_images, q_labels = f['images'], f['labels']
  for name in ('unconstrained', 'constrained'):
    with np.load(wd / name / train.TRAINING_DATA) as f:
      data = sources.ArrayDataset.from_arrays(f)
    np.testing.assert_array_equal(data.images, np.concatenate([new_images, q_images]))
    np.testing.assert_array_equal(data.labels, np.concatenate([new_labels, q_labels]))
    np.testing.assert_array_equal(data.attributes['source'], [0] * 12 + [1] * 20)
    assert data.num_classes == 10
    (wd / 'pretrained').rename(wd / 'moved')
    try:
      drawn = sample.draw(str(wd / name), num_samples=config.eval.num_samples,
                          seed=evaluation.EVAL_SEED)['images']
    finally:
      (wd / 'moved').rename(wd / 'pretrained')
    np.testing.assert_allclose(drawn, np.load(wd / name / 'eval_samples.npy'), atol=2e-3,
                               err_msg=name)


def _check_finetune_rerun_reuses_every_stage(finetune_run):
  """A second call retrains and resamples nothing: the three runs and the q_pre samples
  stay as they were, and the same table is written. An arm finished without its saved
  training data (by an older version) gets it then, and nothing else changes."""
  from cdiff_jax import train
  wd = finetune_run
  saved = wd / 'constrained' / train.TRAINING_DATA
  with np.load(saved) as f:
    data = dict(f)
  saved.unlink()
  from cdiff_jax import config as config_lib
  from cdiff_jax import sample
  with pytest.raises(config_lib.ConfigError, match='rerun its experiments.finetune command '
                                                   'once'):
    sample.draw(str(wd / 'constrained'), num_samples=2)
  before = {n: run_files.snapshot(wd / n) for n in ('pretrained', 'unconstrained', 'constrained')}
  npz = run_files.snapshot(wd)['pretrained_samples.npz']
  table = (wd / 'comparison.md').read_text()
  out = _launch('finetune', wd, 'digits_finetune', FINETUNE)
  assert out.count('finished earlier, reusing it') == 3, out[-2000:]
  after = run_files.snapshot(wd / 'constrained')
  assert after.pop(train.TRAINING_DATA) and after == before['constrained']
  with np.load(saved) as f:
    assert data.keys() == dict(f).keys() and all(np.array_equal(data[k], f[k]) for k in data)
  for name in ('pretrained', 'unconstrained'):
    assert run_files.snapshot(wd / name) == before[name], name
  assert run_files.snapshot(wd)['pretrained_samples.npz'] == npz
  assert (wd / 'comparison.md').read_text() == table


def _check_finetune_interrupted_arm_is_not_resumed_on_other_data(finetune_run):
  """An arm's checkpoints are keyed by a hash of the data the script built for it
  (config.data.finetune_data_key): arms stopped before their end, rerun with another new
  data set (finetune.new_data_seed), are refused by name instead of resumed on a mix of two
  data sets."""
  wd = finetune_run
  for name in ('unconstrained', 'constrained'):
    for done in ('summary.json', 'eval.json'):
      (wd / name / done).unlink()
  args = [f'--config.{k}={v!r}' for k, v in dict(FINETUNE, **{
      'finetune.new_data_seed': 4}).items()]
  out = subprocess.run([sys.executable, '-m', 'experiments.finetune',
                        '--config=configs/digits_finetune.py', f'--workdir={wd}', '--noprogress',
                        *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 2, out.stderr[-2000:]
  errors = [line for line in out.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and 'data.finetune_data_key' in errors[0], out.stderr[-2000:]


def test_finetune_main(tmp_path):
  """experiments/finetune.py end to end on two devices, then again (see the checks)."""
  _launch('finetune', tmp_path, 'digits_finetune', FINETUNE)
  _check_finetune_pretrained_model_never_saw_the_dropped_class(tmp_path)
  _check_finetune_arms_start_from_the_pretrained_model(tmp_path)
  _check_finetune_table_recomputed_from_the_saved_samples(tmp_path)
  _check_finetune_arms_are_sampled_again_from_their_workdirs(tmp_path)
  _check_finetune_rerun_reuses_every_stage(tmp_path)
  _check_finetune_interrupted_arm_is_not_resumed_on_other_data(tmp_path)


# ----------------------------------------------------------------------------- guidance

# Trained without the 9s, so every setting is measured against the classes the model knows.
GUIDANCE = dict(IMAGE_TINY, **{'optim.lr': 0.02, 'data.drop_classes': (9,),
    'guidance.num_samples': 20, 'guidance.cfg_scales': (2.0,), 'guidance.not_scales': (1.0,),
    'guidance.classifier_scales': (1.0,), 'guidance.classifier_steps': 5})
GUIDANCE_SETTINGS = ['unconditional', 'CFG w=2', 'NOT 1 w=1', 'CFG w=1 on the classes but 1',
                     'classifier guidance w=1']
TRAINED = list(range(9))
NOT_ONE = [0, 2, 3, 4, 5, 6, 7, 8]   # the target classes of "any digit but 1"


def _check_guidance_figures_recomputed_from_the_saved_samples(guidance_run, tmp_path):
  """Each setting's class frequencies, TV to uniform, classifier FID, hit rate and per-class
  hit rates, recomputed from its saved samples with the evaluation classifier. Each is
  measured against its target classes: those the model was trained on (0-8), or for "any
  digit but 1" the others of them: TV to uniform over them, FID against their held-out
  images. The conditional settings requested their target classes in turn (sample i: the
  (i mod m)-th of m), the others have no hit rate; every grid is the first 100 samples
  (conditional: one column per class)."""
  from PIL import Image
  from cdiff_jax import writers
  wd, clf = guidance_run, _classifier()
  out = _json(wd / 'guidance.json')
  assert list(out['settings']) == GUIDANCE_SETTINGS
  assert out['evaluation_classifier_accuracy'] == clf.accuracy
  test = sources.load_dataset(_config('digits_cfg', GUIDANCE).data, 'test')
  for name, row in out['settings'].items():
    x = np.load(wd / 'samples' / (name.replace(' ', '_') + '.npy'))
    assert x.shape == (20, 8, 8, 1), name
    pred = clf.predict(x)
    assert row['num_samples'] == 20
    freqs = np.bincount(pred, minlength=10) / 20
    np.testing.assert_allclose(row['class_frequencies'], freqs)
    target = NOT_ONE if 'but 1' in name or name.startswith('NOT') else TRAINED
    assert row['target_classes'] == target, name
    assert row['tv_to_uniform'] == pytest.approx(
        0.5 * np.abs(freqs - np.isin(np.arange(10), target) / len(target)).sum()), name
    reference = sources.to_float(test.images[np.isin(test.labels, target)])
    fid = evaluation.frechet_distance(clf.features(x), clf.features(reference))
    assert abs(row['classifier_fid'] - fid) <= 1e-6 * max(1.0, fid), name
    conditional = name.startswith(('CFG', 'classifier'))
    assert ('hit_rate' in row) == conditional, name
    if conditional:
      requested = np.asarray(target)[np.arange(20) % len(target)]
      assert row['hit_rate'] == pytest.approx(np.mean(pred == requested))
      assert row['per_class_hit_rate'] == pytest.approx(
          [np.mean(pred[requested == c] == c) if c in target else None for c in range(10)])
    writers.save_image_grid(str(tmp_path / 'grid.png'), x[:100],
                            ncols=len(target) if conditional else None)
    grid = Image.open(wd / 'grids' / (name.replace(' ', '_') + '.png'))
    np.testing.assert_array_equal(np.asarray(grid), np.asarray(Image.open(tmp_path / 'grid.png')),
                                  err_msg=name)


def _check_guidance_table_agrees_with_the_json(guidance_run):
  """guidance.md's rows are guidance.json's figures, setting by setting."""
  wd = guidance_run
  settings = _json(wd / 'guidance.json')['settings']
  rows = run_files.markdown_rows((wd / 'guidance.md').read_text())
  assert list(rows) == GUIDANCE_SETTINGS
  for name, r in settings.items():
    row = rows[name]
    hit = row['hit rate of requested class']
    assert hit == '-' if 'hit_rate' not in r else abs(float(hit) - r['hit_rate']) <= 5e-4
    assert abs(float(row['frequency of 1']) - r['class_frequencies'][1]) <= 5e-4
    assert abs(float(row['TV to uniform']) - r['tv_to_uniform']) <= 5e-4
    np.testing.assert_allclose(run_files.floats(row['class frequencies 0..9']),
                               r['class_frequencies'], atol=5e-3)
    assert abs(float(row['classifier FID']) - r['classifier_fid']) <= 5e-3


def _check_guidance_samples_are_drawn_as_documented(guidance_run):
  """The unconditional setting is the model with the null class as its label (seed 1),
  the CFG setting eps_u + w (eps_c - eps_u) with the trained classes' labels in turn
  (seed 2), the exact "any digit but 1" the conditional model with the other classes'
  labels in turn (seed 5): each sampled again here from the trained model's EMA parameters
  gives the saved samples."""
  import jax
  import jax.numpy as jnp
  from cdiff_jax import checkpoint, parallel, train
  from cdiff_jax.sampling import Sampler
  wd = guidance_run
  config = _config('digits_cfg', GUIDANCE)
  model = train.build_score_model(config, num_classes=10)
  params = checkpoint.load_params(str(wd / 'model'), 'ema_params')
  mesh = parallel.make_mesh()
  params = parallel.put_replicated(params, mesh)
  sc = config.sample

  def sample(eps_fn, seed, labels):
    s = Sampler(eps_fn, model.schedule, (8, 8, 1), sampler=sc.sampler, num_steps=sc.num_steps,
                eta=sc.eta, clip=sc.clip or None, mesh=mesh)
    return np.asarray(parallel.to_host(s(params, jax.random.fold_in(jax.random.key(seed), 0),
                                         20, labels)))

  null = lambda p, x, t, cond: model.eps(p, x, t, jnp.full((x.shape[0],), 10, jnp.int32))

  def cfg(p, x, t, labels):
    e_u = model.eps(p, x, t, jnp.full((x.shape[0],), 10, jnp.int32))
    return e_u + 2.0 * (model.eps(p, x, t, labels) - e_u)

  np.testing.assert_allclose(sample(null, 1, None),
                             np.load(wd / 'samples' / 'unconditional.npy'), atol=1e-4)
  np.testing.assert_allclose(sample(cfg, 2, jnp.arange(20, dtype=jnp.int32) % 9),
                             np.load(wd / 'samples' / 'CFG_w=2.npy'), atol=1e-4)
  conditional = lambda p, x, t, labels: model.eps(p, x, t, labels)
  np.testing.assert_allclose(
      sample(conditional, 5, jnp.asarray(NOT_ONE, jnp.int32)[jnp.arange(20) % 8]),
      np.load(wd / 'samples' / 'CFG_w=1_on_the_classes_but_1.npy'), atol=1e-4)


def _check_guidance_rerun_reuses_the_model(guidance_run):
  """A second call reuses the finished model (its run folder stays as it was) and, with
  the same seeds, writes the same samples."""
  wd = guidance_run
  model = run_files.snapshot(wd / 'model')
  samples = {n: np.load(wd / 'samples' / f'{n}.npy') for n in ('unconditional', 'CFG_w=2')}
  out = _launch('digits_guidance', wd, 'digits_cfg', GUIDANCE)
  assert 'model: reusing the finished run' in out, out[-2000:]
  assert run_files.snapshot(wd / 'model') == model
  for name, x in samples.items():
    np.testing.assert_array_equal(np.load(wd / 'samples' / f'{name}.npy'), x, err_msg=name)


def test_digits_guidance_main(tmp_path):
  """experiments/digits_guidance.py end to end, then again (see the checks)."""
  wd = tmp_path / 'run'
  _launch('digits_guidance', wd, 'digits_cfg', GUIDANCE)
  _check_guidance_figures_recomputed_from_the_saved_samples(wd, tmp_path)
  _check_guidance_table_agrees_with_the_json(wd)
  _check_guidance_samples_are_drawn_as_documented(wd)
  _check_guidance_rerun_reuses_the_model(wd)


# ----------------------------------------------------------------------------- tiw_compare

TIW = dict(IMAGE_TINY, **{'optim.lr': 0.02, 'method.disc_pretrain_steps': 4,
                          'method.disc_batch_size': 16, 'method.disc_ch': 8,
                          'method.disc_ch_mult': (1,)})
TIW_ARMS = {'DSM(obs)': ('dsm_obs', 'dsm_obs'), 'TIW-DSM': ('tiw_dsm', 'tiw')}


def _tiw_split(config):
  from cdiff_jax import train
  from cdiff_jax.methods import tiw
  dataset = sources.load_dataset(config.data, 'train')
  bias, ref = tiw.split_indices(config.method, dataset, train.train_indices(config.data, dataset))
  return dataset, bias, ref


def _check_tiw_compare_rows_recomputed_from_each_arms_samples(tiw_run):
  """Only the arms asked for ran, each with its variant, alpha 1 and the reference
  fraction; each row is its arm's eval.json and run time, with class frequencies of its
  saved samples under the evaluation classifier and nearest-neighbour ratios (median
  distance of a sample to its nearest reference / observed image over the same for the
  test images) recomputed by brute force; the split's class frequencies are counted."""
  wd, clf = tiw_run, _classifier()
  config = _config('digits_tiw', TIW)
  out = _json(wd / 'results.json')
  assert list(out['results']) == ['0.1']
  res = out['results']['0.1']
  assert list(res['arms']) == list(TIW_ARMS)
  assert sorted(os.listdir(wd / 'ref0.1')) == sorted(d for d, _ in TIW_ARMS.values())
  dataset, bias, ref = _tiw_split(config)
  test = sources.to_float(sources.load_dataset(config.data, 'test').images)
  flat = lambda x: np.asarray(x, np.float64).reshape(len(x), -1)

  def nn(x, pool):
    pool = flat(pool)
    return np.array([np.sqrt(((pool - q) ** 2).sum(1)).min() for q in flat(x)])

  pools = dict(ref_nn_ratio=sources.to_float(dataset.images[ref]),
               obs_nn_ratio=sources.to_float(dataset.images[np.concatenate([bias, ref])]))
  for label, (slug, variant) in TIW_ARMS.items():
    arm, row = wd / 'ref0.1' / slug, res['arms'][label]
    saved = _json(arm / 'config.json')['method']
    assert (saved['variant'], saved['alpha'], saved['ref_fraction']) == (variant, 1.0, 0.1)
    record = _json(arm / 'arm.json')
    assert {k: v for k, v in row.items() if k in record['eval']} == record['eval']
    assert row['seconds'] == record['seconds'] > 0
    samples = np.load(arm / 'eval_samples.npy').astype(np.float32)
    _assert_frequencies(row['class_frequencies'], samples, clf)
    for key, pool in pools.items():
      want = np.median(nn(samples, pool)) / np.median(nn(test, pool))
      assert row[key] == pytest.approx(want, rel=1e-4), (label, key)
  count = lambda i: np.bincount(dataset.labels[i], minlength=10) / len(i)
  np.testing.assert_allclose(res['data']['bias'], count(bias))
  np.testing.assert_allclose(res['data']['ref'], count(ref))
  np.testing.assert_allclose(res['data']['obs_mix'], 0.5 * count(ref) + 0.5 * count(bias))
  assert (res['data']['num_bias'], res['data']['num_ref']) == (len(bias), len(ref))
  assert out['header'].startswith(f'TIW-DSM comparison: digits, 4 steps of batch 16 per arm, '
                                  f'40 samples per arm, evaluation classifier accuracy '
                                  f'{clf.accuracy:.3f};')


def _check_tiw_compare_table_agrees_with_the_json(tiw_run):
  """results.md's rows are results.json's figures (tail: classes 5-9)."""
  wd = tiw_run
  res = _json(wd / 'results.json')['results']['0.1']
  rows = run_files.markdown_rows((wd / 'results.md').read_text())
  assert set(rows) == set(TIW_ARMS)
  for label, r in res['arms'].items():
    row = rows[label]
    assert abs(float(row['classifier FID']) - r['classifier_fid']) <= 5e-3
    assert abs(float(row['TV to uniform']) - r['tv_to_uniform']) <= 5e-4
    assert abs(float(row['tail mass']) - sum(r['class_frequencies'][5:])) <= 5e-4
    assert abs(float(row['NN ratio to D_ref']) - r['ref_nn_ratio']) <= 5e-3
  assert f"({res['data']['num_ref']} reference, {res['data']['num_bias']} biased images)" in (
      wd / 'results.md').read_text()


def _check_tiw_compare_rerun_tabulates_finished_arms_without_touching_them(tiw_run):
  """A second call asking for one arm reuses it and tabulates the other one, finished
  earlier with the same config: both arms' folders stay as they were and the rows keep
  their figures."""
  wd = tiw_run
  before = run_files.snapshot(wd / 'ref0.1')
  rows = _json(wd / 'results.json')['results']['0.1']['arms']
  out = _launch('tiw_compare', wd, 'digits_tiw', TIW, '--arms=DSM(obs)', '--alphas=')
  assert '=== reference 0.1: TIW-DSM: finished earlier' in out, out[-2000:]
  assert run_files.snapshot(wd / 'ref0.1') == before
  assert _json(wd / 'results.json')['results']['0.1']['arms'] == rows


def test_tiw_compare_main(tmp_path):
  """experiments/tiw_compare.py with two arms, then again with one (see the checks)."""
  _launch('tiw_compare', tmp_path, 'digits_tiw', TIW, '--arms=DSM(obs),TIW-DSM', '--alphas=')
  _check_tiw_compare_rows_recomputed_from_each_arms_samples(tmp_path)
  _check_tiw_compare_table_agrees_with_the_json(tmp_path)
  _check_tiw_compare_rerun_tabulates_finished_arms_without_touching_them(tmp_path)


# ----------------------------------------------------------------------------- toy

TOY = {'model.hidden': 16, 'model.depth': 1, 'train.steps': 4, 'train.batch_size': 16,
       'train.log_every': 2, 'optim.warmup_steps': 1, 'sample.num_steps': 4,
       'toy.benchmarks': ('product', 'mixture'), 'toy.num_train': 64, 'toy.num_samples': 50,
       'toy.quadrature_points': 20, 'mcmc.samplers': ('diffusion', 'mala'),
       'mcmc.steps_per_level': 2}
TOY_COMPONENTS = ('ring', 'vertical_bar', 'horizontal_bar', 'big_box', 'small_box')


def _toy_targets():
  """{row's benchmark: (exact density, seed of the reference samples, seed of the exact
  samples the row is scored against)}, as the script documents them."""
  from cdiff_jax import toys
  densities = dict(zip(TOY_COMPONENTS, (toys.ring(), toys.vertical_bar(), toys.horizontal_bar(),
                                        toys.box(1.0), toys.box(0.5))))
  out = {f'component {n}': (d, 3, 4) for n, d in densities.items()}
  out.update({b: (toys.benchmarks()[b].target, 11, 12) for b in TOY['toy.benchmarks']})
  return out


def _check_toy_rows_recomputed_from_the_saved_samples(toy_run):
  """One row per learned component, then per benchmark x components x sampler, in order;
  each row's exact log-likelihood (per-sample floor -20), sliced W2 to exact samples and
  the same two figures of exact samples, recomputed from the saved samples and the
  exact densities; acceptance only for MCMC."""
  import jax.numpy as jnp
  from cdiff_jax import toys
  wd = toy_run
  rows = _json(wd / 'toy_table.json')['rows']
  want = [(f'component {n}', 'learned', 'diffusion') for n in TOY_COMPONENTS] + [
      (b, s, k) for b in TOY['toy.benchmarks'] for s in ('oracle', 'learned')
      for k in TOY['mcmc.samplers']]
  assert [(r['benchmark'], r['components'], r['sampler']) for r in rows] == want
  samples = np.load(wd / 'toy_samples.npz')
  assert sorted(samples.files) == sorted('/'.join(w) for w in want)
  targets = _toy_targets()

  def ll(density, x):
    v = np.asarray(density.log_prob(jnp.asarray(x, jnp.float32)), np.float64)
    return float(np.mean(np.maximum(np.where(np.isfinite(v), v, -20.0), -20.0)))

  for r in rows:
    x = samples['/'.join((r['benchmark'], r['components'], r['sampler']))]
    density, exact_seed, ref_seed = targets[r['benchmark']]
    assert x.shape == (50, 2)
    exact = density.sample(np.random.default_rng(exact_seed), 50)
    ref = density.sample(np.random.default_rng(ref_seed), 50)
    assert r['log_likelihood'] == pytest.approx(ll(density, x), abs=1e-5), r
    assert r['exact_log_likelihood'] == pytest.approx(ll(density, ref), abs=1e-5), r
    assert r['sliced_w2'] == pytest.approx(toys.sliced_wasserstein(x, exact), rel=1e-6), r
    assert r['exact_sliced_w2'] == pytest.approx(toys.sliced_wasserstein(ref, exact), rel=1e-6)
    assert r['nonfinite'] == int(np.sum(~np.isfinite(x).all(1)))
    if not r['benchmark'].startswith('component'):
      assert (r['accept_rate'] is None) == (r['sampler'] == 'diffusion')
      if r['accept_rate'] is not None:
        assert 0 <= r['accept_rate'] <= 1


def _check_toy_table_agrees_with_the_json(toy_run):
  """toy_table.md has one line per JSON row, with that row's figures."""
  wd = toy_run
  rows = _json(wd / 'toy_table.json')['rows']
  lines = [l for l in (wd / 'toy_table.md').read_text().splitlines()
           if l.startswith('|') and not l.startswith(('| benchmark', '|---'))]
  assert len(lines) == len(rows)
  for line, r in zip(lines, rows):
    cells = [c.strip() for c in line.strip('|').split('|')]
    acc = '-' if r.get('accept_rate') is None else f"{r['accept_rate']:.2f}"
    assert cells == [r['benchmark'], r['components'], r['sampler'],
                     f"{r['log_likelihood']:.3f} ({r['exact_log_likelihood']:.3f})",
                     f"{r['sliced_w2']:.4f} ({r['exact_sliced_w2']:.4f})", acc]


def _check_toy_component_check_samples_its_own_model(toy_run):
  """The 'component vertical_bar' samples are reverse diffusion (key 7) of the model
  saved as components/vertical_bar.msgpack, drawn again here."""
  import flax.serialization
  import jax
  from cdiff_jax import train
  from cdiff_jax.methods import guidance
  from cdiff_jax.sampling import Sampler, mcmc
  wd = toy_run
  config = _config('toy_composition', TOY)
  with open(wd / 'components' / 'vertical_bar.msgpack', 'rb') as f:
    params = flax.serialization.msgpack_restore(f.read())
  model = train.build_score_model(config, num_classes=1)
  pot = guidance.combine(guidance.model_components(model), 'product', (1.0,))
  sampler = Sampler(mcmc.eps_fn_from_potential(pot, model.schedule), model.schedule, (2,),
                    sampler='ancestral', num_steps=4, num_chunks=1)
  x = np.asarray(sampler(guidance.stack_params([params]), jax.random.key(7), 50))
  saved = np.load(wd / 'toy_samples.npz')['component vertical_bar/learned/diffusion']
  np.testing.assert_allclose(saved, x, atol=1e-5)


def _check_toy_rerun_loads_the_trained_components(toy_run):
  """A second call (one benchmark and sampler: the samplers' settings do not retrain the
  components) trains no component, their files stay as they were, and sampling with the
  same seeds gives the same rows as the first call."""
  wd = toy_run
  before = run_files.snapshot(wd / 'components')
  strip = lambda r: {k: v for k, v in r.items() if k != 'seconds'}
  keep = lambda r: r['benchmark'].startswith('component') or (
      r['benchmark'] == 'product' and r['sampler'] == 'diffusion')
  rows = [strip(r) for r in _json(wd / 'toy_table.json')['rows'] if keep(r)]
  out = _launch('toy_composition', wd, 'toy_composition',
                dict(TOY, **{'toy.benchmarks': ('product',), 'mcmc.samplers': ('diffusion',)}))
  assert out.count('loaded') == 5 and 'steps in' not in out, out[-2000:]
  assert run_files.snapshot(wd / 'components') == before
  assert [strip(r) for r in _json(wd / 'toy_table.json')['rows']] == rows


def test_toy_composition_main(tmp_path):
  """experiments/toy_composition.py end to end, then again (see the checks)."""
  _launch('toy_composition', tmp_path, 'toy_composition', TOY)
  _check_toy_rows_recomputed_from_the_saved_samples(tmp_path)
  _check_toy_table_agrees_with_the_json(tmp_path)
  _check_toy_component_check_samples_its_own_model(tmp_path)
  _check_toy_rerun_loads_the_trained_components(tmp_path)
