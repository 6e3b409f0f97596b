"""GroupNorm(+SiLU) forward and forward+backward: the UNet's layer against flax's, in one run.

For each activation shape of the mnist28 UNet (batch 64; 8 groups) both layers get the
same input, parameters and output cotangent; the script checks that values and gradients
agree, then times forward and forward+backward, alternating the two layers over rounds
(median ms per call). The project's layer (``cdiff_jax.models.unet.group_norm``) reduces
per (example, channel) over the spatial axes in one variadic reduce and applies the
normalization as ``x * a + b`` with materialized per-(example, channel) coefficients.

  .venv/bin/python benchmarks/group_norm.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = '64x28x28x24,64x28x28x48,64x28x28x72,64x14x14x48,64x14x14x96,64x7x7x96'


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--shapes', default=SHAPES, help='comma-separated BxHxWxC')
  p.add_argument('--groups', type=int, default=8)
  p.add_argument('--no-silu', action='store_true')
  p.add_argument('--repeats', type=int, default=7)
  p.add_argument('--calls', type=int, default=10, help='calls per timed round')
  p.add_argument('--no-xla-cpu-flags', action='store_true')
  args = p.parse_args(argv)
  from benchmarks import common
  print(f'XLA_FLAGS: {common.setup_xla(args.no_xla_cpu_flags) or "(none)"}')
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from cdiff_jax.models import unet

  silu, g = not args.no_silu, args.groups

  def ours(x, scale, bias):
    return unet.group_norm(x, scale, bias, g, 1e-6, silu, None)

  flax_gn = nn.GroupNorm(g, epsilon=1e-6)

  def flax_layer(x, scale, bias):
    y = flax_gn.apply({'params': {'scale': scale, 'bias': bias}}, x)
    return nn.silu(y) if silu else y

  def timed(f, *a):
    start = time.perf_counter()
    for _ in range(args.calls):
      out = f(*a)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / args.calls

  rows = []
  for spec in args.shapes.split(','):
    shape = tuple(int(v) for v in spec.split('x'))
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], shape) * 1.5 + 0.3
    scale = 1.0 + 0.1 * jax.random.normal(keys[1], shape[-1:])
    bias = 0.1 * jax.random.normal(keys[2], shape[-1:])
    ct = jax.random.normal(keys[3], shape)
    fns = {}
    for name, layer in (('flax', flax_layer), ('cdiff_jax', ours)):
      fwd = jax.jit(layer)
      both = jax.jit(lambda x, s, b, layer=layer: jax.vjp(layer, x, s, b)[1](ct))
      fns[name] = (fwd, both)
    (ff, fb), (of, ob) = fns['flax'], fns['cdiff_jax']
    diff_y = float(jnp.abs(of(x, scale, bias) - ff(x, scale, bias)).max())
    diff_g = max(float(jnp.abs(a - b).max() / jnp.abs(b).max())
                 for a, b in zip(ob(x, scale, bias), fb(x, scale, bias)))
    times = {(n, k): [] for n in fns for k in (0, 1)}
    for _ in range(args.repeats):
      for name in fns:
        for k in (0, 1):
          times[(name, k)].append(timed(fns[name][k], x, scale, bias))
    med = {key: 1e3 * common.median(v) for key, v in times.items()}
    rows.append([spec, f"{med[('flax', 0)]:.2f}", f"{med[('cdiff_jax', 0)]:.2f}",
                 f"{med[('flax', 0)] / med[('cdiff_jax', 0)]:.2f}x",
                 f"{med[('flax', 1)]:.2f}", f"{med[('cdiff_jax', 1)]:.2f}",
                 f"{med[('flax', 1)] / med[('cdiff_jax', 1)]:.2f}x",
                 f'{diff_y:.1e} / {diff_g:.1e}'])
    print(' | '.join(str(c) for c in rows[-1]), flush=True)
  header = ['shape', 'flax fwd (ms)', 'ours fwd (ms)', 'speed-up', 'flax fwd+bwd (ms)',
            'ours fwd+bwd (ms)', 'speed-up', 'max |dy| / rel. |dgrad|']
  print()
  print(common.markdown_table(header, rows))
  print(f'\nmachine: {common.machine()}; GroupNorm({g})' + ('+SiLU' if silu else '')
        + f'; medians of {args.repeats} alternating rounds of {args.calls} calls; '
        f'load average at end {common.load_average()}')


if __name__ == '__main__':
  main()
