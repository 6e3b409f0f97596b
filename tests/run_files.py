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
