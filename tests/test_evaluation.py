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


def test_class_frequencies_and_tv():
  f = evaluation.class_frequencies(np.array([0, 1, 1, 3]), 4)
  np.testing.assert_allclose(f, [0.25, 0.5, 0.0, 0.25])
  assert evaluation.tv_distance(f, [0.25] * 4) == pytest.approx(0.25)


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


def test_classifier_is_cached(digits_classifier):
  again = evaluation.get_classifier(config_lib.base_config().data, steps=600)
  assert again.accuracy == digits_classifier.accuracy
  np.testing.assert_array_equal(np.asarray(again.params['Dense_2']['kernel']),
                                np.asarray(digits_classifier.params['Dense_2']['kernel']))


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
