"""``train_and_evaluate(config, workdir)``: builds every piece from the config and runs.

The pieces are also reachable one by one for notebooks and experiments: ``build(config)``
returns an ``Experiment`` (dataset, score model, method, optimizer, mesh, batcher, jitted
step, initial state); ``Experiment.sampler`` builds a compiled sampler for its model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from cdiff_jax import checkpoint as checkpoint_lib
from cdiff_jax import config as config_lib
from cdiff_jax import methods as methods_lib
from cdiff_jax import optim, parallel
from cdiff_jax import schedules as schedules_lib
from cdiff_jax import train_step as train_step_lib
from cdiff_jax import writers
from cdiff_jax.data import imbalance, pipeline, sources
from cdiff_jax.models import ScoreModel, build_net
from cdiff_jax.sampling import Sampler
from cdiff_jax.state import TrainState, create_train_state, num_params


class NonFiniteError(FloatingPointError):
  """A training step produced a non-finite loss, gradient, parameter update or method state
  (train.on_nonfinite='stop')."""


class Preempted(Exception):
  """SIGTERM (or the cluster's preemption notice), or Ctrl-C (``interrupted``), arrived: the
  run saved a checkpoint at the next step boundary and stopped; rerunning the same command
  resumes from it."""

  def __init__(self, step: int, directory: str, interrupted: bool = False):
    self.step, self.interrupted = step, interrupted
    super().__init__(f'{"interrupted" if interrupted else "preempted"}: saved a checkpoint at '
                     f'step {step} in {directory}; rerun the same command to resume from it.')


class _PreemptionWatch:
  """Tells the training loop when to save and stop.

  One process: SIGTERM and SIGINT handlers (installed from the start of the run until the
  last step is saved, when called from the main thread) set a flag that the loop reads at
  every step boundary; SIGTERM during set-up calls the handler it replaced (the command
  line's stops the program at once). Once the run writes (``training``: from config.json
  on) the first Ctrl-C (SIGINT) asks for that save and puts the previous handler back, so a
  second one stops at once (KeyboardInterrupt); before (set-up: data, a discriminator's
  pre-training, reference losses, restoring) Ctrl-C stops at once, there being nothing new
  to save.
  After the last step (``finishing``) SIGTERM ends the run as a preemption, so a restart
  loop reruns it and the rerun redoes only the sampling and evaluation. Several processes:
  JAX's preemption service (started by ``jax.distributed.initialize``) receives the notice
  and agrees with the other processes on one step at which all of them save.
  ``steps_per_call``: the steps of one call, between two ``should_stop``.
  """

  def __init__(self, steps_per_call: int = 1):
    self.steps_per_call = steps_per_call
    self.requested = False
    self.interrupted = False  # by Ctrl-C, not a preemption notice
    self.training = False     # in the training loop: Ctrl-C saves at the next step boundary
    self._previous = {}
    self._multi = jax.process_count() > 1

  def __enter__(self):
    if not self._multi and threading.current_thread() is threading.main_thread():
      for signum, handler in ((signal.SIGTERM, self._on_sigterm),
                              (signal.SIGINT, self._on_sigint)):
        self._previous[signum] = signal.signal(signum, handler)
    return self

  def _on_sigterm(self, signum, frame):
    previous = self._previous.get(signal.SIGTERM)
    if not self.training and callable(previous):
      # Set-up (a discriminator's pre-training, reference losses): nothing new to save, and
      # a grace period may end before the first step; the caller's handler (the command
      # line's stops at once, exit status 3).
      previous(signum, frame)
    self.requested = True

  def _on_sigint(self, signum, frame):
    del frame
    self._restore(signum)
    if not self.training:
      raise KeyboardInterrupt
    self.requested = self.interrupted = True
    print('\ninterrupt: saving a checkpoint at the next step boundary; press Ctrl-C again to '
          'stop at once.', file=sys.stderr, flush=True)

  def should_stop(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils
      try:
        # The service's sync point is one past the largest number any process reported,
        # and is met only by that number: count calls, not steps, which go up by k.
        return multihost_utils.reached_preemption_sync_point(step // self.steps_per_call)
      except RuntimeError:  # preemption service not running (disabled by a flag)
        return False
    return self.requested

  def stopped(self, step: int, directory: str) -> Preempted:
    """The exception that ends the run after it saved ``step`` for this notice."""
    return Preempted(step, directory, self.interrupted)

  def release(self) -> bool:
    """Puts the previous handlers back; returns whether a notice had arrived."""
    for signum in list(self._previous):
      self._restore(signum)
    return self.requested

  def finishing(self, step: int, directory: str) -> bool:
    """Past the final checkpoint (``step`` in ``directory``): ``release``, then, until the
    watch exits, SIGTERM raises ``Preempted`` (exit status 3 through the launcher) and
    Ctrl-C stops at once."""
    notice = self.release()
    if not self._multi and threading.current_thread() is threading.main_thread():
      def on_sigterm(signum, frame):
        del signum, frame
        raise Preempted(step, directory)
      self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, on_sigterm)
    return notice

  def _restore(self, signum):
    previous = self._previous.pop(signum)  # None: a handler not set from Python
    signal.signal(signum, signal.SIG_DFL if previous is None else previous)

  def __exit__(self, *exc):
    self.release()
    return False


class _WorkdirLock:
  """One run at a time in a workdir: two runs of the same command (a second terminal, a
  restart loop started twice) would write the same checkpoints and metrics.

  An advisory ``flock`` on ``WORKDIR/.lock``, which holds who has it. The kernel drops it
  when the process ends, however it ends (SIGKILL included), so a rerun is never blocked
  by a dead run. Taken by ``acquire`` once the run's checks have passed (nothing is written
  before), by a single-process run on a file-system path; remote URLs, multi-process runs
  and file systems without ``flock`` run without it.
  """

  def __init__(self, workdir: str):
    self.workdir, self._file = workdir, None

  def acquire(self) -> None:
    try:
      import fcntl
    except ImportError:  # not a POSIX system
      return
    if '://' in self.workdir or jax.process_count() > 1:
      return
    os.makedirs(self.workdir, exist_ok=True)
    f = open(os.path.join(self.workdir, '.lock'), 'a+')
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      import errno
      f.seek(0)
      holder = f.read().strip()
      f.close()
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise config_lib.ConfigError(
            f'workdir {self.workdir} is in use by another run ({holder or "a live process"}); '
            'wait for it to end or stop it, or give another workdir.') from e
      return  # no flock on this file system
    import datetime
    import socket
    now = datetime.datetime.now(datetime.timezone.utc)
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()} on {socket.gethostname()}, since '
            f'{now:%Y-%m-%d %H:%M:%S} UTC\n')
    f.flush()
    self._file = f

  def release(self) -> None:
    if self._file is not None:
      self._file.close()  # drops the lock
      self._file = None

  @staticmethod
  def last_holder(workdir: str) -> tuple[str, bool | None]:
    """Who took the lock last (``acquire``'s line, kept after the run ends) and whether that
    process is alive: True / False for one of this host, None when unknown."""
    try:
      with open(os.path.join(workdir, '.lock')) as f:
        holder = f.read().strip()
    except OSError:
      return '', None
    import re
    import socket
    m = re.match(r'pid (\d+) on (\S+),', holder)
    if not m or m.group(2) != socket.gethostname():
      return holder, None
    try:
      os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
      return holder, False
    except PermissionError:  # alive, another user's
      pass
    return holder, True


class _RunClock:
  """A run's wall time over all its invocations: ``WORKDIR/run_time.json`` holds the seconds
  of the invocations before this one, so a resumed run reports the time of the whole run,
  not of its last part. Counted from the call, once the run has written anything (a refused
  invocation adds nothing); recorded at every checkpoint and when the invocation ends,
  however it ends (after a SIGKILL, up to the last checkpoint)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, 'run_time.json')
    self.t0, self.before, self.invocations, self.active = time.perf_counter(), 0.0, 0, False

  def start(self) -> None:
    """At the run's first write (process 0 only)."""
    if os.path.exists(self.path):
      with open(self.path) as f:
        saved = json.load(f)
      self.before, self.invocations = float(saved['seconds']), int(saved['invocations'])
    self.active = True

  def record(self, final: bool = True) -> float:
    """Writes the total so far and returns it; nothing more after the final record."""
    total = self.before + time.perf_counter() - self.t0
    if self.active:
      self.active = not final
      writers.write_atomic(self.path, json.dumps(
          dict(seconds=total, invocations=self.invocations + 1), indent=2))
    return total


def setup_jax(config) -> None:
  """Process-wide JAX setup, before any device is touched: XLA:CPU options
  (``config.train.xla_cpu_flags``), multi-process initialization (``config.parallel``) and
  the persistent compilation cache."""
  flags = config.train.get('xla_cpu_flags', parallel.DEFAULT_XLA_CPU_FLAGS)
  if flags:
    try:
      parallel.configure_xla_cpu(flags)
    except ValueError as e:  # not an XLA:CPU option, or one this jaxlib's XLA refuses
      raise config_lib.ConfigError(f'config.train.xla_cpu_flags={flags!r}: {e}') from e
  multi_process_cpu = False
  if 'parallel' in config:
    multi = parallel.initialize_distributed(config.parallel)
    multi_process_cpu = multi and bool(config.parallel.get('cpu_collectives'))
  # Not for several CPU processes: with jaxlib 0.12, a cross-process (gloo) CPU program
  # loaded from the cache hangs in its first collective (the same run compiled afresh
  # works), so a rerun of such a run would never start training.
  if config.train.get('compilation_cache', True) and not multi_process_cpu:
    # One root for every cache of the project: xla/ here, classifiers/ and
    # discriminators/ (evaluation.py, methods/tiw.py) beside it.
    root = os.environ.get('CDIFF_JAX_CACHE', os.path.expanduser('~/.cache/cdiff_jax'))
    cache = os.path.join(root, 'xla')
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def train_indices(data_config, dataset: sources.ArrayDataset) -> np.ndarray:
  """Indices of the training set after class selection and minority subsampling."""
  dc = data_config
  for field in ('keep_classes', 'drop_classes', 'minority_classes'):
    imbalance._check_classes(dc[field], dataset.num_classes, f'config.data.{field}')
  idx = imbalance.filter_classes(dataset.labels, keep=tuple(dc.keep_classes) or None,
                                 drop=tuple(dc.drop_classes))
  if dc.minority_classes and dc.minority_fraction < 1.0:
    frac = {int(c): dc.minority_fraction for c in dc.minority_classes}
    idx = imbalance.subsample_classes(dataset.labels, frac, dc.subsample_seed, idx)
  if len(idx) == 0:
    raise config_lib.ConfigError('config.data: the class selection leaves no training examples.')
  return idx


def load_training_data(data_config) -> sources.ArrayDataset:
  try:
    return sources.load_dataset(data_config, 'train')
  except sources.DatasetNotFound:
    raise
  except ValueError as e:  # The loaders' messages name the data.* field at fault.
    raise config_lib.ConfigError(str(e)) from e


def build_score_model(config, num_classes: int) -> ScoreModel:
  schedule = schedules_lib.get_schedule(config.diffusion)
  dtype = jnp.bfloat16 if config.model.dtype == 'bfloat16' else jnp.float32
  net = build_net(config.model, num_classes if config.model.conditional else 0, dtype)
  return ScoreModel(net, schedule, config.model.parameterization)


def _sampling_eps(model, guidance_scale, conditional, num_classes, params, x, t, cond):
  """eps at sampling time: classifier-free guided (``guidance_scale``) for a conditional
  model given labels, the model's own eps otherwise."""
  if cond is None or guidance_scale == 1.0 or not conditional:
    return model.eps(params, x, t, cond)
  from cdiff_jax.methods import guidance  # Local: guidance imports the samplers.
  return guidance.cfg_eps(model, params, x, t, cond, guidance_scale, num_classes)


@dataclasses.dataclass
class Experiment:
  config: ml_collections.ConfigDict
  dataset: sources.ArrayDataset
  train_idx: np.ndarray
  model: ScoreModel
  method: Any
  tx: Any
  lr_fn: Callable
  mesh: Any
  batcher: pipeline.GroupedBatcher
  step: train_step_lib.CompiledStep
  from_checkpoint: bool = False   # built to restore a run (``build``): init_from not read
  # The run's own samplers by their settings (``sampler()``), so that sample grids during
  # training and the final samples reuse one compiled program per batch size.
  _samplers: dict = dataclasses.field(default_factory=dict, init=False, repr=False,
                                      compare=False)

  @property
  def num_classes(self) -> int:
    return self.dataset.num_classes

  @property
  def image_shape(self):
    return self.dataset.image_shape

  def objective_class_frequencies(self) -> np.ndarray:
    """Class frequencies of the objective's minibatches: each objective group's class
    frequencies weighted by its share of the batch (one group: its data's frequencies; for
    TIW-DSM ``pi`` from D_ref and ``1 - pi`` from D_bias, the p_obs its DSM(obs) learns)."""
    num = getattr(self.method, 'num_objective_groups', None)
    groups, sizes = self.batcher.groups[:num], self.batcher.batch_sizes[:num]
    labels = self.dataset.labels
    mix = sum(b * np.bincount(labels[g], minlength=self.num_classes) / len(g)
              for g, b in zip(groups, sizes))
    return mix / sum(sizes)

  def init_state(self) -> TrainState:
    rng = jax.random.key(self.config.seed)
    rng_init, rng_extras, rng_train = jax.random.split(rng, 3)
    n = 2
    x = jnp.zeros((n,) + self.image_shape, jnp.float32)
    y = jnp.zeros((n,), jnp.int32) if self.config.model.conditional else None
    # One program (compiled for compile speed, cacheable) instead of one per layer op.
    params = parallel.run_once(self.model.init, rng_init, x, jnp.full((n,), 0.5), y)
    if self.config.train.init_from and not self.from_checkpoint:
      # fine-tuning: start from another run's EMA parameters
      loaded = checkpoint_lib.load_params(self.config.train.init_from)
      if jax.tree.structure(loaded) != jax.tree.structure(params) or any(
          a.shape != b.shape for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params))):
        raise config_lib.ConfigError(
            f'config.train.init_from={self.config.train.init_from!r}: its parameters do not '
            'match this model; use the same config.model as that run.')
      params = jax.tree.map(jnp.asarray, loaded)
    extras = self.method.init_extras(rng_extras, params)
    state = create_train_state(params, self.tx, rng_train, extras)
    return parallel.put_replicated(state, self.mesh)

  def _eps_settings(self) -> tuple:
    """What the run's sampling eps reads besides its arguments: (model, guidance scale,
    conditional, num_classes). ``sampler()`` binds them when it builds a Sampler and keys its
    cache on them, so a sampler keeps its settings when the config changes later."""
    return (self.model, float(self.config.sample.get('guidance_scale', 1.0)),
            bool(self.config.model.conditional), self.num_classes)

  def eps_fn(self, params, x, t, cond):
    """Sampling-time eps (cond: labels or None); classifier-free guided with weight
    ``sample.guidance_scale`` when the model is conditional and labels are given."""
    return _sampling_eps(*self._eps_settings(), params, x, t, cond)

  def check_labels(self, labels, num_samples: int):
    """The labels of ``num_samples`` samples of the run's model, checked before sampling:
    none for an unconditional model; for a conditional one None (unconditional samples,
    through the null class) or one int class in 0..num_classes-1 per sample (a list is
    taken). Raises ValueError naming what is wrong (they went into the network unchecked:
    a class past the last gave NaN samples, -1 the null class, an unconditional model
    ignored them)."""
    if labels is None:
      return None
    if not self.config.model.conditional:
      raise ValueError('labels given to an unconditional model (model.conditional=False) '
                       'would be ignored; pass None.')
    host = labels if isinstance(labels, jax.Array) else np.asarray(labels)
    if host.shape != (num_samples,) or not jnp.issubdtype(host.dtype, jnp.integer):
      raise ValueError(f'labels must be one int class per sample, shape ({num_samples},); got '
                       f'{host.dtype.name} of shape {host.shape}.')
    if not isinstance(host, jax.Array) or host.is_fully_addressable:
      values = np.asarray(host)
      if bad := sorted({int(c) for c in values if not 0 <= c < self.num_classes}):
        raise ValueError(f'labels {bad[:5]} are not classes of this model (0..'
                         f'{self.num_classes - 1}); pass None for unconditional samples.')
    return labels if isinstance(labels, jax.Array) else jnp.asarray(host, jnp.int32)

  def sampler(self, eps_fn=None, **overrides) -> Sampler:
    """The run's sampler (``config.sample``; ``overrides`` of ``Sampler``'s arguments) over
    ``eps_fn`` (default: ``self.eps_fn`` with the config's settings of now; e.g.
    ``guidance.composed_eps_fn(self.model, self.num_classes)`` for AND/NOT compositions of a
    conditional model's classes)."""
    sc = self.config.sample
    if 'clip' not in overrides:
      config_lib.check_sample_clip(sc, self.data_reach)
    kw = dict(sampler=sc.sampler, num_steps=sc.num_steps, eta=sc.eta,
              clip=sc.clip or None, mesh=self.mesh, cpu_onednn=sc.get('cpu_onednn', True))
    kw.update(overrides)
    if eps_fn is not None:
      return Sampler(eps_fn, self.model.schedule, self.image_shape, **kw)
    # The run's eps: one Sampler per setting (its programs are compiled per batch size on
    # first use; the samplers' oneDNN programs are not in the persistent cache, so a new
    # Sampler per sample grid compiled them again every time). The eps settings are bound
    # here, not read from the config when a batch size is first traced.
    settings = self._eps_settings()
    key = (settings, *sorted(kw.items()))
    if key not in self._samplers:
      self._samplers[key] = Sampler(functools.partial(_sampling_eps, *settings),
                                    self.model.schedule, self.image_shape,
                                    check_cond=self.check_labels, **kw)
    return self._samplers[key]

  @functools.cached_property
  def data_reach(self) -> float:
    """The largest absolute value of the training data (1 for images stored as uint8)."""
    images = self.dataset.images
    return 1.0 if images.dtype == np.uint8 else float(np.abs(images).max(initial=0.0))

  @functools.cached_property
  def sample_classes(self) -> np.ndarray:
    """The classes a conditional model's samples cycle over: those it was trained on (all
    of the data's, unless ``data.keep_classes`` / ``drop_classes`` removed some)."""
    return np.unique(self.dataset.labels[self.train_idx])

  def sample_labels(self, n: int, offset: int = 0, classes=None):
    """Labels of samples ``offset .. offset + n - 1`` of a class-balanced sequence
    (sample i gets the (i mod K)-th of the K ``classes``, by default the
    ``sample_classes``: class i mod C when every class was trained); None for an
    unconditional model."""
    if not self.config.model.conditional:
      return None
    classes = jnp.asarray(self.sample_classes if classes is None else classes, jnp.int32)
    return classes[(offset + jnp.arange(n, dtype=jnp.int32)) % len(classes)]


def validate(config, check_paths: bool = True) -> None:
  """Every check of a training config, before any work: the core's fields
  (``config.validate``), then its method's (``methods.validate``). Raises ``ConfigError``.
  ``check_paths=False``: not that the paths training reads exist (``data.data_dir``, the
  runs it starts from or takes thresholds from: ``train.init_from``,
  ``method.reference_workdir``)."""
  config_lib.validate(config, check_paths)
  methods_lib.validate(config, check_paths)


def check_workdir(workdir: str) -> None:
  """A workdir a run can write: a folder, new or holding a run (``ConfigError`` otherwise)."""
  if '://' in workdir:  # a remote file system: left to it
    return
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise config_lib.ConfigError(f'workdir {workdir}: {existing} is a file; give a folder '
                                 '(new, or holding a run).')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise config_lib.ConfigError(f'workdir {workdir}: {existing} is not writable; give a '
                                 'folder you can write to.')


def build(config, dataset: sources.ArrayDataset | None = None,
          fit_devices: bool = False, from_checkpoint: bool = False) -> Experiment:
  """Validates the config and builds everything but the state (``init_state``).
  ``fit_devices`` (to sample or evaluate a trained run, not to train it): with
  ``train.num_devices=0`` the mesh takes as many of the devices as divide every part of the
  run's batch, instead of refusing a device count the run was not trained on.
  ``from_checkpoint``: the state will come from the run's checkpoint, which holds what the
  method measures before training (the constrained method's thresholds, a TIW
  discriminator's first phase, in ``state.extras``) and the trained parameters, so none of
  that is redone (the method's ``prepare`` / ``for_restore``) and ``train.init_from`` is not
  read: a run loads without its reference or pre-trained run."""
  validate(config, check_paths=not from_checkpoint)
  if dataset is None:
    dataset = load_training_data(config.data)
    if config.eval.enabled and not from_checkpoint:
      sources.check_held_out(config.data)
  config_lib.check_image_shape(config.model, dataset.image_shape)
  idx = train_indices(config.data, dataset)
  model = build_score_model(config, dataset.num_classes)
  tx, lr_fn = optim.make_optimizer(config.optim, config.train.steps)
  method = methods_lib.build(config, model, dataset.num_classes, lr_fn)
  if from_checkpoint and hasattr(method, 'for_restore'):
    method = method.for_restore()
  groups = method.data_groups(dataset, idx)
  try:  # Device count, batch sizes and data groups that do not fit: one line, no traceback.
    num_devices = config.train.num_devices or None
    if fit_devices and num_devices is None:
      parts = math.gcd(*[b for _, _, b in groups])
      num_devices = max(d for d in range(1, jax.device_count() + 1) if parts % d == 0)
    mesh = parallel.make_mesh(num_devices)
    for name, _, b in groups:
      parallel.check_batch_size(b, mesh, f"the {name!r} part of the batch (config.train."
                                "batch_size, or the method's *_batch fields or TIW's "
                                "ref_batch_fraction), size")
    batcher = pipeline.GroupedBatcher(
        dataset, [g[1] for g in groups], [g[2] for g in groups], config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        group_names=[g[0] for g in groups])
  except config_lib.ConfigError:
    raise
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from e
  if hasattr(method, 'prepare') and not from_checkpoint:  # e.g. thresholds from a reference
    method = method.prepare(config, model, batcher, mesh)
  step = train_step_lib.make_train_step(method, tx, lr_fn, config.train.ema_decay, mesh,
                                        config.train.steps_per_call,
                                        config.train.get('debug_nan_step', -1))
  return Experiment(config, dataset, idx, model, method, tx, lr_fn, mesh, batcher, step,
                    from_checkpoint)


def fit(exp: Experiment, state: TrainState, until: int | None = None,
        progress: bool = False) -> tuple[TrainState, list[dict]]:
  """Runs the jitted step from ``state.step`` to ``until`` (default: config.train.steps)
  without any I/O; returns the state and the per-call metrics on the host. For notebooks,
  tests and experiments that manage their own outputs."""
  until = exp.config.train.steps if until is None else until
  k = exp.config.train.steps_per_call
  start = int(state.step)
  history = []
  batches = exp.batcher.iterate(start, k)
  try:
    for _ in tqdm(range(start, until, k), desc='training', disable=not progress, leave=False):
      batch = parallel.put_batch(next(batches), exp.mesh, leading_axes=0 if k == 1 else 1)
      state, metrics = exp.step(state, batch)
      history.append(metrics)
  finally:
    batches.close()
  return state, jax.device_get(history)


def _summarize(metric_list: list[dict], steps_per_call: int = 1) -> dict:
  """Mean over the steps since the last log. With k steps per call every metric carries a
  leading axis of k, which is flattened into the steps axis (vector metrics such as the
  per-constraint multipliers keep their own axis)."""
  host = jax.device_get(metric_list)
  steps = {}
  for key in host[0]:
    values = np.stack([np.asarray(m[key]) for m in host])
    steps[key] = values.reshape((-1,) + values.shape[2:]) if steps_per_call > 1 else values
  # Steps skipped as non-finite (train.on_nonfinite='skip') changed nothing: the other
  # metrics are means over the steps that did (all steps if none did).
  ok = steps['nonfinite'] == 0 if 'nonfinite' in steps else None
  if ok is not None and not ok.any():
    ok = None
  return {key: values.sum(0) if key == 'nonfinite'
          else values.mean(0) if ok is None else values[ok].mean(0)
          for key, values in steps.items()}


def small_extras(extras: dict) -> dict:
  """The method state's arrays of up to 64 numbers, as lists (the constrained method's
  multipliers, thresholds and counters; not a discriminator's parameters)."""
  return {key: value.tolist() for key, value in jax.device_get(extras).items()
          if isinstance(value, (np.ndarray, np.generic)) and value.ndim <= 1 and value.size <= 64}


_LOWER_LR = "Lower optim.lr or set train.on_nonfinite='skip' to skip such steps."


def _first_nonfinite(metric_list: list[dict], first_step: int, k: int,
                    step_size_fields: tuple[str, ...] = ()) -> tuple[str, str]:
  """(where, fix) for the first non-finite step of ``metric_list`` (calls of ``k`` steps):
  the step and what was not finite, and the config fields to change. A finite loss and
  gradient with a non-finite update or method state points at the optimizer's constants
  or the method's own step sizes (``step_size_fields``, e.g. the dual ascent's), and names
  the method's logged figures that are not finite (the multipliers ``lam``)."""
  at = lambda value, j: np.asarray(value)[j] if k > 1 else np.asarray(value)
  for i, m in enumerate(jax.device_get(metric_list)):
    bad = np.atleast_1d(np.asarray(m['nonfinite']))
    if not bad.any():
      continue
    j = int(np.argmax(bad))
    step = first_step + i * k + j
    loss, gnorm = at(m['loss'], j), at(m['grad_norm'], j)
    if not (np.isfinite(loss) and np.isfinite(gnorm)):
      what = 'loss' if not np.isfinite(loss) else 'grad_norm'
      return f'step {step}: {what} is not finite (loss={loss}, grad_norm={gnorm})', _LOWER_LR
    fields = ' or '.join(f'config.{f}' for f in step_size_fields)
    lower = f'Lower {fields}.' if fields else "Lower the method's step sizes."
    state = sorted(key for key, value in m.items()
                   if key not in ('loss', 'grad_norm', 'nonfinite')
                   and np.issubdtype(np.asarray(value).dtype, np.inexact)
                   and not np.isfinite(at(value, j)).all())
    if state:
      return (f'step {step}: the method\'s {", ".join(state)} '
              f'{"is" if len(state) == 1 else "are"} not finite although loss ({loss}) and '
              f'grad_norm ({gnorm}) are',
              lower)
    return (f'step {step}: the parameter update or the method\'s state is not finite although '
            f'loss ({loss}) and grad_norm ({gnorm}) are',
            'Check optim.eps, optim.b1, optim.b2' + (f' and {fields}' if fields else '')
            + " or set train.on_nonfinite='skip' to skip such steps.")
  return 'unknown step', _LOWER_LR


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in ``workdir`` was launched with (its ``config.json``)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{workdir} holds no config.json: not the workdir of a run.')
  with open(path) as f:  # JSON turned the config's tuples into lists
    as_tuples = lambda v: (tuple(map(as_tuples, v)) if isinstance(v, list) else
                           {k: as_tuples(x) for k, x in v.items()} if isinstance(v, dict)
                           else v)
    return ml_collections.ConfigDict(as_tuples(json.load(f)))


# A run trained on a dataset built in memory (``train_and_evaluate(dataset=...,
# save_dataset=True)``, e.g. the fine-tuning experiment's new images + q_pre samples) keeps
# it here, so that ``load_run`` can build the run again.
TRAINING_DATA = 'training_data.npz'
PENDING_METRICS = 'pending_metrics.npz'   # a stopped run's metrics since its last record


def _save_pending(path: str, step: int, since: int, seconds: float, pending: list[dict],
                  k: int) -> None:
  """The metrics of the calls (``k`` steps each) since the last record (``since``) of a run
  stopped at ``step``, stacked per metric (their own dtypes), and their training time."""
  host = jax.device_get(pending)
  writers.save_arrays_atomic(path, _step=np.int64(step), _since=np.int64(since), _k=np.int64(k),
                             _seconds=np.float64(seconds),
                             **{key: np.stack([np.asarray(m[key]) for m in host])
                                for key in host[0]})


def _load_pending(path: str, start: int, k: int) -> tuple[list[dict], int, float]:
  """(pending metrics, the step they start at, their training time) for a run that starts
  at ``start`` with ``k`` steps per call: those saved by the run that stopped at that step
  (regrouped into calls of ``k`` steps if it ran calls of another length), else none."""
  if not (jax.process_index() == 0 and os.path.exists(path)):
    return [], start, 0.0
  with np.load(path) as f:
    if int(f['_step']) != start:  # from another stop: the records cover those steps
      return [], start, 0.0
    saved_k = int(f['_k'])
    keys = [key for key in f.files if not key.startswith('_')]
    # One row per step (a call of saved_k > 1 steps carries a leading axis of saved_k).
    steps = {key: f[key].reshape((-1,) + f[key].shape[2:]) if saved_k > 1 else f[key]
             for key in keys}
    since, seconds = int(f['_since']), float(f['_seconds'])
  if (start - since) % k:  # a record step of an earlier invocation's intervals
    print(f'WARNING: the metrics of steps {since + 1}-{start}, saved at the stop, do not '
          f'make whole calls of train.steps_per_call={k} steps: they are left out of the '
          'records.', file=sys.stderr)
    return [], start, 0.0
  calls = (start - since) // k
  if k > 1:
    steps = {key: v.reshape((calls, k) + v.shape[1:]) for key, v in steps.items()}
  return [{key: steps[key][i] for key in keys} for i in range(calls)], since, seconds


def save_training_data(workdir: str, dataset: sources.ArrayDataset) -> None:
  """Writes ``dataset`` (whole or not at all) as the run's ``TRAINING_DATA``."""
  writers.save_arrays_atomic(os.path.join(workdir, TRAINING_DATA), **dataset.arrays())


def load_run(workdir: str, dataset: sources.ArrayDataset | None = None, config=None
             ) -> tuple[Experiment, TrainState]:
  """A run back from its workdir: the ``Experiment`` its ``config.json`` builds (or
  ``config``, which its checkpoint must fit), and the training state of its newest
  checkpoint, placed on this process's devices. E.g. more samples from a finished run::

      exp, state = train.load_run('runs/demo/constrained')
      images = exp.sampler()(state.ema_params, jax.random.key(0), 16, exp.sample_labels(16))

  The run's data must be readable, as for training, unless the run saved the dataset it was
  trained on (``TRAINING_DATA``; or pass ``dataset``); a constrained run's reference run
  and the run it was fine-tuned from need not be (the checkpoint holds the thresholds and
  the parameters). The mesh takes the devices here that divide the run's batch (``build``'s
  ``fit_devices``).
  """
  config = load_config(workdir) if config is None else config
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if not (os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))):
    raise FileNotFoundError(no_checkpoint_message(workdir))  # before building anything
  saved = os.path.join(workdir, TRAINING_DATA)
  if (dataset is None and not os.path.exists(saved) and 'finetune' in config
      and config.method.get('constraint_source') == 'source'):
    raise config_lib.ConfigError(
        f'{workdir} is a fine-tuning arm trained before arms kept their data '
        f'({TRAINING_DATA}): rerun its experiments.finetune command once (it reuses the '
        'finished arms and writes their data), then load it.')
  if dataset is None and os.path.exists(saved):
    with np.load(saved) as f:
      dataset = sources.ArrayDataset.from_arrays(f)
  exp = build(config, dataset, fit_devices=True, from_checkpoint=True)
  ckpt = checkpoint_lib.Checkpointer(ckpt_dir)
  try:
    state, _ = ckpt.restore_latest(exp.init_state(), config)
  finally:
    ckpt.close()
  if state is None:
    raise FileNotFoundError(no_checkpoint_message(workdir))
  return exp, state


def no_checkpoint_message(workdir: str) -> str:
  """Why the run in ``workdir`` has no checkpoint, and what to do: wait for a run that is
  training there (its ``.lock`` names a live process of this host), or run it again."""
  holder, live = _WorkdirLock.last_holder(workdir)
  if live:
    return (f'{workdir} holds no checkpoint yet; its run ({holder}) is training: wait for its '
            'first checkpoint (train.checkpoint_every).')
  if live is False:
    return (f'{workdir} holds no checkpoint: its run stopped before its first one; run its '
            'training command again (it starts from step 0).')
  return (f'{workdir} holds no checkpoint yet: wait for its run\'s first checkpoint '
          '(train.checkpoint_every), or run it again if it has stopped.')


def save_samples(exp: Experiment, state: TrainState, path: str, num: int | None = None,
                 progress: bool = False, rng=None, sampler: Sampler | None = None) -> np.ndarray:
  n = num or exp.config.sample.num_samples
  n = -(-n // exp.mesh.devices.size) * exp.mesh.devices.size
  params = state.ema_params if exp.config.sample.use_ema else state.params
  sampler = sampler or exp.sampler()
  rng = jax.random.key(exp.config.seed + 1) if rng is None else rng
  images = np.asarray(parallel.to_host(sampler(params, rng, n, exp.sample_labels(n),
                                               progress=progress)))
  if jax.process_index() == 0 and images.ndim == 4:
    ncols = len(exp.sample_classes) if exp.config.model.conditional else None
    writers.save_image_grid(path, images, ncols=ncols)
  elif jax.process_index() == 0:  # vectors (model.name='mlp'): the array, and 2-D as points
    writers.save_arrays_atomic(os.path.splitext(path)[0] + '.npy', images)
    if images.ndim == 2 and images.shape[1] == 2:
      fig, ax = writers.new_figure(figsize=(4, 4))
      ax.scatter(images[:, 0], images[:, 1], s=2)
      ax.set_aspect('equal')
      writers.save_figure(fig, path)
  return images


def plot_run_curves(workdir: str, records: list[dict], config,
                    constraint_names: Sequence[str] | None = None) -> None:
  """A run's curves from its metrics records: ``loss.png``; a constrained run's
  ``lambda.png`` and ``constraints.png`` (its gaps L_i - b_i), or for its unconstrained arm
  (``method.enabled=False``: no thresholds, lambda fixed at 0) the constraint losses alone
  in ``constraints.png``."""
  labels = None
  if any('objective_loss' in r for r in records):
    # A constrained run's ``loss`` is the lambda-weighted mean its step descends, which falls
    # when lambda rises and the constraint losses are the smaller ones: its objective L_0 is
    # drawn beside it.
    labels = {'objective_loss': 'objective L_0',
              'loss': ('loss (L_0 + sum lam_i L_i) / (1 + sum lam_i)'
                       if config.method.get('normalize', True) else 'loss L_0 + sum lam_i L_i')}
  writers.plot_curves(os.path.join(workdir, 'loss.png'), records, ['loss', 'objective_loss'],
                      'training loss', yscale='log', labels=labels)
  if not any('lam' in r for r in records):
    return
  path = os.path.join(workdir, 'constraints.png')
  if not config.method.get('enabled', True):
    writers.plot_curves(path, records, ['constraint_loss'],
                        'constraint losses L_i (disabled: no thresholds, lambda = 0)',
                        entry_names=constraint_names, yscale='log')
    return
  writers.plot_curves(os.path.join(workdir, 'lambda.png'), records, ['lam'],
                      'dual variables lambda (mean of each logging interval)',
                      entry_names=constraint_names)
  writers.plot_curves(path, records, ['constraint_gap'],
                      'L_i - b_i (constraint gap, <= 0 is satisfied)',
                      entry_names=constraint_names, yscale='symlog', zero_line=True)


def train_and_evaluate(config, workdir: str, dataset: sources.ArrayDataset | None = None,
                       progress: bool = True, hooks: dict | None = None,
                       save_dataset: bool = False) -> dict:
  """Trains (resuming from ``workdir`` if it holds a checkpoint), samples, and returns a
  summary dict; everything a run produces is written under ``workdir``.

  ``dataset``: train on it instead of ``config.data``'s training set; with
  ``save_dataset`` it is also written to the workdir (``TRAINING_DATA``), so that
  ``load_run`` and ``python -m cdiff_jax.sample`` can build the run again without it.

  Faults: SIGTERM or Ctrl-C saves a checkpoint at the next step boundary and raises
  ``Preempted``; a non-finite step raises ``NonFiniteError``
  (``train.on_nonfinite='stop'``) without saving the state it left. Nothing is written to
  ``workdir`` before the config, the data and an existing checkpoint have been checked.
  Multi-process: every process calls this; only process 0 writes files other than
  checkpoints.
  """
  clock = _RunClock(workdir)
  validate(config)  # Before setup: a wrong parallel.* must not start a cluster.
  check_workdir(workdir)
  setup_jax(config)
  lock = _WorkdirLock(workdir)
  try:
    with _PreemptionWatch(config.train.steps_per_call) as preemption:
      return _train_and_evaluate(config, workdir, dataset, progress, hooks, preemption, lock,
                                 clock, save_dataset and dataset is not None)
  finally:
    try:
      clock.record()  # An interrupted or failed invocation's time counts too.
    except OSError as e:  # (a full disk): the run's own error, if any, is the one to see
      print(f'WARNING: could not record the run time in {clock.path}: {e}', file=sys.stderr)
    finally:
      lock.release()


def _has_checkpoint(ckpt_dir: str) -> bool:
  """A finished step folder (Orbax renames a complete one to its step number)."""
  return os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir))


def _train_and_evaluate(config, workdir, dataset, progress, hooks, preemption, lock,
                        clock, save_dataset) -> dict:
  tc = config.train
  workdir = os.path.abspath(workdir)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  # A resumed run takes what its method measures before training (a TIW discriminator's
  # pre-training, the thresholds from a reference) from its checkpoint: not redone.
  resuming = _has_checkpoint(ckpt_dir)
  exp = build(config, dataset, from_checkpoint=resuming)
  config_lib.check_sample_clip(config.sample, exp.data_reach)  # before training, not at its end
  is_main = parallel.is_main_process()
  state = exp.init_state()
  parallel.barrier('initialized')  # Orbax's first collective must not wait long for a peer.
  ckpt = checkpoint_lib.Checkpointer(ckpt_dir, tc.keep_checkpoints)
  def check_step(step):  # a checkpoint step this config can resume from
    if step is not None and step % tc.steps_per_call:
      raise config_lib.ConfigError(f'config.train.steps_per_call={tc.steps_per_call}: the '
                                   f'checkpoint is at step {step}; use a divisor of it.')
    if step is not None and step > tc.steps:  # records of train.steps, a state past it
      raise config_lib.ConfigError(f'config.train.steps={tc.steps}: the checkpoint in '
                                   f'{ckpt_dir} is at step {step}, past it; set '
                                   f'train.steps >= {step} or use a new --workdir.')

  try:  # Refuses an incompatible checkpoint before anything is written.
    check_step(ckpt.latest_step())
    restored, restored_step = ckpt.restore_latest(state, config, resume=True)
    check_step(restored_step)  # older than the newest where that one was unreadable
  except BaseException:
    ckpt.close()
    raise
  if restored is not None:
    state = restored
  elif resuming:  # no step after all (e.g. a folder named as one): the whole set-up
    exp = build(config, dataset)
    state = exp.init_state()
  try:  # The checks have passed: the first write.
    lock.acquire()
  except BaseException:
    ckpt.close()
    raise
  # From the first write on (config.json, the records), Ctrl-C saves at the next step
  # boundary; before it, nothing new exists and Ctrl-C stops at once.
  preemption.training = True
  if restored is not None and is_main:
    print(f'Resumed from step {restored_step} ({ckpt_dir}).')
  start = int(state.step)
  if is_main:
    clock.start()
    # A finished run run again (say to evaluate it anew) is unfinished until it ends again:
    # its old summary must not vouch for the config written now or for half-written outputs.
    if os.path.exists(summary_path := os.path.join(workdir, 'summary.json')):
      os.remove(summary_path)
    os.makedirs(os.path.join(workdir, 'samples'), exist_ok=True)
    writers.write_atomic(os.path.join(workdir, 'config.json'),
                         config.to_json_best_effort(indent=2, sort_keys=True))
    if save_dataset:
      save_training_data(workdir, dataset)
  writer = writers.MetricWriter(workdir, active=is_main, resume_step=start)
  writer.drop_after(start)  # Steps logged after the checkpoint by a killed run.
  if is_main and start == 0:
    print(f'{config_lib.method_label(config)}: {num_params(state.params):,} parameters, '
          f'{len(exp.train_idx)} training examples, global batch '
          f'{exp.batcher.global_batch_size}, {exp.mesh.devices.size} device(s); workdir {workdir}')
    b = exp.batcher
    if len(b.groups) > 1 or len(b.groups[0]) != len(exp.train_idx):  # what is really drawn
      print('batch groups: ' + ', '.join(f'{name} {len(g):,} examples ({bs} per batch)'
                                         for name, g, bs in zip(b.group_names, b.groups,
                                                                b.batch_sizes)))

  k = tc.steps_per_call
  # A run stopped inside a logging interval carries the interval's metrics to its rerun
  # (saved with the checkpoint), so the rerun logs the records of an uninterrupted run.
  pending, pending_start, carried_seconds = _load_pending(
      os.path.join(workdir, PENDING_METRICS), start, k)
  # (Steps the carried metrics cover were never recorded, and need not be.)
  if is_main and pending_start and not os.path.exists(os.path.join(workdir, 'metrics.jsonl')):
    print(f'WARNING: {workdir}/metrics.jsonl is missing: the records of the steps before '
          f'{pending_start} are lost, and the curves and final figures start there.',
          file=sys.stderr)
  # (The interval's throughput: its steps over its training time in both invocations.)
  t_last, step_last = time.perf_counter() - carried_seconds, pending_start
  last_saved = restored_step
  bar = tqdm(total=tc.steps, initial=start, desc='training', disable=not (progress and is_main),
             dynamic_ncols=True)
  batches = exp.batcher.iterate(start, k)

  def flush(step_now: int, record: bool = True):
    """Writes the metrics record of the steps since the last one; ``record=False`` (a stop
    inside an interval) only checks them, and they stay pending."""
    nonlocal pending, pending_start, t_last, step_last
    if not pending:
      return None
    summary = _summarize(pending, k)
    if summary['nonfinite'] > 0:
      where, fix = _first_nonfinite(pending, pending_start, k,
                                    getattr(exp.method, 'step_size_fields', ()))
      if tc.on_nonfinite == 'stop':
        ckpt.wait()
        good = ckpt.latest_step()
        kept = (f'the last good checkpoint is step {good} in {ckpt.directory}' if good is not None
                else 'no checkpoint had been written yet')
        raise NonFiniteError(
            f'{where}. The state was not updated by that step and was not saved; {kept}. '
            + fix)
      if is_main and record:
        tqdm.write(f'Skipped non-finite step(s): {where}')
    if not record:
      return None
    now = time.perf_counter()
    summary['images_per_sec'] = (step_now - step_last) * exp.batcher.global_batch_size / max(now - t_last, 1e-9)
    t_last, step_last = now, step_now
    writer.write(step_now, summary)
    if hasattr(exp.method, 'host_metrics'):
      for warning in exp.method.host_metrics(summary, step_now):
        if is_main:
          tqdm.write(f'WARNING: {warning}')
    pending, pending_start = [], step_now
    bar.set_postfix(loss=f"{float(summary['loss']):.4f}")
    return summary

  try:
    for step_now in range(start, tc.steps, k):
      batch = parallel.put_batch(next(batches), exp.mesh, leading_axes=0 if k == 1 else 1)
      if step_now == start and jax.process_count() > 1:
        exp.step.lower(state, batch).compile()  # At each process's own speed, then meet.
        parallel.barrier('step_compiled')
      state, metrics = exp.step(state, batch)
      pending.append(metrics)
      done = step_now + k
      bar.update(k)
      if done % tc.log_every == 0 or done == tc.steps:
        flush(done)
      # images_per_sec counts training only: the clock restarts after a checkpoint write
      # (the steps before it were flushed) and stops while samples are drawn.
      if tc.checkpoint_every and done % tc.checkpoint_every == 0 and done != tc.steps:
        flush(done)
        ckpt.save(done, state, config)
        last_saved = done
        clock.record(final=False)
        t_last = time.perf_counter()
      if tc.sample_every and done % tc.sample_every == 0 and done != tc.steps:
        jax.block_until_ready(state)
        paused = time.perf_counter()
        save_samples(exp, state, os.path.join(workdir, 'samples', f'step_{done:07d}.png'))
        t_last += time.perf_counter() - paused
      if done != tc.steps and preemption.should_stop(done):
        flush(done, record=False)  # Raises instead of saving if a pending step was not finite.
        if is_main and pending:
          _save_pending(os.path.join(workdir, PENDING_METRICS), done, pending_start,
                        time.perf_counter() - t_last, pending, k)
        if last_saved != done:
          ckpt.save(done, state, config)
        ckpt.wait()
        raise preemption.stopped(done, ckpt.directory)
    flush(tc.steps)
    if last_saved != tc.steps and int(state.step) == tc.steps:
      ckpt.save(tc.steps, state, config)
    if preemption.should_stop(tc.steps):  # Arrived during the last step: skip sampling.
      ckpt.wait()
      raise preemption.stopped(int(state.step), ckpt.directory)
  finally:
    bar.close()
    batches.close()
    ckpt.close()
    writer.close()
  # From here on the final checkpoint is complete: a SIGTERM or Ctrl-C ends the run at once
  # (SIGTERM as a preemption: a rerun redoes only what follows).
  if preemption.finishing(int(state.step), ckpt.directory):
    raise preemption.stopped(int(state.step), ckpt.directory)

  result = {'workdir': workdir, 'final_step': int(state.step)}
  # The metrics records hold means over a logging interval, not the values at the end.
  result['final_extras'] = small_extras(state.extras)
  records = writers.read_metrics(workdir)
  if is_main:
    plot_run_curves(workdir, records, config, getattr(exp.method, 'constraint_names', None))
  samples = save_samples(exp, state, os.path.join(workdir, 'samples', 'final.png'),
                         progress=progress and is_main)
  result['samples_png'] = os.path.join(workdir, 'samples', 'final.png')
  if config.eval.enabled:
    from cdiff_jax import evaluation  # Local: loads the classifier only when asked.
    result['eval'] = evaluation.evaluate_run(exp, state, workdir, progress=progress and is_main)
  for name, hook in (hooks or {}).items():
    result[name] = hook(exp, state, workdir, samples)
  if records:
    result['final_metrics'] = {k: v for k, v in records[-1].items() if k != 'step'}
  # Wall time of the whole run, every invocation (set-up, compiles, training, sampling,
  # evaluation and hooks); process 0's count.
  result['seconds'] = clock.record()
  if is_main:
    # Whole or not at all: SIGTERM here raises Preempted wherever it lands (``finishing``).
    writers.write_atomic(os.path.join(workdir, 'summary.json'),
                         json.dumps(result, indent=2, default=str))
  # The other processes return once process 0 has written: what comes next may read the
  # run as finished (an experiment's next arm takes this one as its reference run).
  parallel.barrier('run_written')
  result['state'] = state
  result['experiment'] = exp
  return result
