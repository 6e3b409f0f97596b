"""glibc malloc settings for timing on a small VM, applied to both frameworks' processes.

XLA:CPU allocates and frees its temporary buffers every step through malloc. With glibc's
defaults, freed memory at the top of the heap is trimmed back to the OS and large blocks
are mmap'ed and unmapped, so the next step faults the pages in again. On the 2-core VM of
the README that cost JAX up to 2x for several steps whenever the other framework's process
had just run (train step, mnist28: 51-87 img/s over five rounds, 84-90 with these settings;
PyTorch 128-140 either way). Keeping freed memory in the process removes that noise.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def apply() -> bool:
  """Never trim the heap, pad it by 512 MiB, mmap only blocks above 32 MiB (glibc's
  maximum). Returns whether glibc accepted all three (False elsewhere: no effect)."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  return all(mallopt(opt, value) == 1 for opt, value in (
      (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 512 << 20), (_M_MMAP_THRESHOLD, 32 << 20)))
