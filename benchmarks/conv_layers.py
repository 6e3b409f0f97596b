"""Where the train step's time goes: every 3x3 convolution of a model, forward, input
gradient and kernel gradient, timed in XLA (the project's default XLA:CPU options), in XLA
with oneDNN kernels (``parallel.INFERENCE_CPU_OPTIONS``, per program) and in PyTorch (the
same shapes, channels-last, ``aten.convolution_backward``), all in one run.

The convolutions and how often each shape occurs come from the model's forward pass (the
jaxpr of ``exp.model.net.apply``); totals weight each shape by its count, so they estimate
the convolutions' share of one train step (the first layer's input gradient is left out, as
the step does not compute it). Each time is the median of ``--repeats`` rounds of
``--calls`` calls of a separately compiled program, so a conv here cannot overlap with
other work as it can inside the step.

  .venv/bin/python benchmarks/conv_layers.py --torch-python .venv-torch/bin/python
"""

from __future__ import annotations

import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

KINDS = ('fwd', 'dx', 'dw')


def conv_specs(exp) -> list[tuple[dict, int]]:
  """[(spec, count)] of the 3x3 convolutions in the model's forward pass."""
  import jax
  import jax.numpy as jnp
  net = exp.model.net
  params = exp.init_state().params
  x = jnp.zeros((exp.batcher.global_batch_size,) + tuple(exp.image_shape))
  t = jnp.zeros((x.shape[0],))
  jaxpr = jax.make_jaxpr(lambda p: net.apply({'params': p}, x, t, train=True,
                                             rngs={'dropout': jax.random.key(0)}))(params)
  counts = collections.Counter()

  def walk(jp):
    for e in jp.eqns:
      if e.primitive.name == 'conv_general_dilated' and e.invars[1].aval.shape[:2] == (3, 3):
        p = e.params
        counts[(tuple(e.invars[0].aval.shape), tuple(e.invars[1].aval.shape),
                tuple(p['window_strides']), tuple(map(tuple, p['padding'])))] += 1
      for v in e.params.values():
        for sub in v if isinstance(v, (list, tuple)) else [v]:
          inner = getattr(sub, 'jaxpr', sub)
          if hasattr(inner, 'eqns'):
            walk(inner)
  walk(jaxpr.jaxpr)
  return [(dict(x=list(k[0]), w=list(k[1]), stride=k[2][0], padding=[list(q) for q in k[3]]), n)
          for k, n in counts.items()]


def median_seconds(fn, calls: int, repeats: int) -> float:
  import numpy as np
  fn()
  times = []
  for _ in range(repeats):
    begin = time.perf_counter()
    for _ in range(calls):
      out = fn()
    out.block_until_ready()
    times.append((time.perf_counter() - begin) / calls)
  return float(np.median(times))


def jax_times(spec: dict, options, calls: int, repeats: int, loop_friendly: bool = False) -> dict:
  import jax
  from jax import lax
  from cdiff_jax.models import unet
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, spec['x'])
  w = 0.1 * jax.random.normal(kw, spec['w'])
  s = spec['stride']
  pads = [tuple(q) for q in spec['padding']]

  def conv(x, w):
    fn = unet.loop_friendly_conv if loop_friendly else lax.conv_general_dilated
    return fn(x, w, (s, s), pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  g = jax.random.normal(kg, conv(x, w).shape)
  fns = dict(fwd=lambda x, w, g: conv(x, w),
             dx=lambda x, w, g: jax.vjp(lambda x_: conv(x_, w), x)[1](g)[0],
             dw=lambda x, w, g: jax.vjp(lambda w_: conv(x, w_), w)[1](g)[0])
  out = {}
  for kind, fn in fns.items():
    f = jax.jit(fn, compiler_options=options)
    out[kind] = median_seconds(lambda f=f: f(x, w, g), calls, repeats)
  return out


def main(argv=None):
  p = common.base_parser(__doc__.split('\n')[0])
  p.set_defaults(models='mnist28')
  p.add_argument('--calls', type=int, default=5, help='calls per timed round')
  p.add_argument('--loop-friendly', action='store_true',
                 help='also time unet.loop_friendly_conv (the form used inside compiled loops)')
  args = p.parse_args(argv)
  torch = common.start(args)
  from cdiff_jax import parallel
  onednn = parallel.inference_compiler_options()
  # (name, compiler options, loop-friendly form)
  variants = ([('xla', None, False)] + ([('xla_onednn', onednn, False)] if onednn else [])
              + ([('xla_loopfriendly', None, True)] if args.loop_friendly else [])
              + ([('xla_loopfriendly_onednn', onednn, True)]
                 if args.loop_friendly and onednn else []))
  names = [v[0] for v in variants]
  results = []
  for name in args.models.split(','):
    exp = common.build_experiment(name)
    specs = conv_specs(exp)
    rows, totals = [], collections.defaultdict(float)
    for spec, count in specs:
      row = dict(spec=spec, count=count)
      for key, options, loop_friendly in variants:
        row[key] = jax_times(spec, options, args.calls, args.repeats, loop_friendly)
      if torch is not None:
        row['torch'] = torch('conv_times', spec=spec, calls=args.calls,
                             repeats=args.repeats)['seconds']
      for key in names + ['torch']:
        for kind in KINDS if key in row else ():
          if kind == 'dx' and spec is specs[0][0]:
            continue  # the input layer (first in the trace): no input gradient in the step
          totals[f'{key}_{kind}'] += count * row[key][kind]
      rows.append(row)
    results.append(dict(model=name, convs=rows, totals_s=dict(totals)))

    keys = names + (['torch'] if torch is not None else [])
    header = ['x -> C_out (stride)', 'count'] + [f'{k} {kind} ms' for kind in KINDS for k in keys]
    table = []
    for r in rows:
      s = r['spec']
      table.append([f"{'x'.join(map(str, s['x']))} -> {s['w'][-1]} (s{s['stride']})", r['count']]
                   + [f"{1e3 * r[k][kind]:.2f}" for kind in KINDS for k in keys])
    table.append(['**per step (x count)**', sum(c for _, c in specs)]
                 + [f"**{1e3 * totals[f'{k}_{kind}']:.0f}**" for kind in KINDS for k in keys])
    print(f'\n[{name}]')
    print(common.markdown_table(header, table))
    print('per step, all three: ' + ', '.join(
        f"{k} {1e3 * sum(totals[f'{k}_{kind}'] for kind in KINDS):.0f} ms" for k in keys))
  if torch is not None:
    torch.close()
  print(f'\nmachine: {common.machine()}; medians of {args.repeats} rounds of {args.calls} '
        f'calls; load average at end {common.load_average()}')
  common.write_json(args.json, results=results)
  return results


if __name__ == '__main__':
  main()
