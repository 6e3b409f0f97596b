"""Device mesh, shardings, multi-host setup and global batch assembly for data parallelism.

One mesh axis, ``data``. Parameters and the rest of the train state are replicated; the
leading (example) axis of every batch is sharded. Under ``jax.jit`` the gradient mean
over the global batch is computed by XLA's collectives, so no explicit ``pmean`` appears
anywhere.

Multi-host (several processes, e.g. one per GPU host or TPU VM worker): every process
runs the same program. ``initialize_distributed`` connects them (``config.parallel``),
the mesh spans the devices of all processes ordered by process, every process builds
only its contiguous slice of the global batch and ``make_array_from_process_local_data``
assembles the global array, so the global batch (and hence the result) is the same as on
one host with the same number of devices.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


class DistributedSetupError(RuntimeError):
  """``jax.distributed.initialize`` failed (coordinator unreachable, wrong process id, ...)."""


def distributed_requested(parallel_config) -> bool:
  """True when ``config.parallel.distributed`` is set or the environment names a
  coordinator (``JAX_COORDINATOR_ADDRESS``, as cluster launch scripts do)."""
  if parallel_config is None:
    return False
  return bool(parallel_config.distributed) or bool(os.environ.get('JAX_COORDINATOR_ADDRESS'))


def initialize_distributed(parallel_config) -> bool:
  """Calls ``jax.distributed.initialize`` once, before anything touches a device.

  Fields left empty (``coordinator_address=''``, ``num_processes=0``, ``process_id=-1``)
  come from the environment: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID``, else JAX's cluster detection (TPU VM pods, SLURM, Open MPI,
  Kubernetes). Returns whether this is a multi-process run.
  """
  if not distributed_requested(parallel_config):
    return False
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  pc = parallel_config
  kwargs = {}
  address = pc.coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS', '')
  num = pc.num_processes or int(os.environ.get('JAX_NUM_PROCESSES', '0') or 0)
  pid = pc.process_id if pc.process_id >= 0 else int(os.environ.get('JAX_PROCESS_ID', '-1') or -1)
  if address:
    kwargs['coordinator_address'] = address
  if num:
    kwargs['num_processes'] = num
  if pid >= 0:
    kwargs['process_id'] = pid
  if pc.get('cpu_collectives'):
    # CPU-only clusters (and the tests' local processes) need a cross-process
    # collectives implementation; GPUs and TPUs bring their own.
    jax.config.update('jax_cpu_collectives_implementation', pc.cpu_collectives)
  try:
    jax.distributed.initialize(initialization_timeout=int(pc.initialization_timeout), **kwargs)
  except Exception as e:  # Connection refused, timeout, missing fields, ...
    detail = ' '.join(str(e).split())[:300]
    raise DistributedSetupError(
        f'jax.distributed.initialize({", ".join(f"{k}={v!r}" for k, v in kwargs.items())}) '
        f'failed: {detail}. Set config.parallel.coordinator_address (host:port of process 0), '
        'num_processes and process_id, or launch through a cluster JAX detects.') from e
  return jax.process_count() > 1


# XLA:CPU options the project turns on by default (``config.train.xla_cpu_flags``): only
# dots go to the YNNPACK library. By default jaxlib 0.12 also sends convolutions and
# reductions there, and its convolutions (weight gradients above all) are slower than XLA's
# own. Measured by benchmarks/xla_flags.py: the train step 1.2-1.45x faster on CPU; results
# equal up to float32 rounding (summation order) (benchmarks/README.md).
# XLA:GPU/TPU ignore it. config.base_config() uses this value.
DEFAULT_XLA_CPU_FLAGS = '--xla_cpu_experimental_ynn_fusion_type=dot'
# jaxlib versions (major, minor) the default was tested with: XLA aborts on an option it
# does not know, so with other versions the default is skipped (explicit flags still apply).
_DEFAULT_FLAGS_TESTED = ((0, 12),)


def jaxlib_tested() -> bool:
  """Whether this jaxlib's (major, minor) version is one the XLA:CPU defaults were tested on."""
  import jaxlib
  return tuple(int(v) for v in jaxlib.__version__.split('.')[:2]) in _DEFAULT_FLAGS_TESTED


def _backends_initialized() -> bool:
  from jax._src import xla_bridge
  check = getattr(xla_bridge, 'backends_are_initialized', None)
  return bool(check()) if check is not None else bool(getattr(xla_bridge, '_backends', {}))


def run_once(fn, *args):
  """``fn(*args)`` as one compiled program built for compile speed, for programs that run
  once (parameter initializers): on CPU XLA's backend optimization is off, which cuts the
  compile of the default UNet's initializer from 16.5 s to 3.0 s (2-core CPU) for the same
  values up to float rounding (1e-7). Other backends compile as usual."""
  lowered = jax.jit(fn).lower(*args)
  options = {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None
  return lowered.compile(compiler_options=options)(*args)


# XLA:CPU compile options for programs that only run the network forward or take input
# gradients (samplers, MCMC): convolutions and large matmuls go to oneDNN, and YNNPACK gets
# only the remaining dots, one by one (with the project's `ynn_fusion_type=dot` it grows
# fusions around a dot that can take in a neighbouring 3x3 convolution, which YNNPACK runs
# slowly). On a 2-core Xeon, 100-step DDIM is 1.43x (28x28 UNet) and 1.51x (8x8) faster than
# with XLA's kernels, and faster than PyTorch's (benchmarks/sampling.py; --inference-onednn 0
# turns it off there); each option alone gives about 1.15x (benchmarks/README.md). Not for
# the train step: XLA's oneDNN path also takes the kernel-gradient convolutions and runs them
# about 2x slower than XLA's own (benchmarks/conv_layers.py). Values are equal up to float32
# rounding. Tested with jaxlib 0.12.
# XLA cannot serialize these executables (the cache write fails), so they are not written to
# the persistent compilation cache and compile in every process (4 s for the 28x28 sampler).
INFERENCE_CPU_OPTIONS = {'xla_cpu_experimental_onednn_custom_call': True,
                         'xla_cpu_experimental_ynn_fusion_type':
                             'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}


def inference_compiler_options(enabled: bool = True) -> dict | None:
  """``compiler_options`` for ``jax.jit`` of a forward-only program: ``INFERENCE_CPU_OPTIONS``
  on CPU with the tested jaxlib when ``enabled``, else None (XLA's defaults)."""
  if not enabled or jax.default_backend() != 'cpu' or not jaxlib_tested():
    return None
  return dict(INFERENCE_CPU_OPTIONS)


def _no_persistent_cache_writes():
  # A thread-local override of jax_persistent_cache_min_compile_time_secs: no compile is
  # slow enough to be written. (Whether the cache is used at all is fixed per process.)
  from jax._src import config as jax_config  # tested jaxlib only (inference_compiler_options)
  return jax_config.persistent_cache_min_compile_time_secs(float('inf'))


def _inside_trace(args, kwargs) -> bool:
  """Whether a call happens while some transformation traces: a traced argument, or (for
  closed-over constants only) JAX's trace state."""
  if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs))):
    return True
  try:
    from jax._src import core  # no public equivalent; tested jaxlib only
    return not core.trace_state_clean()
  except (ImportError, AttributeError):
    return False


class inference_jit:  # noqa: N801 (used like jax.jit)
  """``jax.jit(fn, **jit_kwargs)`` compiled with ``inference_compiler_options(cpu_onednn)``.

  The options are resolved at the first call or ``lower``, so that building a sampler does
  not start the XLA backend before ``configure_xla_cpu`` has run. Programs compiled with the
  options are not written to the persistent compilation cache (``INFERENCE_CPU_OPTIONS``).
  Called inside another trace (a user's ``jax.jit``, ``vmap``, ...), it is a plain
  ``jax.jit``, part of the caller's program: XLA takes compiler options only for a whole
  program."""

  def __init__(self, fn, cpu_onednn: bool = True, **jit_kwargs):
    self._fn, self._onednn, self._kwargs = fn, cpu_onednn, jit_kwargs
    self._jitted, self._options, self._plain = None, None, None

  def _get(self):
    if self._jitted is None:
      self._options = inference_compiler_options(self._onednn)
      self._jitted = jax.jit(self._fn, compiler_options=self._options, **self._kwargs)
    return self._jitted

  def _context(self):
    return _no_persistent_cache_writes() if self._options else contextlib.nullcontext()

  def __call__(self, *args, **kwargs):
    if _inside_trace(args, kwargs):
      if self._plain is None:
        self._plain = jax.jit(self._fn, **self._kwargs)
      return self._plain(*args, **kwargs)
    jitted = self._get()
    with self._context():
      return jitted(*args, **kwargs)

  def lower(self, *args, **kwargs):
    """``jax.jit(...).lower``; ``.compile()`` of the result keeps the options' cache rule."""
    return _Lowered(self._get().lower(*args, **kwargs), self._context)


class _Lowered:
  """A ``jax.stages.Lowered`` whose ``compile`` runs inside ``context()``."""

  def __init__(self, lowered, context):
    self._lowered, self._context = lowered, context

  def compile(self, *args, **kwargs):
    with self._context():
      return self._lowered.compile(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self._lowered, name)


def non_cpu_flags(flags: str) -> list[str]:
  """The entries of ``flags`` that are not XLA:CPU options (``--xla_cpu_...``)."""
  return [f for f in str(flags).split() if not f.startswith('--xla_cpu_')]


_XLA_FLAG_ERROR = re.compile(r'(Unknown flags? in XLA_FLAGS: .*|Illegal value for .*)')
# A value some options cannot parse gives no line of its own, only the usage of the flag.
_XLA_FLAG_USAGE = re.compile(r'Flag parsing failed\.[\s\S]*?^usage: (\S+)', re.M)


def xla_flag_error(stderr: str) -> str | None:
  """XLA's one line on a flag it refused (unknown, or a value it cannot parse) in the
  ``stderr`` of a process that died starting its backend; None if there is none."""
  found = _XLA_FLAG_ERROR.search(stderr)
  if found:
    return found.group(1).strip()
  found = _XLA_FLAG_USAGE.search(stderr)
  return f'cannot parse {found.group(1)}' if found else None


@functools.lru_cache(maxsize=None)
def check_xla_flags(xla_flags: str) -> None:
  """Raises ValueError, in one line, when this jaxlib's XLA refuses ``xla_flags`` (an
  ``XLA_FLAGS`` value). XLA reads its flags once, when the first backend starts, and a flag
  it does not know, or a value it cannot parse, ends the process there with a fatal log
  (and, for a bad value, its 90-line usage). So they are tried first in a short child
  process (about a second) that starts the CPU backend alone."""
  env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS='cpu')
  child = subprocess.run([sys.executable, '-c', 'import jax; jax.devices("cpu")'], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  if child.returncode == 0:
    return
  import jaxlib
  reason = (xla_flag_error(child.stderr) or
            (child.stderr.strip().splitlines() or ['no output'])[-1])
  raise ValueError(f'XLA (jaxlib {jaxlib.__version__}) refuses XLA_FLAGS={xla_flags!r}: '
                   f'{reason}. Correct the option, or leave it out '
                   "(config.train.xla_cpu_flags='' applies none).")


def configure_xla_cpu(flags: str = DEFAULT_XLA_CPU_FLAGS, environ=None) -> list[str]:
  """Appends XLA:CPU ``flags`` (e.g. ``'--xla_cpu_a=1 --xla_cpu_b=x'``) to ``XLA_FLAGS``
  before the XLA backend starts; returns the flags added. A flag whose option ``XLA_FLAGS``
  already sets is left to the user's value. Once a backend is running, XLA has read its
  flags: nothing is added and a warning says how to set them instead."""
  environ = os.environ if environ is None else environ
  if flags == DEFAULT_XLA_CPU_FLAGS:
    if not jaxlib_tested():
      return []
  current = environ.get('XLA_FLAGS', '')
  present = {f.split('=')[0] for f in current.split()}
  new = [f for f in flags.split() if f.split('=')[0] not in present]
  if non_cpu_flags(' '.join(new)):
    raise ValueError(f'{non_cpu_flags(" ".join(new))} are not XLA:CPU options '
                     '(--xla_cpu_...); put other XLA options in XLA_FLAGS.')
  if not new:
    return []
  if flags != DEFAULT_XLA_CPU_FLAGS:
    check_xla_flags(' '.join([current] + new).strip())
  if environ is os.environ and _backends_initialized():
    import warnings
    warnings.warn(f'XLA:CPU flags {new} not applied: the XLA backend already started. Set '
                  'them in XLA_FLAGS before starting Python, or set up before touching a device.')
    return []
  environ['XLA_FLAGS'] = ' '.join([current] + new).strip()
  return new


def is_main_process() -> bool:
  """Process 0 writes metrics, samples, plots and logs; every process checkpoints."""
  return jax.process_index() == 0


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  # Ordered by process, so each process's devices hold one contiguous block of the
  # batch (the block GroupedBatcher gives it), on any platform.
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  n = num_devices or len(devices)
  if n > len(devices):
    raise ValueError(f'train.num_devices={n}, but {len(devices)} device(s) are visible; set '
                     f'train.num_devices=0 (all of them) or at most {len(devices)}.')
  if jax.process_count() > 1 and n != len(devices):
    raise ValueError(f'train.num_devices={n}: a multi-process run uses all {len(devices)} '
                     'devices of its processes; set train.num_devices=0.')
  # Auto axis types: classic sharding propagation (Explicit mode rejects some reshapes
  # of sharded dimensions that the models do).
  return jax.sharding.Mesh(np.asarray(devices[:n]), (DATA_AXIS,),
                           axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh, leading_axes: int = 0) -> NamedSharding:
  """Sharding of a batch whose example axis comes after ``leading_axes`` other axes
  (1 for the stacked batches of a multi-step call)."""
  return NamedSharding(mesh, P(*([None] * leading_axes), DATA_AXIS))


def check_batch_size(batch_size: int, mesh, what: str = 'batch size'):
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(f'{what} {batch_size} is not divisible by the {n} devices of the mesh; '
                     f'choose a multiple of {n}.')


def put_batch(batch, mesh, leading_axes: int = 0):
  """Host-local numpy batch (this process's slice) -> global sharded jax arrays."""
  sharding = batch_sharding(mesh, leading_axes)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


_barrier_count = 0


def barrier(name: str, timeout_s: int = 1800) -> None:
  """Waits until every process gets here (no-op for one process).

  Processes reach their first collective at different times (imports, initialization and
  compilation run at their own speed) and JAX's CPU collectives give up after ~30 s of
  waiting for a peer; this barrier goes through the coordination service instead, with a
  long timeout. Every process must call the same barriers in the same order.
  """
  global _barrier_count
  if jax.process_count() == 1:
    return
  from orbax.checkpoint import multihost
  _barrier_count += 1
  multihost.get_barrier_sync_fn()(key=f'cdiff_jax_{name}_{_barrier_count}',
                                  timeout_ms=timeout_s * 1000)


def put_replicated(tree, mesh):
  """``tree`` replicated over ``mesh``, in buffers of its own: a train state built from
  arrays held elsewhere (a frozen feature extractor's parameters) is donated to the step,
  and an aliased buffer would be deleted under its other holder (jax places an array
  already on a one-device mesh without a copy)."""
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding, may_alias=False)
  # Each process built its own copy: the same seed and code, but a cache entry that one
  # host lacks (a TIW discriminator, the evaluation classifier) or another host's kernels
  # can make the copies differ, and a replicated array built from unequal copies computes
  # with each process's own. Process 0's values go to every process (one collective).
  from jax.experimental import multihost_utils
  leaves, treedef = jax.tree.flatten(tree)
  is_key = [isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
            for x in leaves]   # typed keys travel as their key data
  host = [np.asarray(jax.random.key_data(x) if k else x) for x, k in zip(leaves, is_key)]
  host = [np.asarray(h) for h in multihost_utils.broadcast_one_to_all(host)]
  # Across processes device_put only takes host values (a process cannot place its
  # local device buffers on another host's devices); each builds the global array from its
  # (now equal) copy, without one collective per leaf as device_put would.
  out = [jax.make_array_from_callback(h.shape, sharding, lambda index, h=h: h[index])
         for h in host]
  out = [jax.random.wrap_key_data(o, impl=jax.random.key_impl(x)) if k else o
         for o, x, k in zip(out, leaves, is_key)]
  return jax.tree.unflatten(treedef, out)


def to_host(tree):
  """jax arrays -> numpy, the same full value on every process: sharded arrays that span
  several processes are gathered (every process must call this)."""
  from jax.experimental import multihost_utils

  def get(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
      return np.asarray(jax.device_get(x))
    barrier('to_host')
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(get, tree)
