"""Convolution gradients inside an XLA while loop against the same steps as separate calls.

On XLA:CPU (jaxlib 0.12) a convolution's gradient computed inside ``lax.fori_loop`` /
``lax.scan`` runs 20-40x slower than the same computation called step by step from Python,
while a forward convolution in a loop is not slower. Everything that differentiates a
network inside a loop pays it: the MCMC samplers (input gradients of an energy),
classifier guidance, and ``train.steps_per_call > 1``. This script measures the ratio for
input gradients (dx) and weight gradients (dw) of a two-layer 3x3 convolution energy, with
lax's convolution gradients and with ``unet.loop_friendly_conv`` (the project's fix).

  .venv/bin/python benchmarks/loop_grad.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--size', type=int, default=8)
  p.add_argument('--channels', type=int, default=64)
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--no-xla-cpu-flags', action='store_true')
  args = p.parse_args(argv)
  from benchmarks import common
  print(f'XLA_FLAGS: {common.setup_xla(args.no_xla_cpu_flags) or "(none)"}')
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax import lax

  from cdiff_jax.models import unet

  def conv(x, w, fn=lax.conv_general_dilated):
    return fn(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  rng = np.random.default_rng(0)
  b, s, c, n = args.batch, args.size, args.channels, args.steps
  x0 = jnp.asarray(rng.normal(size=(b, s, s, c)), jnp.float32)
  w0 = jnp.asarray(rng.normal(size=(3, 3, c, c)) * 0.05, jnp.float32)

  def energy(x, w, fn=lax.conv_general_dilated):
    return jnp.sum(jnp.tanh(conv(jnp.tanh(conv(x, w, fn)), w, fn)) ** 2)

  friendly = unet.loop_friendly_conv
  steps = {
      'dx (input gradient)': (lambda x: x - 0.01 * jax.grad(energy, 0)(x, w0), x0),
      'dw (weight gradient)': (lambda w: w - 1e-6 * jax.grad(energy, 1)(x0, w), w0),
      'forward only': (lambda x: jnp.tanh(conv(x, w0)), x0),
      'dx, unet.loop_friendly_conv': (
          lambda x: x - 0.01 * jax.grad(energy, 0)(x, w0, friendly), x0),
      'dw, unet.loop_friendly_conv': (
          lambda w: w - 1e-6 * jax.grad(energy, 1)(x0, w, friendly), w0),
  }

  def timed(f, arg):
    start = time.perf_counter()
    jax.block_until_ready(f(arg))
    first = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      jax.block_until_ready(f(arg))
      times.append(time.perf_counter() - start)
    return first, float(np.median(times))

  print(f'{n} steps, batch {b}, {s}x{s}x{c}, two 3x3 convolutions; {common.machine()}')
  print('| step | separate calls (ms) | one fori_loop (ms) | loop / calls | results equal |')
  print('|---|---:|---:|---:|---|')
  for name, (step, arg) in steps.items():
    one = jax.jit(step)

    def calls(a):
      for _ in range(n):
        a = one(a)
      return a

    loop = jax.jit(lambda a: lax.fori_loop(0, n, lambda i, a: step(a), a))
    _, t_calls = timed(calls, arg)
    _, t_loop = timed(loop, arg)
    same = np.allclose(np.asarray(calls(arg)), np.asarray(loop(arg)), rtol=1e-4, atol=1e-5)
    print(f'| {name} | {1e3 * t_calls:.1f} | {1e3 * t_loop:.1f} | {t_loop / t_calls:.1f}x | '
          f'{same} |', flush=True)


if __name__ == '__main__':
  main()
