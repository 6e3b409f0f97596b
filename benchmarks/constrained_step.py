"""Cost of a constrained training step (3 constraints) relative to an unconstrained step at
the same total batch, in one run.

Both arms are the full jitted train step of ``cdiff_jax.train`` on the same model:

* ``dsm``: plain DSM on one group of B examples;
* ``constrained``: dual training with 3 constraints, the same B examples split into the
  objective and three constraint groups (one model call on the flat batch, per-group
  means, Lagrangian, projected dual ascent);
* ``constrained (k=5 scan)``: the same, 5 steps per call through ``lax.scan``.

Arms are timed interleaved, round after round, and the table gives each arm's median
images/s and its cost relative to ``dsm`` (the goal is <= 1.10x).

  python benchmarks/constrained_step.py                 # digits 8x8 and a 28x28 model
  python benchmarks/constrained_step.py --sizes=8 --rounds=9
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from cdiff_jax import config as config_lib  # noqa: E402
from cdiff_jax import train  # noqa: E402
from cdiff_jax.data import sources  # noqa: E402
from cdiff_jax.methods import constrained  # noqa: E402


def make_config(size: int, batch: int, method: str, steps_per_call: int = 1):
  c = common.for_timing(config_lib.base_config(), steps_per_call)
  c.train.num_devices = 1
  if size == 28:
    c.data.name = 'mnist'
    c.model.ch_mult, c.model.attn_levels = (1, 2, 2), (2,)
  if method == 'dsm':
    c.train.batch_size = batch
    return c
  c.method = constrained.default_method_config()
  c.method.constraint_classes = (4, 5, 7)
  c.method.constraint_batch = batch // 8
  c.method.objective_batch = batch - 3 * (batch // 8)
  return c


def dataset_for(size: int) -> sources.ArrayDataset:
  if size == 8:
    return sources.load_digits('train')
  rng = np.random.default_rng(0)
  return sources.ArrayDataset(rng.integers(0, 256, (2048, 28, 28, 1), dtype=np.uint8),
                              rng.integers(0, 10, 2048), 10, 'synthetic28')


def runner(config, dataset):
  exp = train.build(config, dataset)
  state = exp.init_state()
  batch = common.first_batch(exp)
  start = time.perf_counter()
  exp.step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  state, m = exp.step(state, batch)  # warm (the compiled program is cached by jit)
  jax.block_until_ready(m)
  holder = [state]

  def run(calls):
    s = holder[0]
    begin = time.perf_counter()
    for _ in range(calls):
      s, m = exp.step(s, batch)
    jax.block_until_ready((s, m))
    holder[0] = s
    return time.perf_counter() - begin

  return run, exp.batcher.global_batch_size * config.train.steps_per_call, compile_s


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default='8,28')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--seconds', type=float, default=2.0, help='target time per measurement')
  args = parser.parse_args()
  print(f'XLA_FLAGS: {common.setup_xla() or "(none)"}')  # the launcher's XLA:CPU options
  print(f'machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, '
        f'JAX {jax.__version__} on {jax.devices()[0].platform}')
  rows = []
  for size in [int(s) for s in args.sizes.split(',')]:
    ds = dataset_for(size)
    arms = {'dsm': runner(make_config(size, args.batch, 'dsm'), ds),
            'constrained': runner(make_config(size, args.batch, 'constrained'), ds),
            'constrained (k=5 scan)': runner(make_config(size, args.batch, 'constrained', 5), ds)}
    calls = {}
    for name, (run, images, _) in arms.items():
      per_call = run(1)
      calls[name] = max(1, int(args.seconds / max(per_call, 1e-4)))
    times = {name: [] for name in arms}
    for _ in range(args.rounds):
      for name, (run, images, _) in arms.items():
        times[name].append(run(calls[name]) / (calls[name] * images))
    base = np.median(times['dsm'])
    for name, (run, images, compile_s) in arms.items():
      med = np.median(times[name])
      rows.append((f'{size}x{size}', name, 1.0 / med, med / base, compile_s))
  print('\n| image | step | images/s | cost vs dsm | first compile (s) |')
  print('|---|---|---|---|---|')
  for size, name, ips, ratio, comp in rows:
    print(f'| {size} | {name} | {ips:.0f} | {ratio:.3f}x | {comp:.1f} |')
  print(f'\nbatch {args.batch} per step (constrained: {args.batch - 3 * (args.batch // 8)} objective + '
        f'3 x {args.batch // 8} constraint examples); medians of {args.rounds} interleaved rounds.')


if __name__ == '__main__':
  main()
