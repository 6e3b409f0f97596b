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


# ----------------------------------------------------------------------------- minority

MINORITY = dict(IMAGE_TINY, **{'method.objective_batch': 16, 'method.constraint_batch': 4,
                               'method.dual_start': 0, 'method.dual_lr': 0.5})


@pytest.fixture(scope='module')
def minority_run(tmp_path_factory):
  wd = tmp_path_factory.mktemp('minority')
  _launch('minority', wd, 'digits_minority', MINORITY)
  return wd


def test_minority_reports_each_arms_own_run(minority_run):
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
  np.testing.assert_allclose(comparison['constrained']['lam'], last['lam'])
  np.testing.assert_allclose(comparison['constrained']['thresholds'], last['threshold'])
  assert np.ptp(last['lam']) > 0   # the multipliers moved, each on its own
  assert comparison['unconstrained']['lam'] == [0.0] * 3   # fixed at 0
  assert (_json(wd / 'constrained' / 'config.json')['method']['reference_workdir']
          == str(wd / 'unconstrained'))


def test_minority_table_and_figures_agree_with_the_json(minority_run):
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
  np.testing.assert_array_equal(side[:grids[0].shape[0], :grids[0].shape[1]], grids[0])
  w = grids[0].shape[1] + 8
  np.testing.assert_array_equal(side[:grids[1].shape[0], w:w + grids[1].shape[1]], grids[1])


def test_minority_rerun_reuses_both_arms(minority_run):
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


# ----------------------------------------------------------------------------- guidance

GUIDANCE = dict(IMAGE_TINY, **{
    'guidance.num_samples': 20, 'guidance.cfg_scales': (2.0,), 'guidance.not_scales': (1.0,),
    'guidance.classifier_scales': (1.0,), 'guidance.classifier_steps': 5})
GUIDANCE_SETTINGS = ['unconditional', 'CFG w=2', 'NOT 1 w=1', 'classifier guidance w=1']


@pytest.fixture(scope='module')
def guidance_run(tmp_path_factory):
  wd = tmp_path_factory.mktemp('guidance')
  _launch('digits_guidance', wd, 'digits_cfg', GUIDANCE)
  return wd


def test_guidance_figures_recomputed_from_the_saved_samples(guidance_run, tmp_path):
  """Each setting's class frequencies, classifier FID, hit rate and per-class hit rates,
  recomputed from its saved samples with the evaluation classifier; the conditional
  settings requested the labels 0..k-1 in turn (sample i: class i mod k), the others have
  no hit rate; every grid is the first 100 samples (conditional: one column per class)."""
  from PIL import Image
  from cdiff_jax import writers
  wd, clf = guidance_run, _classifier()
  out = _json(wd / 'guidance.json')
  assert list(out['settings']) == GUIDANCE_SETTINGS
  assert out['evaluation_classifier_accuracy'] == clf.accuracy
  test = sources.to_float(sources.load_dataset(_config('digits_cfg', GUIDANCE).data,
                                               'test').images)
  for name, row in out['settings'].items():
    x = np.load(wd / 'samples' / (name.replace(' ', '_') + '.npy'))
    assert x.shape == (20, 8, 8, 1), name
    pred = clf.predict(x)
    assert row['num_samples'] == 20
    np.testing.assert_allclose(row['class_frequencies'], np.bincount(pred, minlength=10) / 20)
    fid = evaluation.frechet_distance(clf.features(x), clf.features(test))
    assert abs(row['classifier_fid'] - fid) <= 1e-6 * max(1.0, fid), name
    conditional = name.startswith(('CFG', 'classifier'))
    assert ('hit_rate' in row) == conditional, name
    if conditional:
      requested = np.arange(20) % 10
      assert row['hit_rate'] == pytest.approx(np.mean(pred == requested))
      np.testing.assert_allclose(row['per_class_hit_rate'],
                                 [np.mean(pred[requested == c] == c) for c in range(10)])
    writers.save_image_grid(str(tmp_path / 'grid.png'), x[:100],
                            ncols=10 if conditional else None)
    grid = Image.open(wd / 'grids' / (name.replace(' ', '_') + '.png'))
    np.testing.assert_array_equal(np.asarray(grid), np.asarray(Image.open(tmp_path / 'grid.png')),
                                  err_msg=name)


def test_guidance_table_agrees_with_the_json(guidance_run):
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
    np.testing.assert_allclose(run_files.floats(row['class frequencies 0..9']),
                               r['class_frequencies'], atol=5e-3)
    assert abs(float(row['classifier FID']) - r['classifier_fid']) <= 5e-3


def test_guidance_samples_are_drawn_as_documented(guidance_run):
  """The unconditional setting is the model with the null class as its label (seed 1),
  the CFG setting eps_u + w (eps_c - eps_u) with labels i mod k (seed 2): both sampled
  again here from the trained model's EMA parameters give the saved samples."""
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
  np.testing.assert_allclose(sample(cfg, 2, jnp.arange(20, dtype=jnp.int32) % 10),
                             np.load(wd / 'samples' / 'CFG_w=2.npy'), atol=1e-4)


def test_guidance_rerun_reuses_the_model(guidance_run):
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
