"""What a run leaves in its workdir: metrics.jsonl, TensorBoard events, PNG grids and plots.

Only process 0 writes (``MetricWriter(..., active=jax.process_index() == 0)``).
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Mapping

import numpy as np


def write_atomic(path: str, data: bytes | str) -> None:
  """Writes ``path`` whole or not at all: to a temporary file of this process, then renamed
  over it (a reader, or a run killed meanwhile, sees the old file or the new one)."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'wb' if isinstance(data, bytes) else 'w') as f:
    f.write(data)
  os.replace(tmp, path)


def save_arrays_atomic(path: str, array=None, **arrays) -> None:
  """``np.save(path, array)`` (a .npy) or ``np.savez(path, **arrays)`` (a .npz), whole or not
  at all (``write_atomic``): files that a rerun reads back must never be half written."""
  buf = io.BytesIO()
  if array is not None:
    np.save(buf, array)
  else:
    np.savez(buf, **arrays)
  write_atomic(path, buf.getvalue())


def _to_python(v):
  if isinstance(v, (np.ndarray, np.generic)):
    v = v.tolist()
  if isinstance(v, (list, tuple)):  # per-constraint figures: each entry as a scalar
    return [_to_python(x) for x in v]
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/inf literal; keep the file parseable.
  return v


def _step_of(line: str) -> float:
  try:
    return json.loads(line)['step']
  except (ValueError, KeyError, TypeError):  # a line cut short by a killed process
    return float('inf')


class MetricWriter:
  """Appends one JSON object per logging step to metrics.jsonl and mirrors scalars to
  TensorBoard. Appending (not truncating) keeps the history of a resumed run whole."""

  def __init__(self, workdir: str, active: bool = True, tensorboard: bool = True,
               resume_step: int = 0):
    """``resume_step``: the step the run starts from. TensorBoard hides the points a killed
    run logged after it (``drop_after`` removes them from metrics.jsonl): after a resume
    (> 0), and after a restart from step 0 of a run killed before its first checkpoint."""
    self.active = active
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if active:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        try:
          from tensorboardX import SummaryWriter
          logdir = os.path.join(workdir, 'tensorboard')
          rerun = resume_step > 0 or os.path.isdir(logdir)
          self._tb = SummaryWriter(logdir, flush_secs=30,
                                   purge_step=resume_step + 1 if rerun else None)
        except ImportError:  # TensorBoard is optional; metrics.jsonl is the record.
          self._tb = None

  def drop_after(self, step: int) -> None:
    """Removes records of steps after ``step``: a run killed after its last checkpoint
    logged steps that the resumed run logs again."""
    if not self.active or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [l for l in f if l.strip()]
    keep = [l for l in lines if _step_of(l) <= step]
    if len(keep) != len(lines):
      write_atomic(self.path, ''.join(keep))

  def write(self, step: int, metrics: Mapping[str, object]) -> None:
    if not self.active:
      return
    record = {'step': int(step)}
    record.update({k: _to_python(v) for k, v in metrics.items()})
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self._tb is not None:
      for k, v in metrics.items():
        arr = np.asarray(v)
        if arr.ndim == 0 and np.issubdtype(arr.dtype, np.number):
          self._tb.add_scalar(k, float(arr), int(step))
        elif arr.ndim == 1 and np.issubdtype(arr.dtype, np.number):
          for i, x in enumerate(arr):
            self._tb.add_scalar(f'{k}/{i}', float(x), int(step))

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  records = []
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except ValueError as e:
      if i < len(lines) - 1:
        raise ValueError(f'{path}: line {i + 1} of {len(lines)} is not a JSON record ({e}); '
                         'only the last line of a killed run may be cut short. Mend or '
                         'delete that line.') from e
      # The last line cut short by a killed run (a rerun drops it) or still being written.
  return records


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
  """(N, H, W, C) in [-1, 1] -> one uint8 (rows*H, cols*W, C) grid."""
  images = np.asarray(images, np.float32)
  n, h, w, c = images.shape
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  grid = np.ones((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.float32)
  for i in range(n):
    r, col = divmod(i, ncols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h,
         pad + col * (w + pad):pad + col * (w + pad) + w] = (images[i] + 1) / 2
  return (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)


def save_image_grid(path: str, images: np.ndarray, ncols: int | None = None,
                    upscale: int | None = None) -> str:
  """Writes a PNG grid; small images are upscaled (nearest) so they can be looked at."""
  from PIL import Image
  grid = image_grid(images, ncols)
  if upscale is None:
    upscale = max(1, 256 // max(grid.shape[:2]) + 1) if max(grid.shape[:2]) < 256 else 1
  if upscale > 1:
    grid = grid.repeat(upscale, 0).repeat(upscale, 1)
  buf = io.BytesIO()  # whole or not at all: a stopped write leaves no truncated PNG
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buf, format='png')
  write_atomic(path, buf.getvalue())
  return path


def new_figure(nrows: int = 1, ncols: int = 1, figsize=None, layout=None, **subplots_kw):
  """``(figure, axes)`` drawn off-screen without pyplot (save with ``save_figure``).

  The project's figures never touch matplotlib's global backend, so writing them inside a
  notebook or an interactive session leaves the user's inline/GUI plotting as it was.
  """
  from matplotlib.figure import Figure
  fig = Figure(figsize=figsize, layout=layout)
  return fig, fig.subplots(nrows, ncols, **subplots_kw)


def save_figure(fig, path: str) -> str:
  """Lays out and writes a ``new_figure`` figure as a PNG (the folder made; whole or not at
  all); returns path."""
  if fig.get_layout_engine() is None:  # a figure made with its own layout keeps it
    fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=110)
  write_atomic(path, buf.getvalue())
  return path


def _series(records: list[dict], key: str):
  """(steps, values) of a logged metric, or (None, None) if no record has it. A metric may
  have changed shape across a resumed run's versions: the points of the last shape."""
  pts = [(r['step'], r[key]) for r in records if key in r and not isinstance(r[key], str)]
  pts = [p for p in pts if np.shape(p[1]) == np.shape(pts[-1][1])] if pts else pts
  if not pts:
    return None, None
  return np.array([p[0] for p in pts]), np.array([p[1] for p in pts], dtype=np.float64)


def plot_curves(path: str, records: list[dict], keys: list[str], title: str = '',
                yscale: str = 'linear', entry_names=None,
                labels: Mapping[str, str] | None = None, zero_line: bool = False) -> str | None:
  """Line plot of metrics over steps (list-valued metrics get one line per entry, labelled
  ``key[name]`` with ``entry_names`` or ``key[i]``; ``labels`` renames a key in the legend).
  Keys no record has are left out; None (nothing written) when none is left.

  ``yscale``: 'linear'; 'log' where the values are positive and span more than a factor
  10 (linear otherwise: a log axis over less than a decade has hardly a labelled tick);
  'symlog' (linear within +-1, logarithmic beyond, for signed values whose early ones are
  far larger). ``zero_line``: a dashed line at 0."""
  fig, ax = new_figure(figsize=(6, 3.5))
  plotted = []
  for key in keys:
    steps, values = _series(records, key)
    if steps is None:
      continue
    plotted.append(np.ravel(values))
    label = (labels or {}).get(key, key)
    if values.ndim == 1:
      ax.plot(steps, values, label=label)
    else:
      for i in range(values.shape[1]):
        name = entry_names[i] if entry_names and i < len(entry_names) else i
        ax.plot(steps, values[:, i], label=f'{label}[{name}]')
  if not plotted:
    return None
  if yscale == 'symlog':
    ax.set_yscale('symlog', linthresh=1.0)
  elif yscale == 'log':
    if _spans_a_decade(np.concatenate(plotted)):
      _log_scale(ax)
  elif yscale != 'linear':
    raise ValueError(f"yscale={yscale!r}: use 'linear', 'log' or 'symlog'.")
  if zero_line:
    ax.axhline(0.0, color='k', linestyle='--', linewidth=0.8)
  ax.set_xlabel('step')
  ax.set_title(title)
  ax.legend(fontsize=7)
  return save_figure(fig, path)


def _spans_a_decade(values) -> bool:
  """Positive, finite values whose largest is more than 10x the smallest."""
  v = np.asarray(values, np.float64)
  v = v[np.isfinite(v)]
  return v.size > 0 and bool(np.all(v > 0)) and v.max() > 10 * v.min()


def _log_scale(ax) -> None:
  """A log y axis whose minor ticks are labelled too while it spans up to two decades (by
  default only the decades are, which left curves between 10 and 100 with no number)."""
  from matplotlib import ticker
  ax.set_yscale('log')
  ax.yaxis.set_minor_formatter(ticker.LogFormatterSciNotation(labelOnlyBase=False,
                                                              minor_thresholds=(2, 0.4)))


def plot_compared_curves(path: str, runs: Mapping[str, list[dict]], key: str,
                         entry_names=None, thresholds=None, title: str = '') -> str | None:
  """One panel per entry of the list-valued metric ``key`` (a constraint's loss, say), each
  run's records as a line, and ``thresholds[i]`` as a dashed line across panel i; None
  (nothing written) when no run logged ``key``."""
  curves = {}
  for name, records in runs.items():
    steps, values = _series(records, key)
    if steps is not None:
      curves[name] = steps, values.reshape(len(steps), -1)
  if not curves:
    return None
  num = max(v.shape[1] for _, v in curves.values())
  fig, axes = new_figure(1, num, figsize=(max(4.2 * num, 6.0), 3.5), squeeze=False)
  for i, ax in enumerate(axes[0]):
    for name, (steps, values) in curves.items():
      if i < values.shape[1]:
        ax.plot(steps, values[:, i], label=name)
    if thresholds is not None and i < len(thresholds):
      ax.axhline(float(thresholds[i]), color='k', linestyle='--', linewidth=1,
                 label=f'b = {float(thresholds[i]):.4g}')
    shown = np.concatenate([v[:, i] for _, v in curves.values() if i < v.shape[1]])
    if _spans_a_decade(shown):  # early losses dwarf the rest
      _log_scale(ax)
    ax.set_title(str(entry_names[i]) if entry_names and i < len(entry_names) else f'{key}[{i}]',
                 fontsize=9)
    ax.set_xlabel('step')
    ax.legend(fontsize=7)
  fig.suptitle(title, fontsize=10)
  return save_figure(fig, path)


def plot_class_frequencies(path: str, series: Mapping[str, object], target=None,
                           title: str = '', class_names=None) -> str:
  """Grouped bar chart of class frequencies (one bar per series), the target as a dashed
  mark across each class's bars (a line through them would slope across a target that is
  0 for some classes)."""
  names = list(series)
  values = [np.asarray(series[n], np.float64) for n in names]
  num = len(values[0])
  width = 0.8 / len(values)
  fig, ax = new_figure(figsize=(max(5, 0.6 * num + 2), 3.5))
  for i, (name, v) in enumerate(zip(names, values)):
    ax.bar(np.arange(num) + (i - (len(values) - 1) / 2) * width, v, width, label=name)
  if target is not None:
    ax.hlines(np.asarray(target), np.arange(num) - 0.45, np.arange(num) + 0.45, colors='k',
              linestyles='--', lw=1, label='target')
  ax.set_xticks(np.arange(num))
  ax.set_xticklabels(class_names or [str(i) for i in range(num)])
  ax.set_xlabel('class')
  ax.set_ylabel('frequency')
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.0, 1.0))  # beside the bars
  return save_figure(fig, path)
