"""The evaluation classifier, class frequencies and the Frechet distance."""

import numpy as np
import pytest

from cdiff_jax import config as config_lib
from cdiff_jax import evaluation
from cdiff_jax.data import sources


def test_frechet_distance_closed_form():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((20000, 3))
  b = 2.0 * rng.standard_normal((20000, 3)) + np.array([1.0, 0.0, 0.0])
  # N(0, I) vs N(m, 4I): |m|^2 + tr(I + 4I - 2*2I) = 1 + 3.
  assert evaluation.frechet_distance(a, b) == pytest.approx(4.0, abs=0.1)
  assert evaluation.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_one_feature():
  """One feature per example, (N, 1) or (N,) (np.cov gives a 0-d covariance there): N(0, 1)
  against N(1, 4), 1 + 1 + 4 - 2 * 2 = 2 exactly for these standardized samples."""
  a = np.random.default_rng(0).standard_normal(50)
  a = (a - a.mean()) / a.std(ddof=1)
  for shape in ((50, 1), (50,)):
    assert evaluation.frechet_distance(a.reshape(shape), 1 + 2 * a.reshape(shape)) == \
        pytest.approx(2.0, abs=1e-9)


def test_frechet_distance_with_fewer_samples_than_features():
  """Fewer feature vectors than dimensions: singular covariances whose eigenvalues round to
  small negatives. Identical sets are at distance 0 (not NaN, not a LinAlgError); a shift
  adds its squared length."""
  a = np.random.default_rng(0).standard_normal((5, 10))
  assert evaluation.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
  assert evaluation.frechet_distance(a, a + 0.5) == pytest.approx(10 * 0.25, abs=1e-6)


def test_class_frequencies_and_tv():
  f = evaluation.class_frequencies(np.array([0, 1, 1, 3]), 4)
  np.testing.assert_allclose(f, [0.25, 0.5, 0.0, 0.25])
  assert evaluation.tv_distance(f, [0.25] * 4) == pytest.approx(0.25)


def _exact_moments(rng, n, mean, cov):
  """n points whose sample mean and (ddof=1) covariance are exactly ``mean`` and ``cov``."""
  z = rng.standard_normal((n, len(mean)))
  z -= z.mean(0)
  z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
  return z @ np.linalg.cholesky(cov).T + mean


def test_frechet_distance_closed_form_non_commuting_covariances():
  """2-D Gaussians with correlated, non-commuting covariances: Tr (S_a S_b)^(1/2) of a 2x2
  product with eigenvalues l1, l2 is sqrt(l1 + l2 + 2 sqrt(l1 l2)) = sqrt(tr + 2 sqrt(det))."""
  rng = np.random.default_rng(1)
  s_a, s_b = np.array([[4.0, 1.0], [1.0, 1.0]]), np.array([[1.0, -0.5], [-0.5, 2.0]])
  a = _exact_moments(rng, 500, np.array([2.0, 0.0]), s_a)
  b = _exact_moments(rng, 700, np.array([0.0, -1.0]), s_b)
  tr_root = np.sqrt(np.trace(s_a @ s_b) + 2 * np.sqrt(np.linalg.det(s_a) * np.linalg.det(s_b)))
  expected = 5.0 + np.trace(s_a) + np.trace(s_b) - 2 * tr_root
  assert evaluation.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
  assert evaluation.frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)


def test_class_frequencies_divide_by_the_number_of_labels():
  """Frequencies are counts / number of labels (not / number of classes); none: all 0."""
  np.testing.assert_allclose(evaluation.class_frequencies(np.array([2, 2, 0]), 5),
                             [1 / 3, 0, 2 / 3, 0, 0])
  np.testing.assert_array_equal(evaluation.class_frequencies(np.array([], np.int64), 3), 0.0)


class _LinearNet:
  """A stand-in classifier network: logits = flat image @ w, features = the flat image."""

  def apply(self, variables, x, t, return_features=False):
    flat = x.reshape(x.shape[0], -1)
    return flat @ variables['params']['w'], flat


def _linear_classifier(rng):
  """An EvalClassifier of 2x2 images into 3 classes over ``_LinearNet``; and its ``w``."""
  w = rng.standard_normal((4, 3)).astype(np.float32)
  return evaluation.EvalClassifier(_LinearNet(), {'w': w}, 3, 0.9, (2, 2, 1)), w


def test_evaluate_samples_against_a_known_classifier():
  """evaluate_samples with a linear stand-in classifier, in padded chunks of 5: frequencies
  of the argmax, TV to uniform, FID of the features and the mean top softmax probability,
  all recomputed here from the known logits and features."""
  rng = np.random.default_rng(0)
  clf, w = _linear_classifier(rng)
  samples = rng.standard_normal((13, 2, 2, 1)).astype(np.float32)
  reference = rng.standard_normal((11, 2, 2, 1)).astype(np.float32) + 0.5
  logits, feats = clf.logits_and_features(samples, batch_size=5)
  flat = samples.reshape(13, -1)
  np.testing.assert_allclose(logits, flat @ w, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(feats, flat)
  out = evaluation.evaluate_samples(clf, samples, reference)
  freqs = np.bincount((flat @ w).argmax(1), minlength=3) / 13
  np.testing.assert_allclose(out['class_frequencies'], freqs)
  assert out['tv_to_uniform'] == pytest.approx(0.5 * np.abs(freqs - 1 / 3).sum())
  assert out['classifier_fid'] == pytest.approx(
      evaluation.frechet_distance(flat, reference.reshape(11, -1)), rel=1e-6)
  z = flat @ w
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  assert out['mean_confidence'] == pytest.approx(p.max(1).mean(), rel=1e-5)
  assert out['num_samples'] == 13 and out['num_reference'] == 11
  assert 'uniform_over' not in out
  # A model trained on classes 0 and 2 only: the TV is to uniform over those two.
  sub = evaluation.evaluate_samples(clf, samples, reference, classes=[0, 2])
  assert sub['tv_to_uniform'] == pytest.approx(0.5 * np.abs(freqs - [0.5, 0, 0.5]).sum())
  assert sub['uniform_over'] == [0, 2] and sub['class_frequencies'] == out['class_frequencies']


def test_a_users_feature_extractor_gives_the_fid(tmp_path, monkeypatch):
  """eval.feature_fn='module:function' names the user's own extractor (an Inception net, say):
  validation resolves it before any training, and evaluate_samples adds 'fid', the Frechet
  distance of its features, beside the classifier FID."""
  (tmp_path / 'my_feats.py').write_text(
      'import numpy as np\n'
      'def features(x):\n'
      '  x = np.asarray(x).reshape(len(x), -1)\n'
      '  return np.stack([x[:, 0] ** 2, x[:, 1] + x[:, 2]], 1)\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  c = config_lib.base_config()
  c.eval.enabled, c.eval.feature_fn = True, 'my_feats:features'
  config_lib.validate(c)
  fn = config_lib.load_feature_fn(c.eval.feature_fn)
  rng = np.random.default_rng(1)
  clf, _ = _linear_classifier(rng)
  samples = rng.standard_normal((40, 2, 2, 1)).astype(np.float32)
  reference = rng.standard_normal((30, 2, 2, 1)).astype(np.float32) * 0.7
  out = evaluation.evaluate_samples(clf, samples, reference, feature_fn=fn)
  flat_s, flat_r = samples.reshape(40, -1), reference.reshape(30, -1)
  want = evaluation.frechet_distance(
      np.stack([flat_s[:, 0] ** 2, flat_s[:, 1] + flat_s[:, 2]], 1),
      np.stack([flat_r[:, 0] ** 2, flat_r[:, 1] + flat_r[:, 2]], 1))
  assert out['fid'] == pytest.approx(want, rel=1e-6)
  assert abs(out['fid'] - out['classifier_fid']) > 0.01
  assert 'fid' not in evaluation.evaluate_samples(clf, samples, reference)


def test_a_stop_while_the_samples_are_written_leaves_the_run_unevaluated(tiny_config, tmp_path,
                                                                       monkeypatch):
  """eval.json marks an evaluated arm, and the experiments then read its eval_samples.npy
  back: a stop (SIGTERM, Ctrl-C) landing inside the samples' write must leave neither file,
  so the rerun evaluates again instead of failing on half an array."""
  from cdiff_jax import train
  c = tiny_config
  c.eval.enabled, c.eval.num_samples, c.eval.classifier_steps = True, 6, 30
  exp = train.build(c)
  state = exp.init_state()
  real_save = np.save

  def save_then_stop(file, arr, *args, **kwargs):
    if np.asarray(arr).dtype == np.float16:   # the samples
      real_save(file, np.asarray(arr)[:1])
      raise KeyboardInterrupt
    return real_save(file, arr, *args, **kwargs)

  monkeypatch.setattr(np, 'save', save_then_stop)
  with pytest.raises(KeyboardInterrupt):
    evaluation.evaluate_run(exp, state, str(tmp_path))
  assert not (tmp_path / 'eval.json').exists()
  assert not (tmp_path / 'eval_samples.npy').exists()
  monkeypatch.setattr(np, 'save', real_save)
  result = evaluation.evaluate_run(exp, state, str(tmp_path))
  assert (tmp_path / 'eval.json').exists()
  assert np.load(tmp_path / 'eval_samples.npy').shape == (6, 8, 8, 1)
  assert result['num_samples'] == 6


@pytest.fixture(scope='module')
def digits_classifier(tmp_path_factory):
  import os
  os.environ['CDIFF_JAX_CACHE'] = str(tmp_path_factory.mktemp('cache'))
  return evaluation.get_classifier(config_lib.base_config().data, steps=600)


def test_classifier_accuracy_and_known_frequencies(digits_classifier):
  clf = digits_classifier
  assert clf.accuracy > 0.95  # typically 0.98-0.99 with the default 1500 steps
  test = sources.load_digits('test')
  # A labelled set with known frequencies: the classifier recovers them.
  idx = np.concatenate([np.flatnonzero(test.labels == c)[:n] for c, n in [(0, 30), (4, 10), (7, 20)]])
  freqs = evaluation.class_frequencies(clf.predict(sources.to_float(test.images[idx])), 10)
  expected = np.zeros(10)
  expected[[0, 4, 7]] = [0.5, 1 / 6, 1 / 3]
  np.testing.assert_allclose(freqs, expected, atol=0.04)
  # Real held-out images are far closer in feature space than noise.
  train = sources.load_digits('train')
  real = evaluation.evaluate_samples(clf, sources.to_float(train.images[:300]), sources.to_float(test.images))
  noise = np.random.default_rng(0).uniform(-1, 1, (300, 8, 8, 1)).astype(np.float32)
  fake = evaluation.evaluate_samples(clf, noise, sources.to_float(test.images))
  assert real['classifier_fid'] * 10 < fake['classifier_fid']
  assert real['tv_to_uniform'] < 0.1 and real['num_samples'] == 300


def test_classifier_is_cached(digits_classifier, monkeypatch):
  # In this process: the same classifier, compiled network and all (each evaluation built
  # and compiled its own); and the chunks of one call share one shape (a short last chunk
  # compiled the network again).
  same = evaluation.get_classifier(config_lib.base_config().data, steps=600)
  assert same is digits_classifier
  images = np.zeros((1359, 8, 8, 1), np.float32)
  fresh = evaluation.EvalClassifier(same.net, same.params, same.num_classes, same.accuracy,
                                    same.image_shape)
  logits, feats = fresh.logits_and_features(images, batch_size=500)
  assert logits.shape == (1359, 10) and len(feats) == 1359
  assert fresh._apply._cache_size() == 1
  # On disk: a new process (here: the process's copies forgotten) loads it, not trains it.
  monkeypatch.setattr(evaluation, '_LOADED', {})
  monkeypatch.setattr(evaluation, 'train_classifier', None)
  again = evaluation.get_classifier(config_lib.base_config().data, steps=600)
  assert again is not digits_classifier and again.accuracy == digits_classifier.accuracy
  np.testing.assert_array_equal(np.asarray(again.params['Dense_2']['kernel']),
                                np.asarray(digits_classifier.params['Dense_2']['kernel']))
  np.testing.assert_allclose(again.logits_and_features(images[:100])[0], logits[:100],
                             rtol=1e-5, atol=1e-5)


def test_classifier_for_a_run_config_is_that_of_its_eval_steps(digits_classifier, monkeypatch):
  # Experiments label samples with the classifier the run's evaluation uses: the one of
  # config.eval.classifier_steps (here the cached 600-step one), not a default-size one.
  config = config_lib.base_config()
  config.eval.classifier_steps = 600
  trained = []

  def train_classifier(train, test, steps, *args, **kwargs):
    trained.append(steps)
    raise RuntimeError('would train a new classifier')

  monkeypatch.setattr(evaluation, 'train_classifier', train_classifier)
  clf = evaluation.classifier_for(config)
  assert not trained and clf.accuracy == digits_classifier.accuracy
  config.eval.classifier_steps = 0   # the default size: another classifier, trained anew
  with pytest.raises(RuntimeError, match='would train'):
    evaluation.classifier_for(config)
  assert trained == [1500]


def test_figures_leave_the_users_matplotlib_backend_alone(tmp_path):
  """Plots written during training inside a notebook must not switch its backend (they did:
  matplotlib.use('Agg') turned the notebook's inline figures off after the first run)."""
  import matplotlib
  from PIL import Image

  from cdiff_jax import writers
  before = matplotlib.get_backend()
  matplotlib.use('pdf')
  try:
    p1 = writers.plot_class_frequencies(str(tmp_path / 'f.png'),
                                        {'a': [0.2, 0.8], 'b': [0.5, 0.5]}, target=[0.5, 0.5])
    p2 = writers.plot_curves(str(tmp_path / 'c.png'), [{'step': 1, 'loss': 1.0},
                                                      {'step': 2, 'loss': 0.5}], ['loss'])
    assert matplotlib.get_backend() == 'pdf'
  finally:
    matplotlib.use(before)
  for p in (p1, p2):   # real PNGs of the requested size
    with Image.open(p) as im:
      assert im.format == 'PNG' and im.size[0] > 300 and im.size[1] > 200


def test_generate_keeps_the_classes_balanced_across_batches():
  """Sample i of ``generate`` is drawn for class i mod C over all batches (not restarting
  at class 0 in each batch), also when C does not divide the batch or the devices pad it."""
  import functools
  import types
  from cdiff_jax import train
  num_classes, num_samples, batch = 3, 11, 4
  exp = types.SimpleNamespace(
      config=config_lib.base_config(), num_classes=num_classes,
      sample_classes=np.arange(num_classes),
      mesh=types.SimpleNamespace(devices=np.empty((3,))))   # 3 devices: batches padded to 6
  exp.config.model.conditional, exp.config.sample.use_ema = True, True
  exp.sample_labels = functools.partial(train.Experiment.sample_labels, exp)
  # A sampler whose "images" are their labels.
  fake = lambda params, rng, n, labels, progress: np.broadcast_to(
      np.asarray(labels, np.float32)[:, None, None, None], (n, 2, 2, 1))
  exp.sampler = lambda: fake
  state = types.SimpleNamespace(ema_params=None, params=None)
  out = evaluation.generate(exp, state, num_samples, batch_size=batch)
  assert out.shape == (num_samples, 2, 2, 1)
  np.testing.assert_array_equal(out[:, 0, 0, 0], np.arange(num_samples) % num_classes)


def test_samples_that_cannot_be_evaluated_are_refused_by_name():
  """NaN samples (a diverged model) stop the evaluation with what went wrong, before the
  classifier sees them (they were all labelled class 0 and the FID then failed to converge);
  a set of one feature vector has no covariance, which the FID says."""
  samples = np.zeros((5, 8, 8, 1), np.float32)
  samples[[1, 3], 2, 2, 0] = np.nan
  with pytest.raises(evaluation.NonFiniteSamples, match='2 of the 5 samples hold NaN or inf'):
    evaluation.evaluate_samples(None, samples, samples)
  with pytest.raises(ValueError, match='needs at least 2 feature vectors in each .got 1 and 3'):
    evaluation.frechet_distance(np.zeros((1, 4)), np.zeros((3, 4)))


def test_the_classifier_cache_key_covers_every_image_and_the_test_split():
  """Two data sets alike in name, size, class counts and their first images, but not in a
  later image, or scored on another test split, get their own cached classifiers (the key
  once hashed the first 64 images and ignored the test split, whose accuracy it stores)."""
  images = np.random.default_rng(0).integers(0, 255, (100, 8, 8, 1), dtype=np.uint8)
  labels = np.arange(100) % 10
  train = sources.ArrayDataset(images, labels, 10, 'mine/train')
  changed = images.copy()
  changed[80] = 255 - changed[80]
  test = sources.ArrayDataset(images[:20], labels[:20], 10, 'mine/test')
  other_test = sources.ArrayDataset(changed[80:], labels[80:], 10, 'mine/test')
  key = evaluation._cache_key(train, 100, 0, test)
  assert key == evaluation._cache_key(sources.ArrayDataset(images.copy(), labels, 10,
                                                           'mine/train'), 100, 0, test)
  assert key != evaluation._cache_key(sources.ArrayDataset(changed, labels, 10, 'mine/train'),
                                      100, 0, test)
  assert key != evaluation._cache_key(train, 100, 0, other_test)


def test_a_finished_run_run_again_is_unfinished_until_it_ends(tiny_config, tmp_path,
                                                            monkeypatch):
  """Running a finished run again (to evaluate it with other settings, say) rewrites its
  config.json at once; its old summary.json, the experiments' mark of a finished arm, goes
  with it, so a stop before the new evaluation ends cannot leave the old eval.json vouched
  for under the new config. The run is finished again when that evaluation ends."""
  import json
  import copy
  from cdiff_jax import train
  c = tiny_config
  c.eval.enabled, c.eval.num_samples, c.eval.classifier_steps = True, 4, 30
  train.train_and_evaluate(c, str(tmp_path), progress=False)
  assert (tmp_path / 'summary.json').exists()
  again = copy.deepcopy(c)
  again.eval.num_samples = 6

  def stop(*args, **kwargs):
    raise KeyboardInterrupt

  real = evaluation.evaluate_run
  monkeypatch.setattr(evaluation, 'evaluate_run', stop)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(again, str(tmp_path), progress=False)
  assert json.load(open(tmp_path / 'config.json'))['eval']['num_samples'] == 6
  assert not (tmp_path / 'summary.json').exists()
  monkeypatch.setattr(evaluation, 'evaluate_run', real)
  train.train_and_evaluate(again, str(tmp_path), progress=False)
  assert json.load(open(tmp_path / 'summary.json'))['eval']['num_samples'] == 6


def test_the_classifier_accuracy_is_measured_on_the_test_split():
  """The accuracy it carries is the agreement with the test split's labels (here the
  training images relabelled, so the training labels would give another figure)."""
  train_set = sources.load_digits('train')
  idx = np.arange(64)
  small = sources.ArrayDataset(train_set.images[idx], train_set.labels[idx], 10, 'digits')
  relabelled = sources.ArrayDataset(small.images, (small.labels + 1) % 10, 10, 'digits')
  clf = evaluation.train_classifier(small, relabelled, steps=30, batch_size=32)
  pred = clf.predict(sources.to_float(small.images))
  assert clf.accuracy == float(np.mean(pred == relabelled.labels)) < 0.2
  assert np.mean(pred == small.labels) > 0.5   # it learned the training labels
