"""Data sources (digits, IDX, npz, TFDS via mock_data), imbalance builders, batching."""

import gzip
import os
import struct

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


def test_npz(tmp_path):
  path = tmp_path / 'mine.npz'
  np.savez(path, train_images=np.zeros((4, 5, 5), np.uint8), train_labels=np.array([0, 1, 2, 1]))
  ds = data.load_npz(str(path))
  assert ds.image_shape == (5, 5, 1) and ds.num_classes == 3
  bad = tmp_path / 'bad.npz'
  np.savez(bad, images=np.full((2, 3, 3, 1), 5.0), labels=np.array([0, 1]))
  with pytest.raises(ValueError, match=r'\[-1, 1\]'):
    data.load_npz(str(bad))


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


def test_missing_tfds_dataset_names_the_fix(tmp_path):
  with pytest.raises(data.DatasetNotFound, match='tfds build cifar10'):
    data.load_tfds('cifar10', 'train', data_dir=str(tmp_path))


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
