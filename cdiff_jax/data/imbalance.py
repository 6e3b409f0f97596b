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
  return np.sort(np.concatenate([indices[:0], *keep]))  # none: an empty selection stays so


def minority_indices(labels: np.ndarray, num_classes: int, minority_classes: Sequence[int],
                     fraction: float, seed: int) -> np.ndarray:
  """The classic minority task: every class whole except ``minority_classes`` at ``fraction``."""
  _check_classes(minority_classes, num_classes, 'data.minority_classes')
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f'data.minority_fraction={fraction} must lie in (0, 1].')
  return subsample_classes(labels, {int(c): fraction for c in minority_classes}, seed)


def long_tail_counts(class_sizes: Sequence[int], imbalance_ratio: float) -> np.ndarray:
  """CIFAR-LT profile: class c keeps floor(n_max * ratio**(c / (C - 1))) examples (ratio =
  n_last/n_0, n_max the largest class), at least 1 and at most its own n_c."""
  if not 0.0 < imbalance_ratio <= 1.0:
    raise ValueError(f'imbalance_ratio={imbalance_ratio} must lie in (0, 1].')
  sizes = np.asarray(class_sizes)
  c = np.arange(len(sizes))
  profile = imbalance_ratio ** (c / max(len(sizes) - 1, 1))
  return np.maximum(1, np.floor(sizes.max() * profile)).astype(np.int64).clip(max=sizes)


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
  return np.bincount(labels, minlength=num_classes)


# ----------------------------------------------------------------------------- biased + reference


def biased_reference_split(values: np.ndarray, bias_profile: Sequence[float],
                           ref_fraction: float, seed: int,
                           indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Splits examples into a large biased set and a small balanced reference set.

  ``values`` (N,) holds each example's value of the bias factor in [0, K) (the class for a
  long tail, an attribute for attribute bias). The biased set keeps value v in proportion
  to ``bias_profile[v]`` (at least one example each); the reference set has the same
  number of examples of every value, ``ref_fraction * |biased set|`` in all. The two sets
  are disjoint, and the biased set is the largest one that leaves room for the reference.

  Returns (bias indices, reference indices), sorted, into ``values``.
  """
  if not 0.0 < ref_fraction <= 1.0:
    raise ValueError(f'ref_fraction={ref_fraction} must lie in (0, 1].')
  values = np.asarray(values)
  indices = np.arange(len(values)) if indices is None else np.asarray(indices)
  profile = np.asarray(bias_profile, np.float64)
  if profile.ndim != 1 or (profile <= 0).any():
    raise ValueError(f'bias_profile={profile.tolist()} must be positive proportions.')
  num = len(profile)
  pools = []
  for v in range(num):
    pool = indices[values[indices] == v]
    pools.append(np.random.default_rng([seed, v]).permutation(pool))
  sizes = np.array([len(p) for p in pools])
  if (sizes < 2).any():
    raise ValueError(f'values {np.flatnonzero(sizes < 2).tolist()} have fewer than 2 '
                     'examples: no room for both a biased and a reference example.')
  rel = profile / profile.max()

  def counts(head: int):
    n_bias = np.maximum(1, np.floor(head * rel + 1e-9)).astype(np.int64)
    n_ref = max(1, int(round(ref_fraction * n_bias.sum() / num)))
    return n_bias, n_ref

  def feasible(head: int) -> bool:
    n_bias, n_ref = counts(head)
    return bool((n_bias + n_ref <= sizes).all())

  if not feasible(1):
    raise ValueError(f'the values have too few examples ({sizes.tolist()}) for a biased set '
                     f'and a reference of ref_fraction={ref_fraction}.')
  lo, hi = 1, int(sizes.max())  # the largest feasible head size, by bisection (monotone)
  while lo < hi:
    mid = (lo + hi + 1) // 2
    lo, hi = (mid, hi) if feasible(mid) else (lo, mid - 1)
  n_bias, n_ref = counts(lo)
  ref = np.concatenate([p[:n_ref] for p in pools])
  bias = np.concatenate([p[n_ref:n_ref + n] for p, n in zip(pools, n_bias)])
  return np.sort(bias), np.sort(ref)


def long_tail_profile(num_classes: int, imbalance_ratio: float,
                      class_order: Sequence[int] | None = None) -> np.ndarray:
  """CIFAR-10-LT's exponential profile: the k-th class of ``class_order`` (default 0..C-1)
  gets ``imbalance_ratio ** (k / (C - 1))`` relative to the head class."""
  if not 0.0 < imbalance_ratio <= 1.0:
    raise ValueError(f'imbalance_ratio={imbalance_ratio} must lie in (0, 1].')
  order = np.arange(num_classes) if class_order is None else np.asarray(class_order)
  if sorted(order.tolist()) != list(range(num_classes)):
    raise ValueError(f'class_order={list(order)} must be a permutation of 0..{num_classes - 1}.')
  profile = np.empty(num_classes)
  profile[order] = imbalance_ratio ** (np.arange(num_classes) / max(num_classes - 1, 1))
  return profile


def long_tail_split(labels: np.ndarray, num_classes: int, imbalance_ratio: float,
                    ref_fraction: float, seed: int, indices: np.ndarray | None = None,
                    class_order: Sequence[int] | None = None):
  """(biased long-tailed indices, balanced reference indices), e.g. CIFAR-10-LT with
  ``imbalance_ratio=0.01`` and a reference of 5% or 10% of the biased set's size."""
  return biased_reference_split(labels, long_tail_profile(num_classes, imbalance_ratio,
                                                          class_order),
                                ref_fraction, seed, indices)


def attribute_bias_split(attribute: np.ndarray, num_values: int, majority_value: int,
                         majority_fraction: float, ref_fraction: float, seed: int,
                         indices: np.ndarray | None = None):
  """(biased indices, balanced reference indices) for a bias in one attribute, e.g. a
  CelebA/FFHQ biased set that is 80% female: ``majority_fraction`` of the biased set has
  ``attribute == majority_value``, the other values share the rest equally."""
  if not 0 <= majority_value < num_values:
    raise ValueError(f'majority_value={majority_value} is not a value in 0..{num_values - 1}.')
  if not 1.0 / num_values <= majority_fraction < 1.0:
    raise ValueError(f'majority_fraction={majority_fraction} must lie in '
                     f'[{1.0 / num_values:.3g}, 1).')
  profile = np.full(num_values, (1.0 - majority_fraction) / max(num_values - 1, 1))
  profile[majority_value] = majority_fraction
  return biased_reference_split(attribute, profile, ref_fraction, seed, indices)
