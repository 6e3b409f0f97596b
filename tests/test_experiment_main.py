"""The five experiment scripts end to end: each ``main()`` runs once on a tiny config (in a
subprocess: the scripts define their flags at import), and what it writes is checked
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
from cdiff_jax import evaluation
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


def _launch(script: str, workdir, config: str, overrides: dict, *extra) -> str:
  """Runs ``python -m experiments.<script>`` (two host devices, as every test); its stdout."""
  args = [f'--config.{k}={v!r}' for k, v in overrides.items()]
  out = subprocess.run([sys.executable, '-m', f'experiments.{script}',
                        f'--config=configs/{config}.py', f'--workdir={workdir}', '--noprogress',
                        *args, *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  return out.stdout


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


# ----------------------------------------------------------------------------- finetune

FINETUNE = dict(IMAGE_TINY, **{
    'finetune.pretrain_steps': 4, 'finetune.pretrain_batch': 16, 'finetune.num_generated': 20,
    'finetune.new_data_size': 12, 'finetune.new_data_seed': 3,
    # A large pre-training step moves the parameters far from their initialization, so
    # where the fine-tuned arms started from shows in their parameters.
    'finetune.pretrain_lr': 0.05,
    'method.objective_batch': 8, 'method.constraint_batch': 8, 'method.dual_start': 0})


@pytest.fixture(scope='module')
def finetune_run(tmp_path_factory):
  wd = tmp_path_factory.mktemp('finetune')
  _launch('finetune', wd, 'digits_finetune', FINETUNE)
  return wd


def _new_data(config):
  """The new, small data set, drawn here as the script documents it."""
  full = sources.load_dataset(config.data, 'train')
  rng = np.random.default_rng(config.finetune.new_data_seed)
  idx = np.sort(rng.choice(len(full), config.finetune.new_data_size, replace=False))
  return sources.to_float(full.images[idx]), full.labels[idx], full


def test_finetune_pretrained_model_never_saw_the_dropped_class(finetune_run):
  """The pre-training run drops finetune.pretrain_drop_classes from its data (its training
  class frequencies, counted here, are 0 there) with its own steps, batch and rate."""
  wd = finetune_run
  config = _config('digits_finetune', FINETUNE)
  drop = config.finetune.pretrain_drop_classes[0]
  saved = _json(wd / 'pretrained' / 'config.json')
  assert saved['data']['drop_classes'] == [drop] and saved['method'] == {'name': 'dsm'}
  assert (saved['train']['steps'], saved['train']['batch_size'], saved['optim']['lr']) == (
      4, 16, 0.05)
  assert saved['train']['init_from'] == ''
  labels = sources.load_dataset(config.data, 'train').labels
  kept = labels[labels != drop]
  np.testing.assert_allclose(_json(wd / 'pretrained' / 'eval.json')['training_class_frequencies'],
                             np.bincount(kept, minlength=10) / len(kept))


def test_finetune_arms_start_from_the_pretrained_model(finetune_run):
  """Both arms name the pre-trained run as init_from and the q_pre samples they were
  trained against; their parameters lie near the pre-trained EMA parameters, far from a
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
  moved = dist(pre, fresh)
  for name in ('unconstrained', 'constrained'):
    saved = _json(wd / name / 'config.json')
    assert saved['train']['init_from'] == pre_dir
    assert saved['finetune']['q_pre_samples'] == key[:16]
    assert saved['method']['enabled'] == (name == 'constrained')
    arm = checkpoint.load_params(str(wd / name), 'params')
    assert dist(arm, pre) < 0.2 * moved, (name, dist(arm, pre), moved)
  saved = _json(wd / 'constrained' / 'config.json')['method']
  assert (saved['threshold_mode'], saved['reference_workdir']) == ('reference', pre_dir)


def test_finetune_table_recomputed_from_the_saved_samples(finetune_run):
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
      continue
    brute = np.mean([min(np.sqrt(np.mean((s - d) ** 2)) for d in new_images) for s in samples])
    assert abs(ev['nearest_new_data_distance'] - brute) < 1e-6
    assert abs(float(row['mean distance to nearest new-data image']) - brute) <= 5e-5
    assert {k: v for k, v in ev.items() if k != 'nearest_new_data_distance'} == _json(
        wd / name / 'eval.json')
    np.testing.assert_allclose(ev['training_class_frequencies'],
                               np.bincount(new_labels, minlength=10) / len(new_labels))
    assert abs(float(rows[name]['TV to uniform']) - ev['tv_to_uniform']) <= 5e-4
    assert abs(float(rows[name]['classifier FID']) - ev['classifier_fid']) <= 5e-3


def test_finetune_rerun_reuses_every_stage(finetune_run):
  """A second call retrains and resamples nothing: the three runs and the q_pre samples
  stay as they were, and the same table is written."""
  wd = finetune_run
  before = {n: run_files.snapshot(wd / n) for n in ('pretrained', 'unconstrained', 'constrained')}
  npz = run_files.snapshot(wd)['pretrained_samples.npz']
  table = (wd / 'comparison.md').read_text()
  out = _launch('finetune', wd, 'digits_finetune', FINETUNE)
  assert out.count('finished earlier, reusing it') == 3, out[-2000:]
  for name, snap in before.items():
    assert run_files.snapshot(wd / name) == snap, name
  assert run_files.snapshot(wd)['pretrained_samples.npz'] == npz
  assert (wd / 'comparison.md').read_text() == table
