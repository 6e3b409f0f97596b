"""Deterministic grouped batches with per-process shards and background prefetch.

A training batch is one flat array of examples drawn from several *groups* of one
dataset (the objective and each constraint set of constrained training, the biased and
the reference set of TIW-DSM, or a single group for plain DSM), with a ``group`` id per
example. Group g contributes ``batch_sizes[g]`` examples to every global batch.

Order: group g walks through epoch permutations drawn from ``(seed, g, epoch)``, so the
batch at step s is a pure function of ``(seed, s)``. A resumed run therefore sees exactly
the batches an uninterrupted run would, with no iterator state to checkpoint.

Multi-host: each process materializes only its contiguous slice of the global batch (the
rows its devices hold, see ``parallel.make_mesh``), so the global batch, and with it every
random draw indexed by batch position, is the same as on a single host.
"""

from __future__ import annotations

import collections
import queue
import threading
from typing import Iterator, Sequence

import numpy as np

from cdiff_jax.data.sources import ArrayDataset


class GroupedBatcher:

  def __init__(self, dataset: ArrayDataset, groups: Sequence[np.ndarray],
               batch_sizes: Sequence[int], seed: int, process_index: int = 0,
               process_count: int = 1, group_names: Sequence[str] | None = None):
    if len(groups) != len(batch_sizes):
      raise ValueError(f'{len(groups)} groups but {len(batch_sizes)} batch sizes.')
    names = list(group_names or [f'group{i}' for i in range(len(groups))])
    for name, g, b in zip(names, groups, batch_sizes):
      if len(g) == 0:
        raise ValueError(f'data group {name!r} is empty; check the class selection in config.data.')
    self.dataset = dataset
    self.groups = [np.asarray(g, np.int64) for g in groups]
    self.batch_sizes = [int(b) for b in batch_sizes]
    self.group_names = names
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self._perms = collections.OrderedDict()
    self._perms_lock = threading.Lock()
    if self.global_batch_size % process_count:
      raise ValueError(f'global batch size {self.global_batch_size} is not divisible by the '
                       f'{process_count} processes.')

  @property
  def global_batch_size(self) -> int:
    return sum(self.batch_sizes)

  def _perm(self, g: int, epoch: int) -> np.ndarray:
    # A cache of recent epochs' permutations, shared with a prefetch thread (``iterate``):
    # the one computed here is returned, not read back after another thread's eviction.
    key = (g, epoch)
    perm = self._perms.get(key)
    if perm is None:
      perm = np.random.default_rng([self.seed, g, epoch]).permutation(len(self.groups[g]))
      with self._perms_lock:
        self._perms[key] = perm
        while len(self._perms) > 4 * len(self.groups):
          self._perms.popitem(last=False)
    return perm

  def group_positions(self, g: int, step: int) -> np.ndarray:
    """Dataset indices of group g's part of the *global* batch at ``step``."""
    n, b = len(self.groups[g]), self.batch_sizes[g]
    pos = step * b + np.arange(b)
    epochs, offsets = pos // n, pos % n
    out = np.empty(b, np.int64)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self.groups[g][self._perm(g, int(e))[offsets[sel]]]
    return out

  def indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset indices, group ids) of this process's slice of the batch at ``step``: rows
    [p * B / P, (p + 1) * B / P) of the global batch (groups one after the other)."""
    idx = np.concatenate([self.group_positions(g, step) for g in range(len(self.groups))])
    gid = np.concatenate([np.full(b, g, np.int32) for g, b in enumerate(self.batch_sizes)])
    local = self.global_batch_size // self.process_count
    rows = slice(self.process_index * local, (self.process_index + 1) * local)
    return idx[rows], gid[rows]

  def batch(self, step: int) -> dict:
    idx, gid = self.indices(step)
    out = self.dataset.get(idx)
    out['group'] = gid
    return out

  def stacked(self, step: int, k: int) -> dict:
    """k consecutive batches stacked on a leading axis (for multi-step calls)."""
    batches = [self.batch(step + i) for i in range(k)]
    return {key: np.stack([b[key] for b in batches]) for key in batches[0]}

  def iterate(self, start_step: int, steps_per_call: int = 1, prefetch: int = 2) -> Iterator[dict]:
    """Yields the host batches for calls starting at start_step, start_step + k, ...

    A daemon thread prepares the next ``prefetch`` batches while the device computes.
    """
    q: queue.Queue = queue.Queue(maxsize=max(prefetch, 1))
    stop = threading.Event()

    def produce():
      step = start_step
      while not stop.is_set():
        try:
          item = (self.batch(step) if steps_per_call == 1
                  else self.stacked(step, steps_per_call))
        except Exception as e:  # Re-raised in the consumer instead of hanging it.
          item = e
        while not stop.is_set():
          try:
            q.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        step += steps_per_call

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
      while True:
        item = q.get()
        if isinstance(item, Exception):
          raise item
        yield item
    finally:
      stop.set()
