"""Data: sources (digits, TFDS, IDX, npz), imbalance builders, deterministic batching."""

from cdiff_jax.data.imbalance import (class_counts, filter_classes, long_tail_counts,
                                      minority_indices, subsample_classes)
from cdiff_jax.data.pipeline import GroupedBatcher
from cdiff_jax.data.sources import (ArrayDataset, DatasetNotFound, load_dataset, load_digits,
                                    load_idx, load_npz, load_tfds, read_idx)
