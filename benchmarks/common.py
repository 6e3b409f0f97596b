"""Shared pieces of the benchmarks: the models compared, the PyTorch worker, timing, tables.

The PyTorch side runs in ``benchmarks/torch_reference.py``: in this process when ``torch``
is importable here, otherwise in a worker process of another Python (``--torch-python``;
``make bench`` makes one with a CPU build of torch). Either way JAX and PyTorch are timed
in alternation in one run, so a change in the machine's load hits both, and the ratio of
their medians is what the tables report.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # `python benchmarks/x.py` from the repository root
  sys.path.insert(0, ROOT)

# The models of the benchmarks. 'default' is configs/digits_dsm.py unchanged; 'mnist28' is a
# 28x28x1 UNet of 0.92M parameters (3 levels 28/14/7, attention at 7x7), batch 64.
MODELS = {
    'default': dict(overrides={}, image_shape=None),
    'mnist28': dict(overrides={'model.ch': 24, 'model.ch_mult': (1, 2, 2),
                               'model.num_res_blocks': 2, 'model.attn_levels': (2,),
                               'train.batch_size': 64},
                    image_shape=(28, 28, 1)),
}


# Config fields set on every model after its own overrides (``--set FIELD=VALUE``, given to
# ``start``): e.g. ``model.dtype=bfloat16`` or ``train.batch_size=256`` on a GPU.
EXTRA_OVERRIDES: dict = {}


def parse_override(text: str) -> tuple[str, object]:
  """'section.key=value' -> ('section.key', value), the value read as a Python literal
  where it is one (numbers, tuples, booleans), else kept as a string."""
  import ast
  field, sep, value = text.partition('=')
  if not sep or field.count('.') != 1:
    raise argparse.ArgumentTypeError(f'--set {text!r}: expected SECTION.KEY=VALUE, '
                                     'e.g. --set model.dtype=bfloat16')
  try:
    return field, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return field, value


def model_config(name: str, steps_per_call: int = 1):
  from configs import digits_dsm
  config = digits_dsm.get_config()
  for field, value in {**MODELS[name]['overrides'], **EXTRA_OVERRIDES}.items():
    section, key = field.split('.')
    if section not in config or key not in config[section]:
      raise SystemExit(f'--set {field}: the config has no field {field!r}.')
    config[section][key] = value
  return for_timing(config, steps_per_call)


def for_timing(config, steps_per_call: int = 1):
  """``config`` set up to time its step: ``steps_per_call`` steps per call, the steps and
  intervals multiples of it (no sample grids), no persistent compilation cache (cold
  compiles)."""
  config.train.steps_per_call = steps_per_call
  config.train.log_every = config.train.checkpoint_every = steps_per_call
  config.train.sample_every = 0
  config.train.steps = -(-config.train.steps // steps_per_call) * steps_per_call
  config.train.compilation_cache = False
  return config


def synthetic_dataset(image_shape, n: int = 512, seed: int = 0):
  """Random images of the given shape (the step's cost does not depend on the pixels)."""
  from cdiff_jax.data import sources
  rng = np.random.default_rng(seed)
  return sources.ArrayDataset(rng.integers(0, 256, (n,) + tuple(image_shape), dtype=np.uint8),
                              rng.integers(0, 10, n), 10, 'synthetic')


def write_json(path: str, **fields) -> None:
  """Writes a benchmark's results with the machine they ran on; no-op for an empty path."""
  if path:
    with open(path, 'w') as f:
      json.dump(dict(machine=machine(), **fields), f, indent=2)


def first_batch(exp):
  """The run's first (grouped) batch on its devices, stacked when steps_per_call > 1."""
  from cdiff_jax import parallel
  k = exp.config.train.steps_per_call
  host = exp.batcher.batch(0) if k == 1 else exp.batcher.stacked(0, k)
  return parallel.put_batch(host, exp.mesh, 0 if k == 1 else 1)


def build_experiment(name: str, steps_per_call: int = 1):
  from cdiff_jax import train
  shape = MODELS[name]['image_shape']
  dataset = synthetic_dataset(shape) if shape else None
  return train.build(model_config(name, steps_per_call), dataset)


def torch_args(exp, seed: int = 0, params_npz: str = '', channels_last: bool = True) -> dict:
  """The Reference(**args) of the PyTorch side for a cdiff_jax experiment."""
  from cdiff_jax import optim
  c = exp.config
  net = exp.model.net
  model = dict(ch=net.ch, ch_mult=list(net.ch_mult), num_res_blocks=net.num_res_blocks,
               attn_levels=list(net.attn_levels), num_heads=net.num_heads,
               num_groups=net.num_groups, dropout=net.dropout, num_classes=net.num_classes)
  return dict(model=model, image_shape=list(exp.image_shape),
              batch_size=exp.batcher.global_batch_size,
              optim=dict(lr=c.optim.lr, b1=c.optim.b1, b2=c.optim.b2, eps=c.optim.eps,
                         weight_decay=c.optim.weight_decay, grad_clip=c.optim.grad_clip,
                         warmup_steps=c.optim.warmup_steps, total_steps=c.train.steps,
                         lr_schedule=c.optim.lr_schedule,
                         final_lr_fraction=c.optim.get('final_lr_fraction',
                                                         optim.FINAL_LR_FRACTION)),
              ema_decay=c.train.ema_decay,
              diffusion=dict(num_steps=c.diffusion.num_steps, beta_start=c.diffusion.beta_start,
                             beta_end=c.diffusion.beta_end),
              seed=seed, params_npz=params_npz, channels_last=channels_last,
              autocast='bfloat16' if c.model.dtype == 'bfloat16' else '')


def flatten_params(tree, prefix: str = '') -> dict:
  out = {}
  for key, value in tree.items():
    path = f'{prefix}/{key}' if prefix else str(key)
    if hasattr(value, 'items'):
      out.update(flatten_params(value, path))
    else:
      out[path] = np.asarray(value)
  return out


class TorchWorker:
  """Sends requests to torch_reference.Worker, in this process or in a ``--serve`` child."""

  def __init__(self, torch_python: str = '', device: str = 'cpu'):
    self.proc = None
    self.device = device  # where the worker builds its models and runs its matmul
    if torch_python:
      self.proc = subprocess.Popen(
          [torch_python, os.path.join(HERE, 'torch_reference.py'), '--serve'],
          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    else:
      sys.path.insert(0, HERE)
      import torch_reference  # noqa: E402 (only importable when torch is)
      self.worker = torch_reference.Worker()
    self.info = self('info')

  def __call__(self, op: str, **kwargs) -> dict:
    request = dict(op=op, **kwargs)
    if op == 'build':
      request['args'] = dict(request['args'], device=self.device)
    elif op == 'matmul':
      request.setdefault('device', self.device)
    if self.proc is None:
      return self.worker.handle(request)
    self.proc.stdin.write(json.dumps(request) + '\n')
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f'the PyTorch worker exited (request {op!r}); see its stderr above.')
    reply = json.loads(line)
    if 'error' in reply:
      raise RuntimeError(f'PyTorch worker, request {op!r}: {reply["error"]}')
    return reply

  def close(self):
    if self.proc is not None:
      self.proc.stdin.close()
      self.proc.wait(timeout=60)


def open_torch(torch_python: str, device: str = 'cpu') -> TorchWorker | None:
  """The PyTorch worker, or None (with a message) when no PyTorch is available."""
  if not torch_python and importlib.util.find_spec('torch') is None:
    default = os.path.join(ROOT, '.venv-torch', 'bin', 'python')
    if os.path.exists(default):
      torch_python = default
    else:
      print('PyTorch is not importable and no --torch-python was given (make bench creates '
            '.venv-torch): timing JAX alone.', file=sys.stderr)
      return None
  return TorchWorker(torch_python, device)


def check_same_function(exp, params, torch: TorchWorker, n: int = 4) -> tuple[float, float]:
  """Loads the JAX parameters into the PyTorch model and compares the two networks'
  outputs on the same inputs. Returns (max |difference|, max |output|)."""
  import jax
  import jax.numpy as jnp
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape),
                        jax.device_get(params))  # move off the zero init of output convs
  x = np.asarray(jax.random.normal(jax.random.key(0), (n,) + tuple(exp.image_shape)))
  t = np.linspace(0.05, 0.95, n).astype(np.float32)
  out = np.asarray(exp.model.net.apply({'params': params}, jnp.asarray(x), jnp.asarray(t)))
  with tempfile.TemporaryDirectory() as tmp:
    p_path, in_path, out_path = (os.path.join(tmp, f) for f in ('p.npz', 'in.npz', 'out.npy'))
    np.savez(p_path, **flatten_params(params))
    np.savez(in_path, x=x, t=t)
    torch('build', args=torch_args(exp, params_npz=p_path))
    torch('forward', inputs=in_path, output=out_path)
    ref = np.load(out_path)
  return float(np.max(np.abs(out - ref))), float(np.max(np.abs(out)))


def program_flops(fn, *args) -> float:
  """FLOPs of ``fn(*args)`` as XLA's cost analysis counts them in the lowered program,
  before XLA's optimizations and before any partitioning over devices (so the global
  count of a data-parallel step).

  Lowered for the host CPU, from the arguments' shapes alone (no data moves), so that the
  count is the same whichever devices run the step: GPU backends have no cost analysis of
  a lowered program, and their compiled program's count leaves out the convolutions they
  hand to cuDNN (an H200 reported 28 of the 342 GFLOP of configs/mnist_minority.py's
  step, benchmarks/README.md). On CPU this count and the compiled one agree within 2%."""
  import jax
  import jax.numpy as jnp

  def abstract(x):
    return jax.ShapeDtypeStruct(jnp.shape(x), x.dtype) if hasattr(x, 'dtype') else x
  try:
    cpu = jax.devices('cpu')[0]
  except RuntimeError as e:
    raise RuntimeError('program_flops lowers on the host CPU backend: keep cpu in '
                       'JAX_PLATFORMS (e.g. JAX_PLATFORMS=cuda,cpu).') from e
  with jax.default_device(cpu):
    lowered = jax.jit(fn).lower(*jax.tree.map(abstract, args))
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if not cost or 'flops' not in cost:
    raise RuntimeError(f'XLA gave no FLOP count for {getattr(fn, "__name__", fn)!r}.')
  return float(cost['flops'])


def matmul_size() -> int:
  """The side of the reference matmul: 2048 on CPU; 8192 on an accelerator, where a
  2048x2048 product is too short to time one by one (launch and sync dominate)."""
  import jax
  return 2048 if jax.default_backend() == 'cpu' else 8192


def jax_matmul_flops_per_sec(n: int = 2048, repeats: int = 10, warmup: int = 3) -> float:
  """The peak FLOP/s of an n x n float32 matmul: the fastest of ``repeats`` timed products
  after ``warmup`` untimed ones (the first products of a process run slower while its
  threads start; PyTorch's ran at less than half speed in the first two)."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n))
  b = jax.random.normal(jax.random.key(1), (n, n))
  dot = jax.jit(jnp.dot)
  for _ in range(warmup):
    dot(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    dot(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * n ** 3 / min(times)


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      names = [l.split(':', 1)[1].strip() for l in f if l.startswith('model name')]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  import jax
  devices = jax.devices()
  kind = devices[0].platform.upper()
  return (f'{os.cpu_count()}-core {cpu} ({kind}: {devices[0].device_kind}, '
          f'{len(devices)} device(s)), {platform.system()}')


# On an idle machine the JAX / PyTorch ratios of one run's rounds have differed by up to
# 1.4x (the log); with other work on the cores, by 2-10x.
ROUNDS_DISAGREE = 2.0


def load_average() -> str:
  try:
    return ', '.join(f'{x:.1f}' for x in os.getloadavg())
  except OSError:
    return 'n/a'


def markdown_table(header: list[str], rows: list[list]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
  for row in rows:
    lines.append('| ' + ' | '.join(str(c) for c in row) + ' |')
  return '\n'.join(lines)


def base_parser(description: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=description)
  p.add_argument('--torch-python', default='',
                 help='a Python with torch to run the PyTorch side in (default: this one if '
                      'it has torch, else .venv-torch/bin/python if present)')
  p.add_argument('--models', default=','.join(MODELS), help='comma-separated: ' + ', '.join(MODELS))
  p.add_argument('--repeats', type=int, default=5,
                 help='timed rounds per model, alternating JAX and PyTorch; medians reported')
  p.add_argument('--seconds', type=float, default=2.0, help='target length of one timed round')
  p.add_argument('--json', default='', help='also write the results to this JSON file')
  p.add_argument('--default-malloc', action='store_true',
                 help="glibc's default malloc settings in both processes instead of "
                      'benchmarks/steady_malloc.py (the heap kept, not trimmed)')
  p.add_argument('--no-torch', action='store_true', help='time JAX alone')
  p.add_argument('--torch-device', default='cpu',
                 help="the PyTorch side's device: cpu, or cuda to compare on a GPU (float32 "
                      'matmuls and convolutions in TF32 there, as XLA computes them)')
  p.add_argument('--set', action='append', default=[], type=parse_override,
                 metavar='FIELD=VALUE',
                 help='set a config field on every model, e.g. --set model.dtype=bfloat16 '
                      '(PyTorch then runs under bfloat16 autocast) or --set '
                      'train.batch_size=256; repeatable')
  p.add_argument('--no-xla-cpu-flags', action='store_true',
                 help="XLA's own defaults instead of the project's XLA:CPU options "
                      '(config.train.xla_cpu_flags; the "before" of the speed log, '
                      'benchmarks/README.md)')
  return p


def steady_malloc(args, torch=None) -> None:
  """Unless ``--default-malloc``: the malloc settings of benchmarks/steady_malloc.py in this
  process and in the PyTorch worker (the same in both, so the comparison stays fair)."""
  if args.default_malloc:
    return
  from benchmarks import steady_malloc as sm
  applied = [sm.apply()] + ([torch('steady_malloc')['applied']] if torch is not None else [])
  print(f'malloc: heap kept (benchmarks/steady_malloc.py), applied: {applied}')


def start(args):
  """The side-by-side benchmarks' start: the project's XLA:CPU options (unless
  ``--no-xla-cpu-flags``), the PyTorch worker (unless ``--no-torch``; None without one) and
  the malloc settings of both, each printed with the machine. Returns the worker."""
  print(f'XLA_FLAGS: {setup_xla(args.no_xla_cpu_flags) or "(none)"}')
  EXTRA_OVERRIDES.update(args.set)
  import jax
  torch = (None if args.no_torch
           else open_torch(args.torch_python, args.torch_device))
  steady_malloc(args, torch)
  print(f'machine: {machine()}; jax {jax.__version__}'
        + (f', torch {torch.info["torch"]} ({torch.info["threads"]} threads'
           + (f', on {torch.info["cuda"]}' if torch.device != 'cpu' else '') + ')'
           if torch else '')
        + (f'; config overrides {EXTRA_OVERRIDES}' if EXTRA_OVERRIDES else ''))
  return torch


def use_plain_layers():
  """flax's own GroupNorm, 1x1 convolution, resize and dropout in the UNet instead of the
  project's equivalents (the "before" of the speed log, benchmarks/README.md)."""
  from cdiff_jax.models import unet
  unet.FUSED_GN = unet.POINTWISE_DOT = unet.REPEAT_UPSAMPLE = unet.RBG_DROPOUT = False
  unet.LOOP_FRIENDLY_CONV_GRAD = False


def setup_xla(plain: bool = False) -> str:
  """The project's default XLA:CPU options, as the launcher sets them (unless ``plain``);
  call before anything touches a device. Returns XLA_FLAGS for the report."""
  from cdiff_jax import parallel
  if not plain:
    parallel.configure_xla_cpu()
  return os.environ.get('XLA_FLAGS', '')


def median(xs) -> float:
  return float(np.median(np.asarray(xs, np.float64)))
