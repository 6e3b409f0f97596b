"""Orbax checkpoints of the whole train state, with a config fingerprint.

``Checkpointer.restore_latest`` returns the newest complete checkpoint (Orbax writes to a
temporary folder and renames, so a run killed mid-save leaves the previous one intact) or
None; a checkpoint whose structural config fields differ from the current run is refused
with ``IncompatibleCheckpoint`` listing the differences.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from cdiff_jax import config as config_lib


class IncompatibleCheckpoint(RuntimeError):
  pass


def load_params(workdir: str, which: str = 'ema_params'):
  """Parameters (``ema_params`` or ``params``) of the newest checkpoint of any run's workdir,
  as a plain pytree; used for fine-tuning and for reference models."""
  directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'{workdir} holds no checkpoints/; train that run first.')
  with ocp.CheckpointManager(directory, item_names=('state', 'meta')) as mgr:
    step = mgr.latest_step()
    if step is None:
      raise FileNotFoundError(f'{directory} holds no complete checkpoint.')
    state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  return state[which]


class Checkpointer:

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep or None, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'meta'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, config) -> None:
    meta = dict(fingerprint=config_lib.fingerprint(config), step=int(step))
    self.manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def read_meta(self, step: int) -> dict:
    out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return out['meta']

  def restore_latest(self, abstract_state, config):
    """(state, step) of the newest checkpoint, or (None, None) if there is none."""
    step = self.manager.latest_step()
    if step is None:
      return None, None
    meta = self.read_meta(step)
    diffs = config_lib.fingerprint_mismatch(meta['fingerprint'], config_lib.fingerprint(config))
    if diffs:
      raise IncompatibleCheckpoint(
          f'the checkpoint at step {step} in {self.directory} was written by a different '
          f'config ({"; ".join(diffs[:5])}{" ..." if len(diffs) > 5 else ""}); use a new '
          '--workdir or the same config.')
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
    return out['state'], step

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
