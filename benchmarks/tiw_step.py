"""Cost of a TIW-DSM training step relative to a plain DSM step at the same batch.

Every arm is the full jitted train step of ``cdiff_jax.train`` (score forward/backward,
optimizer, EMA; for TIW also the discriminator forward and its per-example input-gradient,
and with ``disc_joint`` the discriminator's own T-BCE update). The arms are timed
interleaved, round after round, in one process, and the table reports each arm's fastest
and median round (per step) and their ratios to DSM measured in the same run (the goal is
TIW-DSM <= 1.5x). On a shared machine the fastest round is the steadier figure: other
processes only ever add time.

  python benchmarks/tiw_step.py                       # digits 8x8 and MNIST-sized 28x28
  python benchmarks/tiw_step.py --shapes=28 --batch=256 --rounds=7
  python benchmarks/tiw_step.py --shapes=8 --arms='TIW-DSM (frozen disc)'   # DSM is always timed
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
from cdiff_jax import config as config_lib
from cdiff_jax import parallel, train
from cdiff_jax.data import sources
from cdiff_jax.methods import tiw


def make_config(size: int, batch: int, method: str, **method_fields):
  c = config_lib.base_config()
  c.train.batch_size = batch
  c.train.num_devices = 1
  c.train.compilation_cache = False
  if size == 28:  # the MNIST config's networks
    c.data.name = 'mnist'
    c.model.ch_mult, c.model.attn_levels = (1, 2, 2), (2,)
  if method == 'dsm':
    c.method.name = 'dsm'
    return c
  c.method = tiw.default_config()
  c.method.disc_pretrain_steps = 1   # the phase before training is not what is timed
  c.method.disc_cache = False
  if size == 28:
    c.method.disc_ch_mult = (1, 2, 2)
  c.method.update(method_fields)
  return c


def dataset_for(size: int) -> sources.ArrayDataset:
  if size == 8:
    return sources.load_digits('train')
  r = np.random.default_rng(0)  # shapes matter here, not contents
  labels = np.repeat(np.arange(10), 300)
  return sources.ArrayDataset(r.integers(0, 256, (len(labels), 28, 28, 1), dtype=np.uint8),
                              labels, 10, 'synthetic28')


ARMS = [
    ('DSM', 'dsm', {}),  # the baseline of the ratios
    ('DSM(obs)', 'tiw', dict(variant='dsm_obs')),
    ('IW-DSM', 'tiw', dict(variant='iw')),
    ('TIW-DSM (frozen disc)', 'tiw', dict(variant='tiw')),
    ('TIW-DSM (joint disc)', 'tiw', dict(variant='tiw', disc_joint=True)),
]


def select_arms(names: str) -> list:
  """The ARMS named in a comma-separated list (all when empty), DSM first as the baseline."""
  if not names:
    return ARMS
  wanted = [n.strip() for n in names.split(',') if n.strip()]
  known = [a[0] for a in ARMS]
  unknown = [n for n in wanted if n not in known]
  if unknown:
    raise SystemExit(f'--arms: unknown arm(s) {unknown}; choose from {known}')
  return [a for a in ARMS if a[0] == 'DSM' or a[0] in wanted]


def bench(size: int, batch: int, rounds: int, steps: int, arms: list):
  ds = dataset_for(size)
  runs = []
  for name, method, fields in arms:
    exp = train.build(make_config(size, batch, method, **fields), ds)
    state = exp.init_state()
    batch_dev = parallel.put_batch(exp.batcher.batch(0), exp.mesh)
    t0 = time.perf_counter()
    state, m = exp.step(state, batch_dev)
    jax.block_until_ready(m['loss'])
    runs.append(dict(name=name, exp=exp, state=state, batch=batch_dev,
                     compile_s=time.perf_counter() - t0, times=[]))
  for _ in range(rounds):
    for run in runs:
      t0 = time.perf_counter()
      state = run['state']
      for _ in range(steps):
        state, m = run['exp'].step(state, run['batch'])
      jax.block_until_ready(m['loss'])
      run['times'].append((time.perf_counter() - t0) / steps)
      run['state'] = state
  base_med, base_min = np.median(runs[0]['times']), np.min(runs[0]['times'])
  rows = []
  for run in runs:
    med, best = float(np.median(run['times'])), float(np.min(run['times']))
    rows.append(dict(arm=run['name'], ms_min=1e3 * best, ratio_min=best / base_min,
                     ms=1e3 * med, ratio=med / base_med,
                     compile_s=run['compile_s'], traces=run['exp'].step.num_traces))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--shapes', default='8,28', help='image sizes: 8 (digits), 28 (MNIST)')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--steps', type=int, default=10, help='steps per timed round')
  parser.add_argument('--arms', default='', help='comma-separated arm names (default: all); '
                      'DSM, the baseline of the ratios, is always timed')
  args = parser.parse_args()
  arms = select_arms(args.arms)
  print(f'XLA_FLAGS: {common.setup_xla() or "(none)"}')  # the launcher's XLA:CPU options
  print(f'{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}), '
        f'{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}; '
        f'batch {args.batch}, {args.rounds} interleaved rounds of {args.steps} steps; '
        f'load average {os.getloadavg()[0]:.1f} at start')
  for size in [int(s) for s in args.shapes.split(',')]:
    rows = bench(size, args.batch, args.rounds, args.steps, arms)
    print(f'\n{size}x{size} images, UNet score model, ConvClassifier discriminator')
    print('| arm | ms / step (min) | x DSM (min) | ms / step (median) | x DSM (median) '
          '| compile + first step (s) |')
    print('|---|---:|---:|---:|---:|---:|')
    for r in rows:
      assert r['traces'] == 1, f'{r["arm"]} retraced'
      print(f'| {r["arm"]} | {r["ms_min"]:.1f} | {r["ratio_min"]:.2f} | {r["ms"]:.1f} | '
            f'{r["ratio"]:.2f} | {r["compile_s"]:.1f} |')


if __name__ == '__main__':
  main()
