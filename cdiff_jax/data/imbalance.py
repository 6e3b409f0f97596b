"""Index-level builders of imbalanced and biased training sets.

All functions return integer index arrays into a dataset (never copies of images), are
deterministic given ``seed``, and validate their arguments with messages that name the
config field to change.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from cdiff_jax.config import ConfigError


def _check_classes(classes: Sequence[int], num_classes: int, field: str):
  bad = [c for c in classes if not 0 <= int(c) < num_classes]
  if bad:
    raise ConfigError(f'{field}={list(classes)} names classes {bad} that do not exist '
                     f'(the dataset has classes 0..{num_classes - 1}).')


def filter_classes(labels: np.ndarray, keep: Sequence[int] | None = None,
                   drop: Sequence[int] | None = None) -> np.ndarray:
  """Indices of examples whose label is in ``keep`` (all if None) and not in ``drop``."""
  mask = np.ones(len(labels), bool)
  if keep is not None:
    mask &= np.isin(labels, np.asarray(keep))
  if drop:
    mask &= ~np.isin(labels, np.asarray(drop))
  return np.flatnonzero(mask)


def subsample_classes(labels: np.ndarray, fractions: Mapping[int, float], seed: int,
                      indices: np.ndarray | None = None) -> np.ndarray:
  """Keeps a random ``fractions[c]`` of class c (at least one example); other classes whole.

  Returns sorted indices into ``labels`` (restricted to ``indices`` if given).
  """
  indices = np.arange(len(labels)) if indices is None else np.asarray(indices)
  keep = []
  for c in np.unique(labels[indices]):
    idx = indices[labels[indices] == c]
    frac = fractions.get(int(c), 1.0)
    if not 0.0 < frac <= 1.0:
      raise ValueError(f'fraction {frac} for class {c} must lie in (0, 1].')
    if frac < 1.0:
      rng = np.random.default_rng([seed, int(c)])
      idx = rng.choice(idx, max(1, int(round(frac * len(idx)))), replace=False)
    keep.append(idx)
  return np.sort(np.concatenate(keep))


def minority_indices(labels: np.ndarray, num_classes: int, minority_classes: Sequence[int],
                     fraction: float, seed: int) -> np.ndarray:
  """The classic minority task: every class whole except ``minority_classes`` at ``fraction``."""
  _check_classes(minority_classes, num_classes, 'data.minority_classes')
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f'data.minority_fraction={fraction} must lie in (0, 1].')
  return subsample_classes(labels, {int(c): fraction for c in minority_classes}, seed)


def long_tail_counts(class_sizes: Sequence[int], imbalance_ratio: float) -> np.ndarray:
  """CIFAR-LT profile: class c keeps n_c * ratio**(c / (C - 1)) examples (ratio = n_last/n_0)."""
  if not 0.0 < imbalance_ratio <= 1.0:
    raise ValueError(f'imbalance_ratio={imbalance_ratio} must lie in (0, 1].')
  sizes = np.asarray(class_sizes)
  c = np.arange(len(sizes))
  profile = imbalance_ratio ** (c / max(len(sizes) - 1, 1))
  return np.maximum(1, np.floor(sizes.max() * profile)).astype(np.int64).clip(max=sizes)


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
  return np.bincount(labels, minlength=num_classes)
