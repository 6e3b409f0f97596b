"""Evaluation without internet: a classifier trained on the real, balanced training set
judges generated samples.

* ``get_classifier(data_config)`` trains a small convnet once per dataset and caches it
  (parameters + test accuracy) under ``$CDIFF_JAX_CACHE`` (default ``~/.cache/cdiff_jax``).
* ``evaluate_samples(clf, samples, reference)`` gives the class frequencies of the samples,
  their total-variation distance to uniform, and the "classifier FID": the Frechet distance
  between Gaussian fits of the classifier's penultimate features of the samples and of
  held-out real images. It is not comparable to Inception FID numbers in papers; compare
  runs with each other. Users with their own Inception feature extractor can pass it as
  ``eval.feature_fn='module:function'`` (images in [-1, 1] -> (N, D) features); nothing is
  ever downloaded.
* ``evaluate_run(exp, state, workdir)`` samples a trained run and writes ``eval.json``, the
  class-frequency plot and a sample grid (a constrained run's lambda and constraint curves
  come from training: ``train.train_and_evaluate``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cdiff_jax import config as config_lib, parallel, writers
from cdiff_jax.data import sources
from cdiff_jax.models import ConvClassifier

_VERSION = 1  # bump when the classifier recipe changes, so stale caches are not reused


def cache_dir() -> str:
  root = os.environ.get('CDIFF_JAX_CACHE', os.path.expanduser('~/.cache/cdiff_jax'))
  return os.path.join(root, 'classifiers')


def _net_for(image_shape) -> ConvClassifier:
  size = image_shape[0]
  ch_mult = (1, 2) if size <= 16 else (1, 2, 2)
  return ConvClassifier(ch=32, ch_mult=ch_mult, num_res_blocks=1, num_groups=8,
                        num_outputs=0)


@dataclasses.dataclass
class EvalClassifier:
  net: ConvClassifier
  params: Any
  num_classes: int
  accuracy: float
  image_shape: tuple

  def __post_init__(self):
    def apply(params, x):
      return self.net.apply({'params': params}, x, jnp.zeros((x.shape[0],)),
                            return_features=True)
    self._apply = jax.jit(apply)

  def logits_and_features(self, images, batch_size: int = 500):
    images = np.asarray(images, np.float32)
    if tuple(images.shape[1:]) != tuple(self.image_shape):
      raise ValueError(f'the evaluation classifier takes images of shape {self.image_shape}, '
                       f'got {images.shape[1:]}.')
    logits, feats = [], []
    # Every chunk of a call padded to one shape (a multiple of 8), so a short last chunk
    # does not compile the network again.
    size = -(-min(batch_size, len(images)) // 8) * 8
    for i in range(0, len(images), batch_size):
      chunk = images[i:i + batch_size]
      pad = size - len(chunk)
      lg, ft = self._apply(self.params, np.pad(chunk, [(0, pad)] + [(0, 0)] * (chunk.ndim - 1)))
      logits.append(np.asarray(lg)[:len(chunk)])
      feats.append(np.asarray(ft)[:len(chunk)])
    return np.concatenate(logits), np.concatenate(feats)

  def predict(self, images) -> np.ndarray:
    return self.logits_and_features(images)[0].argmax(-1)

  def features(self, images) -> np.ndarray:
    return self.logits_and_features(images)[1]


def _augment(rng, x):
  """Random shifts by up to 1 pixel (edge padding): cheap and enough for digit classifiers."""
  n, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='edge')
  dx, dy = jax.random.randint(rng, (2, n), 0, 3)
  take = jax.vmap(lambda img, i, j: jax.lax.dynamic_slice(img, (i, j, 0), (h, w, img.shape[-1])))
  return take(xp, dy, dx)


def train_classifier(train: sources.ArrayDataset, test: sources.ArrayDataset, steps: int,
                     seed: int = 0, batch_size: int = 128, lr: float = 2e-3,
                     progress: bool = False) -> EvalClassifier:
  """Trains the evaluation classifier (AdamW, cosine decay, shift augmentation)."""
  from tqdm.auto import tqdm
  net = dataclasses.replace(_net_for(train.image_shape), num_outputs=train.num_classes)
  rng = jax.random.key(seed)
  x0 = jnp.zeros((2,) + train.image_shape)
  params = parallel.run_once(lambda r, x: net.init(r, x, jnp.zeros(2))['params'], rng, x0)
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10), steps),
                   weight_decay=1e-4)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y, key):
    def loss_fn(p):
      logits = net.apply({'params': p}, _augment(key, x), jnp.zeros((x.shape[0],)))
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  order = np.random.default_rng(seed)
  for i in tqdm(range(steps), desc='evaluation classifier', disable=not progress, leave=False):
    idx = order.integers(0, len(train), batch_size)
    batch = train.get(idx)
    params, opt_state, _ = step(params, opt_state, batch['image'], batch['label'],
                                jax.random.fold_in(rng, i))
  clf = EvalClassifier(net, params, train.num_classes, 0.0, train.image_shape)
  pred = clf.predict(sources.to_float(test.images))
  clf.accuracy = float((pred == test.labels).mean())
  return clf


def _cache_key(train: sources.ArrayDataset, steps: int, seed: int,
               test: sources.ArrayDataset | None = None) -> str:
  """Every image and label of the data it was trained on and scored against (the accuracy
  it carries is the test split's), so no other data set can be handed its weights."""
  h = hashlib.sha256()
  h.update(json.dumps([_VERSION, train.name, train.image_shape, len(train), steps, seed,
                       np.bincount(train.labels).tolist()]).encode())
  for ds in (train, test) if test is not None else (train,):
    h.update(np.ascontiguousarray(ds.images).tobytes())
    h.update(np.ascontiguousarray(ds.labels).tobytes())
  return h.hexdigest()[:16]


def default_steps(dataset: sources.ArrayDataset) -> int:
  return 1500 if dataset.image_shape[0] <= 16 else 3000


def classifier_for(config, progress: bool = False) -> EvalClassifier:
  """The evaluation classifier a run's config asks for (``config.data``, trained for
  ``config.eval.classifier_steps`` steps or the default): the one every evaluation and
  experiment of that run labels its samples with."""
  return get_classifier(config.data, steps=config.eval.classifier_steps or None,
                        progress=progress)


def get_classifier(data_config, steps: int | None = None, seed: int = 0,
                   train: sources.ArrayDataset | None = None,
                   test: sources.ArrayDataset | None = None,
                   progress: bool = False) -> EvalClassifier:
  """The evaluation classifier of ``data_config``'s dataset, trained once and cached.

  It always sees the full, balanced training split (never the run's imbalanced subset),
  and reports its accuracy on the test split.
  """
  train = train if train is not None else sources.load_dataset(data_config, 'train')
  test = test if test is not None else sources.load_dataset(data_config, 'test')
  steps = steps or default_steps(train)
  key = _cache_key(train, steps, seed, test)
  path = os.path.join(cache_dir(), f'{train.name.replace("/", "_")}_{key}')
  if path in _LOADED and os.path.exists(path + '.msgpack'):
    return _LOADED[path]   # this process's copy: its compiled network too
  _LOADED[path] = _load_or_train(path, train, test, steps, seed, progress)
  return _LOADED[path]


# The classifiers this process has loaded or trained, by cache path: an experiment that
# evaluates many settings (digits_guidance) labels them all with one compiled network.
_LOADED: dict = {}


def _load_or_train(path, train, test, steps, seed, progress) -> EvalClassifier:
  net = dataclasses.replace(_net_for(train.image_shape), num_outputs=train.num_classes)
  if os.path.exists(path + '.json') and os.path.exists(path + '.msgpack'):
    meta = json.load(open(path + '.json'))
    template = jax.eval_shape(lambda x: net.init(jax.random.key(0), x, jnp.zeros(2))['params'],
                              jnp.zeros((2,) + train.image_shape))
    with open(path + '.msgpack', 'rb') as f:
      params = flax.serialization.from_bytes(template, f.read())
    return EvalClassifier(net, params, train.num_classes, meta['accuracy'], train.image_shape)
  clf = train_classifier(train, test, steps, seed, progress=progress)
  writers.write_atomic(path + '.msgpack', flax.serialization.to_bytes(clf.params))
  writers.write_atomic(path + '.json', json.dumps({'accuracy': clf.accuracy,
                                                   'dataset': train.name, 'steps': steps}))
  return clf


class NonFiniteSamples(FloatingPointError):
  """Samples to evaluate hold NaN or inf values: the model or its sampler diverged."""


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
  """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of Gaussian fits to features:
  one row per example, (N, D) (a 1-D array: one feature per example)."""
  a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
  if min(len(a), len(b)) < 2:
    raise ValueError(f'the Frechet distance fits a covariance to each set and needs at least '
                     f'2 feature vectors in each (got {len(a)} and {len(b)}).')
  mu_a, mu_b = a.mean(0), b.mean(0)
  s_a, s_b = (np.atleast_2d(np.cov(f, rowvar=False)) for f in (a, b))  # (1, 1) for D = 1
  # Tr (S_a S_b)^(1/2) = sum of sqrt eigenvalues of the symmetric PSD S_a^(1/2) S_b S_a^(1/2):
  # stable where a general matrix square root returns complex noise.
  w, v = np.linalg.eigh(s_a)
  root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  eig = np.linalg.eigvalsh(root_a @ s_b @ root_a)
  tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * tr_covmean)


def class_frequencies(labels: np.ndarray, num_classes: int) -> np.ndarray:
  return np.bincount(np.asarray(labels), minlength=num_classes) / max(len(labels), 1)


def tv_distance(p, q) -> float:
  return float(0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum())


def uniform_over(classes, num_classes: int) -> np.ndarray:
  """The uniform distribution over ``classes`` (None: all ``num_classes``)."""
  if classes is None:
    return np.full(num_classes, 1 / num_classes)
  target = np.zeros(num_classes)
  target[np.asarray(classes)] = 1 / len(classes)
  return target


def evaluate_samples(clf: EvalClassifier, samples, reference_images,
                     feature_fn: Callable | None = None, classes=None) -> dict:
  """Class frequencies, TV to uniform and classifier FID of ``samples`` vs held-out data.
  ``classes``: the classes the model was trained on, when not all (the uniform target of
  the TV is over them, recorded as ``uniform_over``)."""
  finite = np.isfinite(np.asarray(samples)).reshape(len(samples), -1).all(1)
  if not finite.all():
    raise NonFiniteSamples(f'{int((~finite).sum())} of the {len(samples)} samples hold NaN or '
                           'inf values, so they cannot be evaluated: the model or its sampler '
                           'diverged (check the run\'s loss curve and the sampler settings).')
  logits, feats = clf.logits_and_features(samples)
  _, ref_feats = clf.logits_and_features(reference_images)
  freqs = class_frequencies(logits.argmax(-1), clf.num_classes)
  out = dict(class_frequencies=freqs.tolist(),
             tv_to_uniform=tv_distance(freqs, uniform_over(classes, clf.num_classes)),
             classifier_fid=frechet_distance(feats, ref_feats),
             num_samples=int(len(samples)), num_reference=int(len(reference_images)),
             classifier_accuracy=clf.accuracy,
             mean_confidence=float(jax.nn.softmax(logits).max(-1).mean()))
  if classes is not None:
    out['uniform_over'] = [int(c) for c in classes]
  if feature_fn is not None:
    out['fid'] = frechet_distance(np.asarray(feature_fn(samples)),
                                  np.asarray(feature_fn(reference_images)))
  return out


EVAL_SEED = 1234  # the seed of a run's evaluation samples (eval.json)


def generate(exp, state, num_samples: int, seed: int = EVAL_SEED, progress: bool = False,
             batch_size: int = 1000, classes=None, sampler: Callable | None = None
             ) -> np.ndarray:
  """``num_samples`` samples of a run's model (EMA by default), in batches. A conditional
  model's labels run on across batches (``exp.sample_labels``: sample i gets the (i mod K)-th
  of the K trained classes, or of ``classes``), so the classes stay balanced when K does
  not divide ``batch_size``. ``sampler``: called as ``exp.sampler()`` is (the default),
  ``sampler(params, rng, n, labels, progress=...) -> images``."""
  params = state.ema_params if exp.config.sample.use_ema else state.params
  return sample_in_batches(sampler or exp.sampler(), params, num_samples,
                           lambda start, n: exp.sample_labels(n, offset=start, classes=classes),
                           seed, batch_size, exp.mesh.devices.size, progress)


def sample_in_batches(sampler, params, num: int, cond_fn: Callable, seed: int,
                      batch_size: int = 1000, num_devices: int = 1, progress: bool = False
                      ) -> np.ndarray:
  """``num`` samples on the host, drawn in batches of up to ``batch_size``, each padded to a
  multiple of ``num_devices`` (a mesh sampler's batch) and cut back; batch i draws with
  ``fold_in(key(seed), i)``. ``cond_fn(start, n)``: the conditioning of samples ``start`` to
  ``start + n - 1`` (labels, a composition, or None); ``sampler(params, rng, n, cond,
  progress=...) -> images``."""
  out = []
  for i, start in enumerate(range(0, num, batch_size)):
    n = min(batch_size, num - start)
    n_pad = -(-n // num_devices) * num_devices
    x = sampler(params, jax.random.fold_in(jax.random.key(seed), i), n_pad,
                cond_fn(start, n_pad), progress=progress)
    out.append(np.asarray(parallel.to_host(x))[:n])
  return np.concatenate(out)


def evaluate_images(exp, samples, classes=None, progress: bool = False) -> dict:
  """``evaluate_samples`` of a run's samples with the run's evaluation classifier (and
  ``eval.feature_fn``), against uniform over ``classes`` and held-out images of them.
  ``classes`` defaults to those the run was trained on: a model trained on some classes
  (``data.keep_classes`` / ``drop_classes``) is measured against those."""
  ec = exp.config.eval
  clf = classifier_for(exp.config, progress=progress)
  test = sources.load_dataset(exp.config.data, 'test')
  feature_fn = config_lib.load_feature_fn(ec.feature_fn) if ec.feature_fn else None
  classes = np.unique(exp.sample_classes if classes is None or not len(classes) else classes)
  classes = classes if len(classes) < exp.num_classes else None
  reference = test.images if classes is None else test.images[np.isin(test.labels, classes)]
  return evaluate_samples(clf, samples, sources.to_float(reference), feature_fn, classes)


def evaluate_run(exp, state, workdir: str, progress: bool = False) -> dict:
  """Samples a trained run, evaluates it, writes eval.json and the plots; returns the dict."""
  samples = generate(exp, state, exp.config.eval.num_samples, progress=progress)
  result = evaluate_images(exp, samples, progress=progress)
  classes = result.get('uniform_over')
  train_freqs = exp.objective_class_frequencies()  # as the objective's minibatches mix them
  result['training_class_frequencies'] = train_freqs.tolist()
  if jax.process_index() == 0:
    # eval.json last: the experiments take it as the mark of a finished arm and then read
    # the samples back (a run stopped in between evaluates again).
    writers.save_arrays_atomic(os.path.join(workdir, 'eval_samples.npy'),
                               samples.astype(np.float16))
    writers.plot_class_frequencies(
        os.path.join(workdir, 'class_frequencies.png'),
        {'training data': train_freqs, 'model samples': result['class_frequencies']},
        target=uniform_over(classes, exp.num_classes),
        title=f'{config_lib.method_label(exp.config)}: classifier FID '
              f'{result["classifier_fid"]:.2f}, TV to uniform {result["tv_to_uniform"]:.3f}')
    writers.save_image_grid(os.path.join(workdir, 'samples', 'eval_samples.png'), samples[:100])
    writers.write_atomic(os.path.join(workdir, 'eval.json'), json.dumps(result, indent=2))
  return result
