"""Data sources (digits, IDX, npz, TFDS via mock_data), imbalance builders, batching."""

import gzip
import struct
import tempfile

import ml_collections
import numpy as np
import pytest

from cdiff_jax import data
from cdiff_jax.data import imbalance, sources


def test_digits_split_is_stratified_and_scaled():
  train, test = data.load_digits('train'), data.load_digits('test')
  assert train.image_shape == (8, 8, 1) and len(train) + len(test) == 1797
  assert -1.0 <= train.images.min() and train.images.max() <= 1.0
  assert set(np.unique(test.labels)) == set(range(10))
  # ~20% of every class is held out, and the split does not overlap.
  counts = np.bincount(test.labels, minlength=10) / (np.bincount(test.labels, minlength=10)
                                                      + np.bincount(train.labels, minlength=10))
  np.testing.assert_allclose(counts, 0.2, atol=0.01)


def _write_idx(path, array):
  header = struct.pack('>HBB', 0, 0x08, array.ndim) + struct.pack('>' + 'I' * array.ndim, *array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_idx_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, 7, dtype=np.uint8)
  _write_idx(tmp_path / 'train-images-idx3-ubyte.gz', images)
  _write_idx(tmp_path / 'train-labels-idx1-ubyte.gz', labels)
  ds = data.load_idx(str(tmp_path), 'train')
  np.testing.assert_array_equal(ds.images[..., 0], images)
  np.testing.assert_array_equal(ds.labels, labels)
  batch = ds.get(np.array([0, 3]))
  np.testing.assert_allclose(batch['image'][0, ..., 0], images[0] / 127.5 - 1, atol=1e-6)
  # The dispatcher finds IDX files in data_dir on its own.
  cfg = ml_collections.ConfigDict(dict(name='mnist', source='auto', data_dir=str(tmp_path),
                                       image_size=0))
  assert len(data.load_dataset(cfg)) == 7
  with pytest.raises(data.DatasetNotFound, match='data.data_dir'):
    data.load_idx(str(tmp_path), 'test')
  # MNIST's ten classes even when a small file holds fewer of them.
  _write_idx(tmp_path / 'train-labels-idx1-ubyte.gz', np.array([0, 1, 2, 1, 0, 2, 1], np.uint8))
  assert data.load_idx(str(tmp_path), 'train').num_classes == 10
  assert ds.num_classes == 10


def test_labels_outside_the_classes_are_refused_and_idx_counts_its_classes(tmp_path):
  """An IDX set with more than 10 classes (EMNIST letters: 1..26) gets them all, so no label
  indexes past the class embedding or the classifier's logits; an array dataset whose labels
  exceed its num_classes is refused with the fix."""
  images = np.zeros((3, 4, 4), np.uint8)
  _write_idx(tmp_path / 'train-images-idx3-ubyte.gz', images)
  _write_idx(tmp_path / 'train-labels-idx1-ubyte.gz', np.array([1, 26, 5]))
  ds = data.load_idx(str(tmp_path), 'train')
  assert ds.num_classes == 27 and list(ds.labels) == [1, 26, 5]
  for labels in ([0, 10, 3], [-1, 0, 3]):
    with pytest.raises(ValueError, match=r'mine: labels run -?\d+\.\.\d+, outside the classes '
                                         r'0\.\.9; label the classes 0\.\.C-1'):
      data.ArrayDataset(images[..., None], np.array(labels), 10, 'mine')


def test_npz(tmp_path):
  path = tmp_path / 'mine.npz'
  np.savez(path, train_images=np.zeros((4, 5, 5), np.uint8), train_labels=np.array([0, 1, 2, 1]))
  ds = data.load_npz(str(path))
  assert ds.image_shape == (5, 5, 1) and ds.num_classes == 3
  bad = tmp_path / 'bad.npz'
  np.savez(bad, images=np.full((2, 3, 3, 1), 5.0), labels=np.array([0, 1]))
  with pytest.raises(ValueError, match=r'\[-1, 1\]'):
    data.load_npz(str(bad))
  # images stored as floats in [0, 1] (the usual mistake): the fix named; [-1, 1] loads
  np.savez(bad, images=np.linspace(0, 1, 18).reshape(2, 3, 3, 1), labels=np.array([0, 1]))
  with pytest.raises(ValueError, match=r'float images lie in \[0, 1\], not \[-1, 1\]: store '
                                       r'2 \* x - 1'):
    data.load_npz(str(bad))
  np.savez(bad, images=np.linspace(-1, 1, 18).reshape(2, 3, 3, 1), labels=np.array([0, 1]))
  assert data.load_npz(str(bad)).images.min() == -1.0


@pytest.mark.parametrize('what,images,labels,needle', [
    # NaN passed the [-1, 1] check (its comparisons are false): the run then stopped at
    # step 0 on a non-finite loss, with the advice to lower the learning rate.
    ('NaN pixels', np.where(np.eye(3)[None, :, :, None] > 0, np.nan, 0.5).repeat(2, 0),
     np.array([0, 1]), r'images hold 6 NaN or infinite values'),
    # One-hot rows: an unconditional run took them as 2 classes, a conditional one crashed
    # in JAX on a broadcast.
    ('one-hot labels', np.zeros((2, 3, 3, 1), np.uint8), np.eye(10)[[0, 1]],
     r'labels has shape \(2, 10\) and dtype float64; give one integer class per image'),
    ('float labels', np.zeros((2, 3, 3, 1), np.uint8), np.array([0.0, 1.0]),
     r'labels has shape \(2,\) and dtype float64; give one integer class per image'),
    # PyTorch's layout: the model was refused as too deep for 1x8 images.
    ('channel-first images', np.zeros((2, 1, 8, 8), np.uint8), np.array([0, 1]),
     r'of shape \(2, 1, 8, 8\) look channel-first .*np.moveaxis\(images, 1, -1\)'),
])
def test_npz_contents_a_model_cannot_train_on_are_named(tmp_path, what, images, labels, needle):
  path = tmp_path / 'mine.npz'
  np.savez(path, images=images, labels=labels)
  with pytest.raises(ValueError, match=needle):
    data.load_npz(str(path))


def test_a_file_that_is_not_an_npz_is_named_with_the_field(tmp_path):
  """numpy's own error (about pickles) named neither the file's field nor the fix."""
  path = tmp_path / 'mine.npz'
  path.write_text('not an archive\n')
  with pytest.raises(ValueError, match=r'mine.npz \(config.data.data_dir\) is not a NumPy '
                                       r'.npz archive .*np.savez'):
    data.load_npz(str(path))


@pytest.fixture(autouse=True)
def _temp_files_in_tmp_path(tmp_path, monkeypatch):
  """TFDS's mock data leaves an empty ``mkdtemp`` folder behind for every dataset it
  describes (``DatasetInfo.initialize_from_bucket``); they go to the test's own folder, not
  the system's."""
  (tmp_path / 'tmp').mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path / 'tmp'))


def test_tfds_mnist_and_celeba_with_mock_data():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = data.load_tfds('mnist', 'train')
    assert ds.images.shape == (6, 28, 28, 1) and ds.images.dtype == np.uint8
    assert ds.labels.max() < 10
    celeba = data.load_tfds('celeb_a', 'train', image_size=64, attributes=('Blond_Hair',))
    assert celeba.images.shape == (6, 64, 64, 3) and set(celeba.labels) <= {0, 1}
    assert celeba.attributes['Blond_Hair'].shape == (6,)


def test_celeba_attribute_bias_through_the_config():
  """data.attributes reaches the TFDS loader, so TIW-DSM's attribute bias can split on it
  (the loader was never asked for attributes: every attribute was 'unknown')."""
  tfds = pytest.importorskip('tensorflow_datasets')
  from cdiff_jax import config as config_lib
  from cdiff_jax.methods import tiw
  c = config_lib.base_config()
  c.data.update(name='celeb_a', source='tfds', image_size=64, attributes=('Young',))
  c.method = tiw.default_config()
  c.method.update(bias='attribute', attribute='Young', majority_fraction=0.5,
                  ref_fraction=0.25)
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = data.load_dataset(c.data, 'train')
  young = ds.attributes['Young']
  assert young.shape == (40,) and set(young) <= {0, 1}
  bias, ref = tiw.split_indices(c.method, ds, np.arange(len(ds)))
  assert len(bias) and len(ref) and not set(bias) & set(ref)
  c.data.attributes = ()
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = data.load_dataset(c.data, 'train')
  with pytest.raises(config_lib.ConfigError, match=r"data.attributes=\('Young',\)"):
    tiw.split_indices(c.method, ds, np.arange(len(ds)))


def test_missing_tfds_dataset_names_the_fix(tmp_path, caplog):
  """One error naming the fix, without TFDS's own warning line before it."""
  pytest.importorskip('tensorflow_datasets')
  (tmp_path / 'cifar10' / '3.0.2').mkdir(parents=True)  # a copy without dataset_info.json
  with caplog.at_level('INFO'), pytest.raises(data.DatasetNotFound, match='tfds build cifar10'):
    data.load_tfds('cifar10', 'train', data_dir=str(tmp_path))
  assert not [r for r in caplog.records if r.name == 'absl'], caplog.text


def test_tfds_log_lines_are_held_then_replayed(caplog):
  """A load that succeeds still shows what TFDS logged (replayed after the call)."""
  from absl import logging as absl_logging
  from cdiff_jax.data import sources
  held = sources._HeldLogRecords()
  with caplog.at_level('INFO'):
    with held:
      absl_logging.warning('from tfds')
    assert 'from tfds' not in caplog.text
    held.replay()
  assert [r.getMessage() for r in caplog.records if r.name == 'absl'] == ['from tfds']


def test_minority_and_filtering():
  labels = np.repeat(np.arange(10), 100)
  idx = imbalance.minority_indices(labels, 10, [4, 5, 7], 0.1, seed=0)
  counts = np.bincount(labels[idx], minlength=10)
  assert list(counts) == [100, 100, 100, 100, 10, 10, 100, 10, 100, 100]
  # Deterministic in the seed, different across seeds.
  np.testing.assert_array_equal(idx, imbalance.minority_indices(labels, 10, [4, 5, 7], 0.1, 0))
  assert not np.array_equal(idx, imbalance.minority_indices(labels, 10, [4, 5, 7], 0.1, 1))
  assert set(labels[imbalance.filter_classes(labels, drop=[9])]) == set(range(9))
  with pytest.raises(ValueError, match='data.minority_classes'):
    imbalance.minority_indices(labels, 10, [12], 0.1, 0)
  lt = imbalance.long_tail_counts([5000] * 10, 0.01)
  assert lt[0] == 5000 and lt[-1] == 50 and np.all(np.diff(lt) <= 0)


def test_subsample_classes_counts_and_at_least_one():
  """Class c keeps round(fraction * n_c) of its examples (at least 1), drawn from
  ``indices`` only; classes without a fraction stay whole."""
  labels = np.repeat(np.arange(4), 200)
  indices = np.flatnonzero(np.arange(800) % 2 == 0)        # 100 examples of each class
  idx = imbalance.subsample_classes(labels, {1: 0.15, 2: 0.001}, seed=0, indices=indices)
  assert list(np.bincount(labels[idx], minlength=4)) == [100, 15, 1, 100]
  assert set(idx) <= set(indices) and np.all(np.diff(idx) > 0)


def test_long_tail_profile_follows_class_order():
  """The k-th class of class_order gets ratio ** (k / (C - 1)) (an order that is not its
  own inverse, so a profile indexed the other way round shows)."""
  profile = imbalance.long_tail_profile(4, 0.001, class_order=(2, 0, 3, 1))
  expected = np.empty(4)
  expected[[2, 0, 3, 1]] = [1.0, 0.1, 0.01, 0.001]
  np.testing.assert_allclose(profile, expected, rtol=1e-9)


def _dataset(n=50):
  return sources.ArrayDataset(np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1) / n,
                              np.arange(n) % 5, 5)


def test_batcher_is_deterministic_and_covers_each_epoch():
  ds = _dataset()
  groups = [np.arange(0, 40), np.arange(40, 50)]
  b = data.GroupedBatcher(ds, groups, [8, 2], seed=3)
  first = [b.indices(s)[0] for s in range(5)]
  b2 = data.GroupedBatcher(ds, groups, [8, 2], seed=3)
  for s in range(5):
    np.testing.assert_array_equal(first[s], b2.indices(s)[0])
  # Five steps of 8 from a group of 40 = one epoch: every example exactly once.
  seen = np.concatenate([f[:8] for f in first])
  np.testing.assert_array_equal(np.sort(seen), np.arange(40))
  idx, gid = b.indices(0)
  assert list(gid) == [0] * 8 + [1] * 2 and np.all(idx[8:] >= 40)
  batch = b.batch(7)
  assert batch['image'].shape == (10, 1, 1, 1) and batch['group'].shape == (10,)
  stacked = b.stacked(2, 3)
  np.testing.assert_array_equal(stacked['label'][1], b.batch(3)['label'])


def test_batcher_process_shards_partition_the_global_batch():
  ds = _dataset()
  groups = [np.arange(0, 40), np.arange(40, 50)]
  whole = data.GroupedBatcher(ds, groups, [8, 4], seed=1)
  parts = [data.GroupedBatcher(ds, groups, [8, 4], seed=1, process_index=p, process_count=2)
           for p in range(2)]
  for step in range(3):
    local = [p.indices(step) for p in parts]
    # Process p holds rows [6p, 6p + 6) of the single-host batch, in order: the global
    # batch (and every draw indexed by batch position) does not depend on the topology.
    assert [list(g) for _, g in local] == [[0] * 6, [0] * 2 + [1] * 4]
    np.testing.assert_array_equal(np.concatenate([i for i, _ in local]), whole.indices(step)[0])


def test_batcher_prefetch_matches_direct_and_reraises():
  ds = _dataset()
  b = data.GroupedBatcher(ds, [np.arange(50)], [10], seed=0)
  it = b.iterate(4, steps_per_call=2)
  got = [next(it) for _ in range(3)]
  it.close()
  for i, g in enumerate(got):
    np.testing.assert_array_equal(g['label'], b.stacked(4 + 2 * i, 2)['label'])
  with pytest.raises(ValueError, match='empty'):
    data.GroupedBatcher(ds, [np.arange(0)], [4], seed=0, group_names=['minority_4'])


def test_batcher_reshuffles_every_epoch_per_seed_and_group():
  """Each epoch of a group is a new permutation of it (also past the permutation cache),
  drawn from (seed, group, epoch): another seed, or another group of the same size, walks
  another order."""
  ds = _dataset(20)
  groups = [np.arange(0, 10), np.arange(10, 20)]
  b = data.GroupedBatcher(ds, groups, [5, 5], seed=3)
  # 10 epochs of 2 steps: more permutations than the cache keeps (4 per group, 8 here).
  epochs = [np.concatenate([b.group_positions(0, 2 * e + s) for s in range(2)]) for e in range(10)]
  for order in epochs:
    np.testing.assert_array_equal(np.sort(order), np.arange(10))
  assert len({tuple(o) for o in epochs}) > 1
  # An old epoch drawn again after eviction is the same permutation.
  np.testing.assert_array_equal(b.group_positions(0, 0), epochs[0][:5])
  other_group = np.concatenate([b.group_positions(1, s) for s in range(2)]) - 10
  assert not np.array_equal(other_group, epochs[0])
  other_seed = data.GroupedBatcher(ds, groups, [5, 5], seed=4)
  assert not np.array_equal(np.concatenate([other_seed.group_positions(0, s) for s in range(2)]),
                            epochs[0])


def test_batcher_refuses_a_batch_the_processes_cannot_split():
  """A global batch of 10 over 3 processes would drop a row: refused."""
  ds = _dataset()
  with pytest.raises(ValueError, match='not divisible by the 3 processes'):
    data.GroupedBatcher(ds, [np.arange(40), np.arange(40, 50)], [8, 2], seed=0,
                        process_index=0, process_count=3)


def test_digits_pixels_labels_and_split_fraction_and_seed():
  """Pixels 0..16 map to v / 8 - 1 (so both ends of [-1, 1] occur); train + test hold
  exactly scikit-learn's (image, label) pairs; the test split has round(f * n_c) of every
  class, chosen by the seed."""
  from sklearn.datasets import load_digits as sk_digits
  raw = sk_digits()
  train, test = data.load_digits('train', 0.4, seed=1), data.load_digits('test', 0.4, seed=1)
  assert train.images.min() == -1.0 and train.images.max() == 1.0

  def rows(images, labels):
    r = np.concatenate([images.reshape(len(images), -1), labels[:, None]], axis=1)
    return r[np.lexsort(r.T[::-1])]
  ours = rows(np.concatenate([train.images, test.images])[..., 0],
              np.concatenate([train.labels, test.labels]))
  np.testing.assert_array_equal(ours, rows(raw.images / 8.0 - 1.0, raw.target))
  n_c = np.bincount(raw.target, minlength=10)
  np.testing.assert_array_equal(np.bincount(test.labels, minlength=10), np.floor(0.4 * n_c + 0.5))
  again, other = data.load_digits('test', 0.4, seed=1), data.load_digits('test', 0.4, seed=2)
  np.testing.assert_array_equal(again.images, test.images)
  assert other.images.shape == test.images.shape
  assert not np.array_equal(other.images, test.images)
  # The config's field picks it (it was read with a default but not in the config, so
  # --config.data.split_seed=N was refused as no such field).
  from cdiff_jax.config import base_config
  c = base_config()
  assert c.data.split_seed == 0
  c.data.split_seed = 2
  np.testing.assert_array_equal(sources.load_dataset(c.data, 'test').images,
                                data.load_digits('test', seed=2).images)


def _idx_bytes(array, dtype_code=0x08):
  """An IDX file by hand: 2 zero bytes, the dtype code, the rank, big-endian uint32 dims."""
  header = bytes([0, 0, dtype_code, array.ndim]) + b''.join(d.to_bytes(4, 'big')
                                                            for d in array.shape)
  return header + array.tobytes()


def test_idx_uncompressed_dotted_names_and_non_square_images(tmp_path):
  """Uncompressed files, the 'train-images.idx3-ubyte' spelling, and H != W images read
  back exactly; the test split reads the t10k files; a non-byte IDX file is refused."""
  images = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
  (tmp_path / 'train-images-idx3-ubyte').write_bytes(_idx_bytes(images))
  (tmp_path / 'train-labels.idx1-ubyte').write_bytes(_idx_bytes(np.array([7, 2], np.uint8)))
  (tmp_path / 't10k-images-idx3-ubyte').write_bytes(_idx_bytes(255 - images[:1]))
  (tmp_path / 't10k-labels-idx1-ubyte').write_bytes(_idx_bytes(np.array([4], np.uint8)))
  ds = data.load_idx(str(tmp_path), 'train')
  assert ds.images.shape == (2, 3, 5, 1)
  np.testing.assert_array_equal(ds.images[1, :, :, 0], [[15, 16, 17, 18, 19], [20, 21, 22, 23, 24],
                                                        [25, 26, 27, 28, 29]])
  assert list(ds.labels) == [7, 2]
  test = data.load_idx(str(tmp_path), 'test')
  assert list(test.labels) == [4] and test.images[0, 0, 0, 0] == 255
  floats = tmp_path / 'floats-idx1-ubyte'
  floats.write_bytes(_idx_bytes(np.zeros(3, '>f4'), dtype_code=0x0D))
  with pytest.raises(ValueError, match='not an unsigned-byte IDX file'):
    data.read_idx(str(floats))


def test_npz_split_keys_and_classes_from_the_largest_label(tmp_path):
  """{split}_images/{split}_labels of the requested split; num_classes = max label + 1
  (labels {0, 2, 5}: 6 classes, not 3)."""
  path = tmp_path / 'mine.npz'
  np.savez(path, train_images=np.zeros((3, 4, 4), np.uint8), train_labels=np.array([0, 2, 5]),
           test_images=np.full((2, 4, 4), 255, np.uint8), test_labels=np.array([1, 1]))
  train, test = data.load_npz(str(path), 'train'), data.load_npz(str(path), 'test')
  assert train.num_classes == 6 and list(train.labels) == [0, 2, 5]
  assert list(test.labels) == [1, 1] and test.images.shape == (2, 4, 4, 1)
  np.testing.assert_array_equal(test.get(np.arange(2))['image'], 1.0)


def test_load_dataset_finds_npz_by_path_or_by_name(tmp_path):
  """source='auto' with a .npz path loads it; source='npz' with a folder loads NAME.npz."""
  np.savez(tmp_path / 'mnist.npz', images=np.zeros((3, 4, 4), np.uint8), labels=np.array([0, 1, 2]))
  np.savez(tmp_path / 'other.npz', images=np.zeros((5, 4, 4), np.uint8), labels=np.arange(5))
  cfg = lambda **kw: ml_collections.ConfigDict(dict(dict(name='mnist', source='auto',
                                                         data_dir='', image_size=0), **kw))
  assert len(data.load_dataset(cfg(data_dir=str(tmp_path / 'other.npz')))) == 5
  assert len(data.load_dataset(cfg(source='npz', data_dir=str(tmp_path)))) == 3


def test_npz_without_a_test_split_is_never_its_own_held_out_set(tmp_path):
  """An .npz of images/labels only (e.g. what `python -m cdiff_jax.sample` writes) is a
  training set: asked for its test split it stops, naming the keys it would need, instead
  of handing the training images back as held-out data (an earlier version did, so the
  evaluation classifier was scored and the FID measured on the images it trained on).
  ``check_held_out`` says so before training; IDX without its t10k files likewise."""
  np.savez(tmp_path / 'mnist.npz', images=np.zeros((3, 4, 4), np.uint8), labels=np.array([0, 1, 2]))
  cfg = lambda **kw: ml_collections.ConfigDict(dict(dict(name='mnist', source='auto',
                                                         data_dir='', image_size=0), **kw))
  c = cfg(data_dir=str(tmp_path / 'mnist.npz'))
  assert len(data.load_dataset(c, 'train')) == 3
  for call in (lambda: data.load_dataset(c, 'test'), lambda: sources.check_held_out(c)):
    with pytest.raises(sources.DatasetNotFound, match=r'holds no test_images / test_labels '
                                                      r'\(its keys: images, labels\).*'
                                                      r'eval.enabled=False'):
      call()
  np.savez(tmp_path / 'both.npz', train_images=np.zeros((3, 4, 4), np.uint8),
           train_labels=np.arange(3), test_images=np.zeros((2, 4, 4), np.uint8),
           test_labels=np.arange(2))
  sources.check_held_out(cfg(data_dir=str(tmp_path / 'both.npz')))
  idx = tmp_path / 'idx'
  idx.mkdir()
  for stem in ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'):
    (idx / stem).write_bytes(b'')
  with pytest.raises(sources.DatasetNotFound, match='IDX files t10k-images-idx3-ubyte.* not '
                                                    'found .*the evaluation needs held-out '
                                                    'images .*eval.enabled=False'):
    sources.check_held_out(cfg(source='idx', data_dir=str(idx)))


def _fake_tfds(monkeypatch, examples):
  """tfds.data_source replaced by lists of examples per (name, split); records its calls."""
  tfds = pytest.importorskip('tensorflow_datasets')
  calls = []

  def data_source(name, split, data_dir=None, download=True):
    calls.append((name, split))
    return examples[name, split]
  monkeypatch.setattr(tfds, 'data_source', data_source)
  return calls


def test_tfds_celeba_crop_label_attribute_and_split(monkeypatch):
  """celeb_a: the centered 140x140 crop of a 218x178 image, BOX-resized to 70x70 (2x2
  means); the label is data.label_attribute; the requested split is the one read."""
  rng = np.random.default_rng(0)
  imgs = rng.integers(0, 256, (2, 218, 178, 3), dtype=np.uint8)
  attrs = [dict(Male=True, Young=False), dict(Male=False, Young=True)]
  examples = {('celeb_a', 'test'): [dict(image=im, attributes=a) for im, a in zip(imgs, attrs)],
              ('celeb_a', 'train'): []}
  calls = _fake_tfds(monkeypatch, examples)
  c = ml_collections.ConfigDict(dict(name='celeb_a', source='tfds', data_dir='', image_size=70,
                                     label_attribute='Young', attributes=('Male',)))
  ds = data.load_dataset(c, 'test')
  assert calls == [('celeb_a', 'test')]
  top, left = (218 - 140) // 2, (178 - 140) // 2
  crop = imgs[:, top:top + 140, left:left + 140].astype(np.float64)
  expected = crop.reshape(2, 70, 2, 70, 2, 3).mean(axis=(2, 4))
  assert ds.images.shape == (2, 70, 70, 3)
  np.testing.assert_allclose(ds.images, expected, atol=1.0)
  assert list(ds.labels) == [0, 1] and list(ds.attributes['Male']) == [1, 0]
  # An attribute it does not have (a comma list on the command line gives one name with a
  # comma) is named with the ones it has, not a KeyError in the loader's loop.
  for field, value in (('attributes', ('Male,Young',)), ('label_attribute', 'Smiling')):
    bad = ml_collections.ConfigDict(c.to_dict())
    bad[field] = value
    with pytest.raises(ValueError, match=rf'data.{field}: celeb_a has no attribute '
                                         rf'{value[0] if field == "attributes" else value} '
                                         r'.*it has Male, Young\.'):
      data.load_dataset(bad, 'test')


def test_keep_drop_and_minority_selection_of_the_training_set():
  """train_indices: keep_classes, then drop_classes, then minority classes at
  round(fraction * n_c) of what is left, counted with numpy from the labels."""
  from cdiff_jax import config as config_lib
  from cdiff_jax import train
  labels = np.repeat(np.arange(5), 103)
  ds = sources.ArrayDataset(np.zeros((len(labels), 2), np.float32), labels, 5)
  dc = config_lib.base_config().data
  dc.update(keep_classes=(0, 1, 2, 3), drop_classes=(3,), minority_classes=(1,),
            minority_fraction=0.25)
  idx = train.train_indices(dc, ds)
  assert list(np.bincount(labels[idx], minlength=5)) == [103, 26, 103, 0, 0]  # 25.75 -> 26
  np.testing.assert_array_equal(imbalance.filter_classes(labels, keep=[4, 1]),
                                np.flatnonzero((labels == 1) | (labels == 4)))
  for bad in ((5,), (-1,)):
    dc.minority_classes = bad
    with pytest.raises(config_lib.ConfigError, match='data.minority_classes'):
      train.train_indices(dc, ds)
  with pytest.raises(ValueError, match='fraction 1.5'):
    imbalance.subsample_classes(labels, {1: 1.5}, seed=0)
  with pytest.raises(ValueError, match='fraction 0.0'):   # not "at least one" of a class
    imbalance.subsample_classes(labels, {1: 0.0}, seed=0)
  with pytest.raises(ValueError, match='minority_fraction=0.0'):
    imbalance.minority_indices(labels, 5, (1,), 0.0, seed=0)
  # Each minority class draws its own examples: not the same positions within every class.
  kept = imbalance.subsample_classes(labels, {0: 0.1, 1: 0.1}, seed=0)
  assert set(kept[labels[kept] == 0] % 103) != set(kept[labels[kept] == 1] % 103)
  # A selection that leaves nothing is named as such, minority classes set or not.
  dc.update(keep_classes=(2,), drop_classes=(2,), minority_classes=(1,))
  with pytest.raises(config_lib.ConfigError, match='class selection leaves no training'):
    train.train_indices(dc, ds)


def test_long_tail_counts_clip_to_each_class_and_class_counts_length():
  """long_tail_counts: floor(n_max * ratio ** (c / (C - 1))), never above a class's own
  size; class_counts has one entry per class, absent classes included."""
  np.testing.assert_array_equal(imbalance.long_tail_counts([100, 20, 50], 0.25), [100, 20, 25])
  np.testing.assert_array_equal(imbalance.class_counts(np.array([0, 0, 2]), 5), [2, 0, 1, 0, 0])


def test_biased_reference_split_is_the_largest_that_fits():
  """Hand-solved cases. Two values of 11 each, flat profile, ref_fraction 0.1: a head of
  10 per value and a reference of round(0.1 * 20 / 2) = 1 per value use all 22 examples.
  Attribute bias toward value 1 (40 examples; value 0 has 10) at 0.8, ref_fraction 0.1:
  head h takes floor(h / 4) of value 0 and a reference of round(0.1 * (h + h // 4) / 2)
  per value; value 0's pool binds at h = 35 (8 + 2 = 10), so 35 + 8 biased, 2 + 2 reference."""
  values = np.repeat([0, 1], 11)
  bias, ref = imbalance.biased_reference_split(values, [1.0, 1.0], 0.1, seed=0)
  assert list(np.bincount(values[bias])) == [10, 10] and list(np.bincount(values[ref])) == [1, 1]
  # 20 per value at 0.15: a head of 17 and round(0.15 * 34 / 2) = round(2.55) = 3 per value.
  values = np.repeat([0, 1], 20)
  bias, ref = imbalance.biased_reference_split(values, [1.0, 1.0], 0.15, seed=0)
  assert list(np.bincount(values[bias])) == [17, 17] and list(np.bincount(values[ref])) == [3, 3]
  attr = np.random.default_rng(0).permutation(np.repeat([0, 1], [10, 40]))
  bias, ref = imbalance.attribute_bias_split(attr, 2, majority_value=1, majority_fraction=0.8,
                                             ref_fraction=0.1, seed=0)
  assert list(np.bincount(attr[bias])) == [8, 35] and list(np.bincount(attr[ref])) == [2, 2]
  assert not set(bias) & set(ref)


def test_a_data_dir_under_home_is_found(tmp_path, monkeypatch):
  """data.data_dir='~/...' (the shell leaves a '~' after '=' alone): validation accepts it
  as an existing path, so the loaders must read the same place."""
  from cdiff_jax import config as config_lib
  monkeypatch.setenv('HOME', str(tmp_path))
  (tmp_path / 'mnist').mkdir()
  (tmp_path / 'mnist' / 'train-images-idx3-ubyte').write_bytes(
      _idx_bytes(np.zeros((2, 4, 4), np.uint8)))
  (tmp_path / 'mnist' / 'train-labels-idx1-ubyte').write_bytes(
      _idx_bytes(np.array([3, 1], np.uint8)))
  np.savez(tmp_path / 'mine.npz', images=np.zeros((5, 4, 4), np.uint8), labels=np.arange(5))
  c = config_lib.base_config()
  for source, data_dir, n in (('idx', '~/mnist', 2), ('auto', '~/mnist', 2),
                               ('auto', '~/mine.npz', 5)):
    c.data.update(name='mnist', source=source, data_dir=data_dir)
    config_lib.validate(c)
    assert len(data.load_dataset(c.data)) == n, (source, data_dir)


def test_batches_survive_another_thread_evicting_the_epoch_just_cached():
  """A prefetch thread and the caller may draw from one batcher at once (a notebook's second
  ``fit`` while the last iterator's thread finishes). The permutation cache once read an
  epoch back after inserting it, and another thread's insertions could have evicted it by
  then (KeyError). Here every insertion is evicted at once, the worst interleaving."""
  import collections

  class EvictedAtOnce(collections.OrderedDict):
    def __setitem__(self, key, value):
      super().__setitem__(key, value)
      super().pop(key)

  ds = data.ArrayDataset(np.zeros((4, 1), np.float32), np.arange(4) % 2, 2)
  shared = data.GroupedBatcher(ds, [np.arange(4)], [3], seed=0)
  expected = data.GroupedBatcher(ds, [np.arange(4)], [3], seed=0)
  shared._perms = EvictedAtOnce()
  for s in range(6):
    np.testing.assert_array_equal(shared.indices(s), expected.indices(s))
