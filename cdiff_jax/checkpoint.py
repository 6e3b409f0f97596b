"""Orbax checkpoints of the whole train state, with a config fingerprint.

``Checkpointer.restore_latest`` returns the newest complete checkpoint (Orbax writes to a
temporary folder and renames, so a run killed mid-save, even by SIGKILL, leaves the
previous one intact) or None; a checkpoint whose structural config fields (seed, data,
model, diffusion, method, optimizer kind, batch size; not paths) differ from the current
run, or whose state has another layout, is refused with ``IncompatibleCheckpoint`` naming
the differences.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from cdiff_jax import config as config_lib


class IncompatibleCheckpoint(RuntimeError):
  pass


class UnreadableCheckpoint(IncompatibleCheckpoint):
  """A step folder that cannot be read: a file truncated or lost (a full disk, a copy cut
  short), or a folder left without its items."""


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return f'{type(e).__name__}: {lines[0][:200]}' if lines else type(e).__name__


def hash_pytree(h, tree) -> None:
  """Feeds every array of ``tree`` (by value) into the ``hashlib`` object ``h``: the key of
  a cache that must change with the parameters that made it."""
  for leaf in jax.tree.leaves(tree):
    h.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())


def load_params(workdir: str, which: str = 'ema_params'):
  """Parameters (``ema_params`` or ``params``) of the newest checkpoint of any run's workdir,
  as a plain pytree on this process's first device; used for fine-tuning and for reference
  models. Works whatever the topology that wrote it (e.g. a multi-host run)."""
  directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'{workdir} holds no checkpoints/; train that run first.')
  handlers = dict(state=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler())
  with ocp.CheckpointManager(directory, item_handlers=handlers) as mgr:
    step = mgr.latest_step()
    if step is None:
      raise FileNotFoundError(f'{directory} holds no complete checkpoint.')
    metadata = mgr.item_metadata(step)['state']
    # A target with this process's shardings: restoring with the saved ones fails when
    # the devices that wrote the checkpoint are not all here.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          getattr(metadata, 'tree', metadata),
                          is_leaf=lambda m: hasattr(m, 'shape') and hasattr(m, 'dtype'))
    state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  return state['state'][which]


class Checkpointer:
  """Every process of a multi-process run takes part in saves and restores (Orbax writes
  each array's shards from the processes that hold them, the metadata from process 0)."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    # The folder is made by the first save, so a run that stops at a bad config, a missing
    # dataset or an incompatible checkpoint leaves a fresh workdir empty.
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep or None, create=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'meta'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, config) -> None:
    meta = dict(fingerprint=config_lib.fingerprint(config),
                training=config_lib.training_fingerprint(config), step=int(step),
                train_steps=int(config.train.steps))
    os.makedirs(self.directory, exist_ok=True)
    self.manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def read_meta(self, step: int) -> dict:
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except KeyError as e:  # Orbax: 'Item "meta" was not found in the checkpoint'
      raise UnreadableCheckpoint(
          f"the checkpoint at step {step} in {self.directory} has no 'meta' item (the config "
          'fingerprint every save writes beside the state): it was not written by this '
          'training loop, or was copied without it; use a new --workdir, or copy the whole '
          'step folder.') from e
    except Exception as e:
      raise UnreadableCheckpoint(f'the checkpoint at step {step} in {self.directory} cannot '
                                 f'be read ({_first_line(e)})') from e
    return out['meta']

  def restore_latest(self, abstract_state, config, resume: bool = False):
    """(state, step) of the newest checkpoint, or (None, None) if there is none. A reader
    beside a run that is still training (``load_run``, the sampling command) may see its
    newest step deleted by that run (``train.keep_checkpoints``) before it reads it: it then
    takes the newest one again. ``resume``: training goes on from it, so the fields that
    shape the steps (``config.TRAINING_FIELDS``: the optimizer, the EMA) must be those it
    was trained with too.

    A step folder that cannot be read (``UnreadableCheckpoint``: a truncated file, a folder
    without its items) is passed over, with a warning, for the newest one before it that
    can; when resuming, the unreadable folders are renamed ``STEP.unreadable`` (kept to
    look at, out of Orbax's way: the run saves those steps again). None readable: the
    newest one's error."""
    unreadable, deletions = {}, 0   # step -> its error, newest first
    while True:
      steps = [s for s in sorted(self.manager.all_steps(), reverse=True) if s not in unreadable]
      if not steps:
        if unreadable:
          raise next(iter(unreadable.values()))
        return None, None
      step = steps[0]
      try:
        state = self._restore(step, abstract_state, config, resume)
      except UnreadableCheckpoint as e:
        if not os.path.exists(os.path.join(self.directory, str(step))):
          deletions += 1  # deleted meanwhile by the run that wrote it
          if deletions > 5:
            raise FileNotFoundError(
                f'the checkpoints in {self.directory} were all deleted while they were '
                'read: the run writing them saves faster than they load; try again.') from e
          self.manager.reload()
          continue
        if resume and jax.process_count() > 1:  # several writers: no renaming here
          raise UnreadableCheckpoint(f'{e}; move that folder out of {self.directory} to '
                                     'resume from the step before.') from e
        unreadable[step] = e
        continue
      for bad, e in unreadable.items():
        print(f'WARNING: {e}; ' + (f'resuming from step {step}, the newest readable one, and '
              f'keeping the unreadable folder as {bad}.unreadable.' if resume else
              f'reading step {step}, the newest readable one.'), file=sys.stderr)
        if resume:
          os.replace(os.path.join(self.directory, str(bad)),
                     os.path.join(self.directory, f'{bad}.unreadable'))
      if unreadable and resume:
        self.manager.reload()
      return state, step

  def _restore(self, step: int, abstract_state, config, resume: bool = False):
    meta = self.read_meta(step)
    diffs = config_lib.fingerprint_mismatch(meta['fingerprint'], config_lib.fingerprint(config))
    if diffs:
      raise IncompatibleCheckpoint(
          f'the checkpoint at step {step} in {self.directory} was written by a different '
          f'config ({"; ".join(diffs[:5])}{" ..." if len(diffs) > 5 else ""}); use a new '
          '--workdir or the same config.')
    # (A checkpoint written before the record existed has none: nothing to hold against it.)
    diffs = config_lib.fingerprint_mismatch(meta.get('training', {}),
                                            config_lib.training_fingerprint(config))
    if resume and diffs:
      run = os.path.dirname(self.directory)
      raise IncompatibleCheckpoint(
          f'the checkpoint at step {step} in {self.directory} was trained with other '
          f'settings ({"; ".join(diffs[:5])}{" ..." if len(diffs) > 5 else ""}); a resumed '
          'run keeps them (or its steps would follow two configs while its config.json '
          'names one): rerun with the checkpoint\'s values, or use a new --workdir (with '
          f'--config.train.init_from={run} to start from its parameters).')
    planned = meta.get('train_steps')   # the length the schedule so far was made for
    if (resume and planned not in (None, config.train.steps)
        and config.optim.lr_schedule != 'constant'):
      print(f'WARNING: the checkpoint at step {step} was trained toward train.steps={planned}, '
            f'this run goes to {config.train.steps}: its learning rate from here follows the '
            f'{config.optim.lr_schedule} schedule of {config.train.steps} steps, so it is not '
            'the run a launch at that length would train (for that, use a new --workdir).',
            file=sys.stderr)
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target)))
    except ValueError as e:  # a state layout the fingerprint does not cover (e.g. clipping)
      raise IncompatibleCheckpoint(
          f'the checkpoint at step {step} in {self.directory} holds a training state of '
          f'another layout than this config builds ({str(e).splitlines()[0][:200]}); use a '
          'new --workdir or the config that wrote it.') from e
    except Exception as e:
      raise UnreadableCheckpoint(f'the checkpoint at step {step} in {self.directory} cannot '
                                 f'be read ({_first_line(e)})') from e
    return out['state']

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
