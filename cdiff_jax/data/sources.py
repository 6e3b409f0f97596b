"""Where images come from: the embedded digits, TFDS, and arrays on disk (.npz, MNIST IDX).

Every loader returns an ``ArrayDataset``: images NHWC float32 in [-1, 1] (stored as uint8
when the source is 8-bit, to keep CelebA-sized sets in memory), integer labels, and
optional per-example attributes. Nothing here downloads: a missing dataset raises
``DatasetNotFound`` with the command or config field that fixes it.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import struct
from typing import Sequence

import numpy as np


class DatasetNotFound(FileNotFoundError):
  """The data a config asks for is not on this machine; the message says how to get it."""


@dataclasses.dataclass
class ArrayDataset:
  images: np.ndarray            # (N, H, W, C) uint8 in [0, 255] or float32 in [-1, 1];
                                # (N, D) vectors for the low-dimensional toy problems
  labels: np.ndarray            # (N,) int32
  num_classes: int
  name: str = ''
  attributes: dict = dataclasses.field(default_factory=dict)  # name -> (N,) array

  def __post_init__(self):
    if self.images.ndim not in (2, 4):
      raise ValueError(f'{self.name}: images must be (N, H, W, C) or vectors (N, D), got '
                       f'{self.images.shape}.')
    if len(self.images) != len(self.labels):
      raise ValueError(f'{self.name}: {len(self.images)} images but {len(self.labels)} labels.')
    self.labels = np.asarray(self.labels, np.int32)
    if len(self.labels) and not 0 <= self.labels.min() <= self.labels.max() < self.num_classes:
      raise ValueError(f'{self.name}: labels run {self.labels.min()}..{self.labels.max()}, '
                       f'outside the classes 0..{self.num_classes - 1}; label the classes '
                       f'0..C-1, or give num_classes.')

  def __len__(self):
    return len(self.labels)

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.images.shape[1:])

  def get(self, indices) -> dict:
    """Batch of examples at ``indices``: float32 images in [-1, 1] and int32 labels."""
    return dict(image=to_float(self.images[indices]), label=self.labels[indices])

  def subset(self, indices, name: str | None = None) -> 'ArrayDataset':
    indices = np.asarray(indices)
    return ArrayDataset(self.images[indices], self.labels[indices], self.num_classes,
                        name or self.name, {k: v[indices] for k, v in self.attributes.items()})

  def arrays(self) -> dict:
    """The dataset as named arrays (``np.savez``'s keyword arguments); ``from_arrays``
    gives it back, images in their own dtype, attributes and all."""
    return dict(images=self.images, labels=self.labels, num_classes=self.num_classes,
                name=self.name, **{_ATTRIBUTE + k: v for k, v in self.attributes.items()})

  @classmethod
  def from_arrays(cls, arrays) -> 'ArrayDataset':
    """The dataset of ``arrays()``, e.g. ``ArrayDataset.from_arrays(np.load(path))``."""
    return cls(arrays['images'], arrays['labels'], int(arrays['num_classes']),
               str(arrays['name']), {k[len(_ATTRIBUTE):]: arrays[k] for k in arrays.keys()
                                     if k.startswith(_ATTRIBUTE)})


_ATTRIBUTE = 'attribute:'   # the key prefix of a per-example attribute in ``arrays()``


def to_float(images: np.ndarray) -> np.ndarray:
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 127.5 - 1.0
  return images.astype(np.float32)


# ----------------------------------------------------------------------------- digits


def load_digits(split: str = 'train', test_fraction: float = 0.2, seed: int = 0) -> ArrayDataset:
  """scikit-learn's 8x8 digits (1797 images, 10 classes), shipped with the package.

  Pixel values 0..16 are mapped to [-1, 1]. The train/test split is stratified and fixed
  by ``seed`` so evaluation always sees the same held-out images.
  """
  if split not in ('train', 'test'):
    raise ValueError(f"digits has splits 'train' and 'test', not {split!r}.")
  from sklearn import datasets as sk_datasets
  digits = sk_datasets.load_digits()
  images = (digits.images.astype(np.float32) / 8.0 - 1.0)[..., None]
  labels = digits.target.astype(np.int32)
  rng = np.random.default_rng(seed)
  test = np.zeros(len(labels), bool)
  for c in range(10):
    idx = np.flatnonzero(labels == c)
    test[rng.choice(idx, int(round(test_fraction * len(idx))), replace=False)] = True
  keep = test if split == 'test' else ~test
  return ArrayDataset(images[keep], labels[keep], 10, f'digits/{split}')


# ----------------------------------------------------------------------------- IDX / npz

_IDX_FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
              'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}


def read_idx(path: str) -> np.ndarray:
  """Reads one IDX file (optionally gzipped) into a numpy array."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  zero, dtype_code, ndim = struct.unpack('>HBB', data[:4])
  if zero != 0 or dtype_code != 0x08:
    raise ValueError(f'{path} is not an unsigned-byte IDX file (header {data[:4]!r}).')
  shape = struct.unpack('>' + 'I' * ndim, data[4:4 + 4 * ndim])
  array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if array.size != int(np.prod(shape)):
    raise ValueError(f'{path}: header says {shape} but holds {array.size} bytes (truncated?).')
  return array.reshape(shape)


def _find(directory: str, stem: str) -> str | None:
  for name in (stem, stem + '.gz', stem.replace('-idx', '.idx')):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return path
  return None


_HELD_OUT_FIX = ('the evaluation needs held-out images that training never sees: add them, '
                 'or set eval.enabled=False')


def _idx_paths(directory: str, split: str, name: str,
               fix: str = 'set --config.data.data_dir to the folder that holds them') -> list:
  """The (images, labels) IDX files of ``split`` in ``directory``, or DatasetNotFound."""
  if split not in _IDX_FILES:
    raise ValueError(f"IDX data has splits 'train' and 'test', not {split!r}.")
  stems = _IDX_FILES[split]
  paths = [_find(directory, s) for s in stems]
  if not directory or None in paths:
    raise DatasetNotFound(f'{name}: IDX files {stems[0]}[.gz] and {stems[1]}[.gz] not found in '
                          f'data.data_dir={directory!r}; {fix}.')
  return paths


def load_idx(directory: str, split: str = 'train', name: str = 'mnist') -> ArrayDataset:
  """MNIST-format IDX files (``train-images-idx3-ubyte[.gz]`` etc.) in ``directory``."""
  paths = _idx_paths(directory, split, name)
  images, labels = read_idx(paths[0]), read_idx(paths[1])
  # 10 for MNIST and its look-alikes; more for sets with more classes (EMNIST)
  num_classes = max(10, int(labels.max()) + 1)
  return ArrayDataset(images[..., None], labels, num_classes, f'{name}/{split}')


def _npz_keys(path: str, split: str, name: str) -> tuple[str, str]:
  """The (images, labels) keys of ``split`` in an .npz, or DatasetNotFound / ValueError."""
  if not os.path.exists(path):
    raise DatasetNotFound(f'{name}: {path} does not exist; set --config.data.data_dir to the '
                          'folder holding it (or the .npz path itself).')
  try:
    with np.load(path) as f:
      keys = set(f.files)
  except Exception as e:  # a .npy, a pickle, a text file, a truncated archive
    raise ValueError(f'{path} (config.data.data_dir) is not a NumPy .npz archive '
                     f'({str(e).splitlines()[0][:120]}); save the arrays with np.savez.') from e
  pairs = [(f'{split}_images', f'{split}_labels')]
  if split == 'train':
    pairs += [('images', 'labels'), ('x', 'y')]
  pair = next((p for p in pairs if p[0] in keys and p[1] in keys), None)
  if pair is None and split != 'train':
    raise DatasetNotFound(f'{name}: {path} holds no {split}_images / {split}_labels (its keys: '
                          f'{", ".join(sorted(keys))}); {_HELD_OUT_FIX}.')
  if pair is None:
    raise ValueError(f'{path} has keys {sorted(keys)}; expected {split}_images and '
                     f'{split}_labels (or images and labels).')
  return pair


def load_npz(path: str, split: str = 'train', num_classes: int | None = None,
             name: str = 'npz') -> ArrayDataset:
  """Arrays from an .npz: ``{split}_images``/``{split}_labels``; for the training split also
  ``images``/``labels`` (or ``x``/``y``), which are never taken as held-out data: an
  evaluation against the images it trained on would be meaningless.

  Images may be uint8 (0..255) or float in [-1, 1]; (N, H, W) gets a channel axis.
  """
  pair = _npz_keys(path, split, name)
  with np.load(path) as f:
    images, labels = f[pair[0]], f[pair[1]]
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'{path}: {pair[1]} has shape {labels.shape} and dtype {labels.dtype}; '
                     'give one integer class per image, shape (N,) (labels.argmax(1) for '
                     'one-hot rows).')
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
    raise ValueError(f'{path}: {pair[0]} of shape {images.shape} look channel-first '
                     '(N, C, H, W); store them channel-last, (N, H, W, C): '
                     'np.moveaxis(images, 1, -1).')
  if images.dtype != np.uint8:
    images = images.astype(np.float32)
    if not np.isfinite(images).all():
      raise ValueError(f'{path}: {pair[0]} hold {np.sum(~np.isfinite(images))} NaN or '
                       'infinite values; remove or repair those images.')
    if images.min() < -1.001 or images.max() > 1.001:
      raise ValueError(f'{path}: float images must lie in [-1, 1] (got [{images.min()}, '
                       f'{images.max()}]); store uint8 or rescale.')
    if images.ndim == 4 and images.min() >= 0.0 and images.max() > 0.0:
      # [0, 1] floats would train on half the range and sample gray images
      raise ValueError(f'{path}: float images lie in [{images.min():g}, {images.max():g}], '
                       'not [-1, 1]: store 2 * x - 1 (or uint8 0..255).')
  n_cls = num_classes or int(labels.max()) + 1
  return ArrayDataset(images, labels, n_cls, f'{name}/{split}')


# ----------------------------------------------------------------------------- TFDS

TFDS_NUM_CLASSES = {'mnist': 10, 'fashion_mnist': 10, 'cifar10': 10, 'celeb_a': 2}


def center_crop_resize(image: np.ndarray, size: int, crop: int | None = None) -> np.ndarray:
  """Center crop to ``crop`` x ``crop`` (default: the short side) and resize (PIL, area)."""
  from PIL import Image
  h, w = image.shape[:2]
  crop = crop or min(h, w)
  top, left = (h - crop) // 2, (w - crop) // 2
  image = image[top:top + crop, left:left + crop]
  if crop != size:
    squeeze = image.shape[-1] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    image = np.asarray(pil.resize((size, size), Image.Resampling.BOX))
    if squeeze:
      image = image[..., None]
  return image


class _HeldLogRecords(logging.Filter):
  """Holds the records of absl's logger (TFDS logs through it) while in the ``with``
  block; ``replay()`` logs them afterwards, and records not replayed are dropped."""

  def __init__(self):
    super().__init__()
    self.records = []

  def filter(self, record):
    self.records.append(record)
    return False

  def __enter__(self):
    logging.getLogger('absl').addFilter(self)

  def __exit__(self, *exc):
    logging.getLogger('absl').removeFilter(self)

  def replay(self):
    for record in self.records:
      logging.getLogger('absl').handle(record)


def load_tfds(name: str, split: str = 'train', data_dir: str | None = None,
              image_size: int | None = None, label_attribute: str = 'Male',
              attributes: Sequence[str] = ()) -> ArrayDataset:
  """A prepared TFDS dataset read into memory through ``tfds.data_source`` (no TensorFlow).

  ``celeb_a``: images are center-cropped to 140x140 and resized to ``image_size``
  (64 by default); the label is the boolean attribute ``label_attribute`` and the
  attributes listed in ``attributes`` are kept for analysis.
  """
  import tensorflow_datasets as tfds
  if name == 'toy':   # a config of experiments/toy_composition.py given to another program
    raise ValueError("data.name='toy': the 2-D benchmarks of experiments/toy_composition.py, "
                     'which trains and samples them: python -m experiments.toy_composition '
                     '--config=configs/toy_composition.py.')
  if name not in TFDS_NUM_CLASSES:
    raise ValueError(f'data.name={name!r} has no TFDS loader; use one of {sorted(TFDS_NUM_CLASSES)}.')
  held = _HeldLogRecords()  # TFDS logs its own warning for a missing copy: ours says more.
  try:
    with held:
      source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except Exception as e:  # DatasetNotFoundError, or a tfrecord-only copy.
    raise DatasetNotFound(
        f'{name} ({split}) is not available as a prepared ArrayRecord TFDS dataset in '
        f'data_dir={data_dir!r} ({type(e).__name__}). Prepare it where you have internet with '
        f'`tfds build {name} --file_format=array_record --data_dir=DIR` and pass '
        f'--config.data.data_dir=DIR, or use local files (data.source=idx or npz).') from e
  held.replay()
  n = len(source)
  if name == 'celeb_a' and n:
    known = sorted(source[0]['attributes'])
    for field, asked in (('label_attribute', [label_attribute]), ('attributes', attributes)):
      if unknown := [a for a in asked if a not in known]:
        raise ValueError(f'data.{field}: celeb_a has no attribute {", ".join(unknown)} (a '
                         f'tuple of names, e.g. --config.data.attributes="(\'Male\', '
                         f'\'Young\')"); it has {", ".join(known)}.')
  images, labels, attrs = None, np.zeros(n, np.int32), {a: np.zeros(n, np.int32) for a in attributes}
  for i in range(n):
    ex = source[i]
    image = np.asarray(ex['image'])
    if name == 'celeb_a':
      image = center_crop_resize(image, image_size or 64, crop=140)
      labels[i] = int(ex['attributes'][label_attribute])
      for a in attributes:
        attrs[a][i] = int(ex['attributes'][a])
    else:
      if image_size and image.shape[0] != image_size:
        image = center_crop_resize(image, image_size)
      labels[i] = int(ex['label'])
    if images is None:
      images = np.zeros((n,) + image.shape, np.uint8)
    images[i] = image
  return ArrayDataset(images, labels, TFDS_NUM_CLASSES[name], f'{name}/{split}', attrs)


# ----------------------------------------------------------------------------- dispatch

SOURCES = ('auto', 'sklearn', 'tfds', 'idx', 'npz')


def _resolve_source(dc) -> tuple[str, str]:
  """(source, data_dir) of ``config.data``, with ``source='auto'`` resolved."""
  # '~' as validation reads it (config.validate): a shell leaves it in --flag=~/path.
  data_dir = os.path.expanduser(dc.data_dir or '')
  source = dc.source
  if source == 'auto':
    if dc.name == 'digits':
      source = 'sklearn'
    elif data_dir.endswith('.npz'):
      source = 'npz'
    elif data_dir and _find(data_dir, _IDX_FILES['train'][0]):
      source = 'idx'
    else:
      source = 'tfds'
  return source, data_dir


def _npz_path(dc, data_dir: str) -> str:
  return data_dir if data_dir.endswith('.npz') else os.path.join(data_dir, f'{dc.name}.npz')


def check_held_out(data_config) -> None:
  """Raises ``DatasetNotFound`` now, before training, where the evaluation's held-out split
  of local files (IDX, npz) is missing and would stop the run only at its end."""
  dc = data_config
  source, data_dir = _resolve_source(dc)
  if source == 'idx':
    _idx_paths(data_dir, 'test', dc.name, _HELD_OUT_FIX)
  elif source == 'npz':
    _npz_keys(_npz_path(dc, data_dir), 'test', dc.name)


def load_dataset(data_config, split: str = 'train') -> ArrayDataset:
  """The dataset described by ``config.data`` (fields name, source, data_dir, image_size)."""
  dc = data_config
  source, data_dir = _resolve_source(dc)
  if source == 'sklearn':
    if dc.name != 'digits':
      raise ValueError(f"data.source='sklearn' only provides data.name='digits', not {dc.name!r}.")
    ds = load_digits(split, seed=dc.get('split_seed', 0))
  elif source == 'idx':
    ds = load_idx(data_dir, split, dc.name)
  elif source == 'npz':
    ds = load_npz(_npz_path(dc, data_dir), split, name=dc.name)
  elif source == 'tfds':
    ds = load_tfds(dc.name, split, data_dir, dc.image_size or None,
                   label_attribute=dc.get('label_attribute', 'Male'),
                   attributes=tuple(dc.get('attributes', ())))
  else:
    raise ValueError(f'data.source={source!r} is unknown; use one of {SOURCES}.')
  if dc.image_size and ds.image_shape[0] != dc.image_size:
    raise ValueError(f'data.image_size={dc.image_size} but {ds.name} has images of shape '
                     f'{ds.image_shape}; set data.image_size={ds.image_shape[0]} (or 0 to infer).')
  return ds
