"""Readers of what a run leaves on disk, shared by the tests (not a test module)."""

import hashlib
import os
import struct


def snapshot(directory) -> dict:
  """{relative path: (mtime_ns, sha1)} of every file under ``directory``: equal snapshots
  mean nothing was written, touched or removed."""
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      path = os.path.join(root, f)
      with open(path, 'rb') as fh:
        digest = hashlib.sha1(fh.read()).hexdigest()
      out[os.path.relpath(path, directory)] = (os.stat(path).st_mtime_ns, digest)
  return out


def tensorboard_events(logdir) -> tuple[dict, list[int]]:
  """({(tag, step): value} of every scalar summary, [step of every SessionLog START (a purge
  of the points from that step on)]) in a TensorBoard log directory (a pathlib.Path)."""
  from tensorboardX.proto import event_pb2
  scalars, starts = {}, []
  for path in sorted(logdir.iterdir()):
    data = path.read_bytes()
    pos = 0
    while pos + 12 <= len(data):   # TFRecord: length (8), crc (4), payload, crc (4)
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      for v in event.summary.value:
        scalars[(v.tag, event.step)] = v.simple_value
      if event.HasField('session_log') and event.session_log.status == event.session_log.START:
        starts.append(event.step)
      pos += 12 + length + 4
  return scalars, starts


def tiny_digits_config(log_every: int, checkpoint_every: int, steps_per_call: int = 1):
  """A digits DSM config for launcher runs of a few seconds: a one-block UNet without
  attention, 8 steps of batch 16, records and checkpoints at the given cadence, 2-step
  sampling of 2 samples, no compilation cache."""
  from cdiff_jax.config import base_config
  c = base_config()
  c.model.ch, c.model.num_res_blocks, c.model.attn_levels = 16, 1, ()
  c.train.steps, c.train.batch_size, c.train.steps_per_call = 8, 16, steps_per_call
  c.train.log_every, c.train.checkpoint_every = log_every, checkpoint_every
  c.train.compilation_cache = False
  c.optim.warmup_steps = 2
  c.sample.num_steps, c.sample.num_samples = 2, 2
  return c


class FakeClock:
  """Stands in for the launcher's ``time`` module: one second per reading, so the logged
  throughput is known exactly."""

  def __init__(self):
    self.now = 0.0

  def perf_counter(self):
    self.now += 1.0
    return self.now


def per_step(calls, steps_per_call: int = 1) -> dict:
  """{metric: array with one row per training step} from the metrics of successive step
  calls (``fit``'s history, or what the launcher's calls returned): with k steps per call
  each call's metrics carry a leading axis of k, laid end to end here."""
  import numpy as np
  out = {}
  for key in calls[0]:
    rows = [np.asarray(m[key], np.float64) for m in calls]
    out[key] = np.concatenate(rows) if steps_per_call > 1 else np.stack(rows)
  return out


def assert_interval_means(records, steps: dict, batch_size: int, across_a_stop=()) -> None:
  """Each metrics.jsonl record holds the means of the steps after the previous record up
  to its own (``nonfinite``: their count; a skipped non-finite step is left out of the
  other means) and the throughput of one fake second per interval (``FakeClock``; not for
  the records at ``across_a_stop``, whose interval's time adds two invocations' clocks)."""
  import numpy as np
  prev = 0
  for r in records:
    assert r['step'] > prev, [r['step'] for r in records]
    ok = steps['nonfinite'][prev:r['step']] == 0 if 'nonfinite' in steps else None
    for key, values in steps.items():
      window = values[prev:r['step']]
      if key == 'nonfinite':
        expected = window.sum(0)
      else:
        expected = window[ok].mean(0) if ok is not None and ok.any() else window.mean(0)
      np.testing.assert_allclose(np.asarray(r[key], np.float64), expected, rtol=2e-6,
                                 atol=1e-12, err_msg=f"{key} at step {r['step']}")
    if r['step'] not in across_a_stop:
      assert r['images_per_sec'] == (r['step'] - prev) * batch_size, r
    prev = r['step']


def leaves(tree) -> list:
  """Every array of a pytree on the host, in tree order."""
  import jax
  import numpy as np
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def state_leaves(state) -> list:
  """Every array of a TrainState on the host (the rng key as its raw data), in tree order:
  step, params, EMA params, optimizer state, method extras and rng."""
  import jax
  return leaves(state.replace(rng=jax.random.key_data(state.rng)))


def markdown_rows(text: str) -> dict:
  """{first cell: {column header: cell}} of every markdown table row in ``text`` (each
  table's first row is its header)."""
  out, header = {}, None
  for line in text.splitlines():
    if not line.startswith('|'):
      header = None
      continue
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    if header is None:
      header = cells
    elif not set(line.strip()) <= set('|-: '):
      out[cells[0]] = dict(zip(header, cells))
  return out


def floats(cell: str) -> list[float]:
  """The numbers of a table cell such as '0.100, 0.250' or '0.10 0.25'."""
  return [float(v) for v in cell.replace(',', ' ').split()]
