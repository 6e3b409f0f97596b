"""Train-step speed of cdiff_jax next to the same model in PyTorch, in one run.

For each model (``--models``; see ``benchmarks/common.py``): the jitted, donated train step
that ``cdiff_jax.train.build`` makes (DSM eps loss on the DDPM schedule, clipping + AdamW,
EMA), and a PyTorch port of the same network, loss, optimizer and EMA at the same batch
(``benchmarks/torch_reference.py``; the benchmark first loads the JAX parameters into it
and checks that both networks compute the same function). Reported:

* images/s of both (median over ``--repeats`` rounds that alternate JAX and PyTorch) and
  their ratio, with the range of the ratio within each round; with ``--steps-per-call k``
  also the JAX step that runs k steps per call through ``lax.scan`` (on CPU traced with
  ``unet.loop_friendly_conv``; ``--scan-plain`` also times it with XLA's own convolution
  gradients);
* the JAX step's first compile (trace + lower + compile, persistent cache off);
* the step's FLOPs (XLA's cost analysis of the lowered step, ``common.program_flops``) and
  the FLOP/s both reach, as a fraction of each framework's peak float32 matmul FLOP/s
  (2048x2048 on CPU, 8192x8192 on an accelerator; the fastest product, measured before and
  after the models in the same run).

Run: ``make bench`` (makes the PyTorch venv), or
``.venv/bin/python benchmarks/train_step.py --torch-python .venv-torch/bin/python``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


def jax_step_runner(name: str, steps_per_call: int = 1, loop_friendly: bool | None = None):
  """(run(n_calls) -> seconds, images per call, info) for the real jitted step;
  ``loop_friendly`` overrides the scanned step's choice of convolution (None: as shipped)."""
  import jax
  from cdiff_jax import train_step as train_step_lib

  exp = common.build_experiment(name, steps_per_call)
  if loop_friendly is not None:
    exp.step = train_step_lib.CompiledStep(exp.step.step_fn, exp.mesh, steps_per_call,
                                           loop_friendly)
  state = exp.init_state()
  k = steps_per_call
  batch = common.first_batch(exp)
  start = time.perf_counter()
  exp.step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  # One step's FLOPs as lowered, the same count on every platform (common.program_flops).
  flops = common.program_flops(exp.step.step_fn, state, batch) if k == 1 else None
  info = dict(exp=exp, compile_s=compile_s, flops_per_call=flops,
              params=jax.device_get(state.params))  # host copy: the step donates the state
  holder = [state]

  def run(calls: int) -> float:
    s = holder[0]
    begin = time.perf_counter()
    for _ in range(calls):
      s, metrics = exp.step(s, batch)
    jax.block_until_ready((s, metrics))
    holder[0] = s
    return time.perf_counter() - begin

  begin = time.perf_counter()
  run(1)  # first call of the jitted function (reuses the compiled executable)
  info['first_call_s'] = time.perf_counter() - begin
  return run, exp.batcher.global_batch_size * k, info


def calls_for(seconds_per_call: float, target: float) -> int:
  return max(1, int(round(target / max(seconds_per_call, 1e-6))))


def bench_model(name: str, args, torch) -> dict:
  import jax
  print(f'\n[{name}] building and compiling the JAX step...', flush=True)
  run, imgs_per_call, info = jax_step_runner(name)
  exp = info['exp']
  result = dict(model=name, batch=exp.batcher.global_batch_size,
                image_shape=list(exp.image_shape),
                params=int(sum(x.size for x in jax.tree.leaves(info['params']))),
                jax_compile_s=info['compile_s'], flops_per_step=info['flops_per_call'])
  runs = [('jax', run, imgs_per_call)]
  if args.steps_per_call > 1:
    run_k, imgs_k, info_k = jax_step_runner(name, args.steps_per_call)
    result['jax_scan_compile_s'] = info_k['compile_s']
    runs.append(('jax_scan', run_k, imgs_k))
    if args.scan_plain:
      run_p, imgs_p, info_p = jax_step_runner(name, args.steps_per_call, loop_friendly=False)
      result['jax_scan_plain_compile_s'] = info_p['compile_s']
      runs.append(('jax_scan_plain', run_p, imgs_p))
  if torch is not None:
    diff, scale = common.check_same_function(exp, info['params'], torch)
    result['same_function_max_abs_diff'] = diff
    print(f'[{name}] PyTorch port vs JAX on the same parameters: max |diff| {diff:.1e} '
          f'(outputs up to {scale:.2f})', flush=True)
    if not diff <= 0.05 * (1 + scale):  # TF32 / bfloat16 rounding stays far below this
      raise SystemExit(f'[{name}] the PyTorch port computes another function than the JAX '
                       f'model (max |diff| {diff:.2g}): the comparison would not be like for '
                       'like; fix benchmarks/torch_reference.py first.')
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, 'init.npz')
      import numpy as np
      np.savez(path, **common.flatten_params(jax.device_get(info['params'])))
      built = torch('build', args=common.torch_args(exp, params_npz=path,
                                                    channels_last=args.torch_channels_last))
    result['torch_params'] = built['num_params']
    if built['num_params'] != result['params']:
      raise SystemExit(f'{name}: PyTorch model has {built["num_params"]} parameters, '
                       f'JAX {result["params"]}: not the same architecture.')
    start = time.perf_counter()
    torch('train', steps=1)
    result['torch_first_step_s'] = time.perf_counter() - start

    def torch_run(calls):
      return torch('train', steps=calls)['seconds']
    runs.append(('torch', torch_run, exp.batcher.global_batch_size))

  # Warm up and size the rounds (each about args.seconds long).
  calls = {}
  for key, fn, per_call in runs:
    fn(1)
    calls[key] = calls_for(fn(1), args.seconds)
  times = {key: [] for key, _, _ in runs}
  settle = {key: calls_for(args.seconds / calls[key], args.settle) if args.settle > 0 else 0
            for key in calls}
  for r in range(args.repeats):
    for key, fn, per_call in runs:
      if settle[key]:
        fn(settle[key])
      times[key].append(fn(calls[key]) / calls[key])
    print(f'[{name}] round {r + 1}/{args.repeats}: ' + ', '.join(
        f'{key} {per_call / times[key][-1]:.0f} img/s' for key, _, per_call in runs)
        + f' (load {common.load_average()})', flush=True)
  for key, _, per_call in runs:
    sec = common.median(times[key])
    result[f'{key}_images_per_s'] = per_call / sec
    result[f'{key}_step_ms'] = 1e3 * sec * (imgs_per_call / per_call)
  step_s = result['jax_step_ms'] / 1e3
  result['jax_flops_per_s'] = result['flops_per_step'] / step_s
  if torch is not None:
    result['ratio'] = result['jax_images_per_s'] / result['torch_images_per_s']
    # Rounds alternate, so a round's own ratio cancels drift of the machine between rounds;
    # their spread says how far to trust the ratio of medians.
    per_call = {key: n for key, _, n in runs}
    for key in ('jax', 'jax_scan'):
      if key in times:
        result[f'{key}_round_ratios'] = [
            (per_call[key] / t) / (per_call['torch'] / t_torch)
            for t, t_torch in zip(times[key], times['torch'])]
    result['torch_flops_per_s'] = result['flops_per_step'] / (result['torch_step_ms'] / 1e3)
    if 'jax_scan_images_per_s' in result:
      result['scan_ratio'] = result['jax_scan_images_per_s'] / result['torch_images_per_s']
  return result


def main(argv=None):
  p = common.base_parser(__doc__.split('\n')[0])
  p.add_argument('--steps-per-call', type=int, default=8,
                 help='also time the lax.scan step with this many steps per call (1: skip)')
  p.add_argument('--scan-plain', action='store_true',
                 help="also time the scanned step with XLA's own convolution gradients (on "
                      'CPU the shipped scanned step uses unet.loop_friendly_conv)')
  p.add_argument('--settle', type=float, default=2.0,
                 help='untimed seconds of the same framework before each timed round: on a '
                      "2-core machine JAX's first steps right after PyTorch's round ran up to "
                      '2x slower (benchmarks/README.md), so neither is timed while that lasts')
  p.add_argument('--torch-channels-last', type=int, default=1,
                 help='PyTorch in channels-last memory format (1, its faster format on '
                      'CPU here) or NCHW (0)')
  p.add_argument('--plain-layers', action='store_true',
                 help="flax's own GroupNorm, 1x1 conv, resize and dropout in the UNet (the "
                      "'before' of the speed log, benchmarks/README.md) instead of the "
                      "faster equivalents")
  args = p.parse_args(argv)
  torch = common.start(args)
  import jax
  if args.plain_layers:
    common.use_plain_layers()
  jax.config.update('jax_enable_compilation_cache', False)
  n = common.matmul_size()

  def measure_matmul():
    m = dict(jax=common.jax_matmul_flops_per_sec(n))
    if torch is not None:
      m['torch'] = torch('matmul', n=n)['flops_per_sec']
    print(f'{n}x{n} float32 matmul: ' + ', '.join(f'{k} {v / 1e9:.0f} GFLOP/s'
                                                  for k, v in m.items()), flush=True)
    return m

  # The reference: each framework's fastest matmul, measured before and after the models
  # (one reading alone can catch the machine in a slow moment), the larger kept.
  before = measure_matmul()
  results = [bench_model(m, args, torch) for m in args.models.split(',')]
  after = measure_matmul()
  matmul_readings = {k: [v, after[k]] for k, v in before.items()}
  matmul = {k: max(v) for k, v in matmul_readings.items()}
  for r in results:
    r['jax_matmul_fraction'] = r['jax_flops_per_s'] / matmul['jax']
    if 'torch_flops_per_s' in r:
      r['torch_matmul_fraction'] = r['torch_flops_per_s'] / matmul['torch']
  if torch is not None:
    torch.close()

  header = ['model', 'params', 'batch', 'JAX img/s', 'PyTorch img/s', 'JAX / PyTorch',
            'JAX first compile', 'GFLOP/step', 'JAX FLOP/s (of matmul)',
            'PyTorch FLOP/s (of matmul)']
  rows = []
  for r in results:
    shape = 'x'.join(str(s) for s in r['image_shape'])
    jax_ips = f"{r['jax_images_per_s']:.0f}"
    if 'jax_scan_images_per_s' in r:
      jax_ips += f" ({r['jax_scan_images_per_s']:.0f} scan x{args.steps_per_call})"
    if 'jax_scan_plain_images_per_s' in r:
      jax_ips += f" ({r['jax_scan_plain_images_per_s']:.0f} scan, XLA's conv gradients)"
    ratio = f"{r['ratio']:.2f}x" if 'ratio' in r else '-'
    if 'scan_ratio' in r:
      ratio += f" ({r['scan_ratio']:.2f}x)"
    rows.append([f"{r['model']} ({shape})", f"{r['params'] / 1e6:.2f}M", r['batch'], jax_ips,
                 f"{r['torch_images_per_s']:.0f}" if 'torch_images_per_s' in r else '-',
                 ratio, f"{r['jax_compile_s']:.1f} s", f"{r['flops_per_step'] / 1e9:.1f}",
                 f"{r['jax_flops_per_s'] / 1e9:.0f} G ({100 * r['jax_matmul_fraction']:.0f}%)",
                 f"{r['torch_flops_per_s'] / 1e9:.0f} G ({100 * r['torch_matmul_fraction']:.0f}%)"
                 if 'torch_flops_per_s' in r else '-'])
  print()
  print(common.markdown_table(header, rows))
  for r in results:
    spread = [f"{what} {min(r[key]):.2f}-{max(r[key]):.2f}" for key, what in
              (('jax_round_ratios', 'single steps'), ('jax_scan_round_ratios', 'scanned'))
              if key in r]
    if spread:
      print(f"{r['model']}: JAX / PyTorch within each round: {', '.join(spread)}")
    for key in ('jax_round_ratios', 'jax_scan_round_ratios'):
      ratios = r.get(key, [])
      if ratios and max(ratios) > common.ROUNDS_DISAGREE * min(ratios):
        print(f"{r['model']}: WARNING: the rounds' {key} disagree by more than "
              f"{common.ROUNDS_DISAGREE:g}x ({min(ratios):.2f}-{max(ratios):.2f}): the machine "
              'was busy (other work on the cores slows a 2-thread PyTorch many times over); '
              'rerun it idle before quoting these figures.')
  print(f'\nmachine: {common.machine()}; medians of {args.repeats} alternating rounds, each '
        f'after {args.settle:g} s untimed; '
        f'matmul peak ' + ', '.join(f'{k} {v / 1e9:.0f} GFLOP/s (readings '
                                    + ' / '.join(f'{x / 1e9:.0f}' for x in matmul_readings[k])
                                    + ')' for k, v in matmul.items())
        + f'; load average at end {common.load_average()}')
  common.write_json(args.json, matmul_flops_per_s=matmul,
                    matmul_readings_flops_per_s=matmul_readings, results=results,
                    steps_per_call=args.steps_per_call)
  return results


if __name__ == '__main__':
  main()
