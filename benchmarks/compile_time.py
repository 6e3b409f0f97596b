"""First-compile time of every shipped config: the train step and the sampler, cold.

For each ``configs/*.py`` (or ``--configs``): builds the experiment as the launcher does
(datasets that are not embedded are replaced by random images of the config's shape and
class count; thresholds taken from a reference run become absolute ones; a discriminator
pre-training phase runs 2 steps), then times, with the persistent compilation cache off,
``step.lower(state, batch).compile()`` (trace + lower, also reported apart, + XLA compile of
the jitted train step: loss, gradient, optimizer, EMA, dual update), the same for the
configured sampler's programs on 8 samples (``Sampler.lower``), and "build + init" (data,
thresholds, the parameter initializer's compile). Goal (issue on speed): under 30 s each.
``toy_composition`` is not an image-launcher config (its experiment trains small MLPs) and
is left out.

  .venv/bin/python benchmarks/compile_time.py [--configs=digits_dsm,mnist_minority]
      [--plain-layers]   # also with flax's own layers: the compile ratio per config
      [--steps-per-call 4]   # the scanned step the README recommends on CPU
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

# Data of the configs that read files: (image shape from data.image_size, channels, classes).
NOT_LAUNCHER_CONFIGS = ('toy_composition',)
SYNTHETIC = {'mnist': (1, 10), 'fashion_mnist': (1, 10), 'cifar10': (3, 10), 'celeb_a': (3, 2)}


def shipped_configs() -> list[str]:
  here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
  return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(here, '*.py'))
                if not os.path.basename(p).startswith('_')
                and os.path.basename(p)[:-3] not in NOT_LAUNCHER_CONFIGS)


def prepare_config(name: str, steps_per_call: int = 1):
  config = importlib.import_module(f'configs.{name}').get_config()
  config = common.for_timing(config, steps_per_call)
  config.train.init_from = ''
  method = config.method
  if method.get('threshold_mode') == 'reference':  # same program, thresholds are numbers
    method.threshold_mode, method.target_frequency = 'absolute', 0.0
  for holder in (method, method.get('tiw')):
    if holder is not None and holder.get('disc_pretrain_steps', 0) > 0:
      holder.disc_pretrain_steps = 2
  dataset = None
  if config.data.name in SYNTHETIC:
    channels, classes = SYNTHETIC[config.data.name]
    size = config.data.image_size or 28
    dataset = common.synthetic_dataset((size, size, channels), n=2048)
    dataset = type(dataset)(dataset.images, dataset.labels % classes, classes, 'synthetic')
  if method.get('constraint_source') == 'source':
    # Fine-tuning: the experiment script builds a dataset whose 'source' attribute marks the
    # new data (0) and each constraint set (1, ...); random images of the same shape here.
    shape = dataset.image_shape if dataset is not None else (8, 8, 1)
    dataset = common.synthetic_dataset(shape, n=2048)
    m = len(method.constraint_names)
    dataset.attributes['source'] = np.arange(len(dataset)) % (m + 1)
  return config, dataset


def measure(name: str, steps_per_call: int = 1) -> dict:
  import jax
  from cdiff_jax import train
  jax.config.update('jax_enable_compilation_cache', False)  # even if the environment names one
  config, dataset = prepare_config(name, steps_per_call)
  start = time.perf_counter()
  exp = train.build(config, dataset)
  state = exp.init_state()
  build_s = time.perf_counter() - start
  batch = common.first_batch(exp)
  start = time.perf_counter()
  lowered = exp.step.lower(state, batch)
  lower_s = time.perf_counter() - start
  lowered.compile()
  step_s = time.perf_counter() - start
  sampler = exp.sampler()
  n = 8
  start = time.perf_counter()
  for lowered in sampler.lower(state.ema_params, n, exp.sample_labels(n)):
    lowered.compile()
  sample_s = time.perf_counter() - start
  return dict(config=name, image_shape=list(exp.image_shape), method=config.method.name,
              build_s=build_s, step_compile_s=step_s, step_trace_lower_s=lower_s,
              sampler=f'{config.sample.sampler}-{config.sample.num_steps}',
              sampler_compile_s=sample_s)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--configs', default='', help='comma-separated names under configs/ (default: all)')
  p.add_argument('--json', default='')
  p.add_argument('--no-xla-cpu-flags', action='store_true')
  p.add_argument('--plain-layers', action='store_true',
                 help="also compile each config with flax's own layers (GroupNorm, 1x1 conv, "
                      "resize, threefry dropout), right after the project's: the step "
                      "compile ratio in one run")
  p.add_argument('--steps-per-call', type=int, default=1,
                 help='time the train step that runs this many steps per call (lax.scan)')
  p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  xla_flags = common.setup_xla(args.no_xla_cpu_flags)
  import jax
  if args.child and args.plain_layers:
    common.use_plain_layers()
  names = args.configs.split(',') if args.configs else shipped_configs()
  if not args.child:
    print(f'XLA_FLAGS: {xla_flags or "(none)"}')
    print(f'machine: {common.machine()}; jax {jax.__version__}; one fresh process per config; '
          f'{args.steps_per_call} step(s) per call')
  if args.child:
    print('RESULT ' + json.dumps(measure(names[0], args.steps_per_call)), flush=True)
    return None
  results, plain = [], {}
  for name in names:  # each in a fresh process: nothing cached from the previous config
    for use_plain in (False, True) if args.plain_layers else (False,):
      cmd = [sys.executable, os.path.abspath(__file__), '--child', f'--configs={name}',
             f'--steps-per-call={args.steps_per_call}']
      if args.no_xla_cpu_flags:
        cmd.append('--no-xla-cpu-flags')
      if use_plain:
        cmd.append('--plain-layers')
      out = subprocess.run(cmd, capture_output=True, text=True)
      lines = [line for line in out.stdout.splitlines() if line.startswith('RESULT ')]
      if out.returncode or not lines:
        print(f'{name}: the measurement failed:\n{out.stderr[-3000:]}', flush=True)
        continue
      r = json.loads(lines[-1][len('RESULT '):])
      print(f"{name}{' (plain layers)' if use_plain else ''}: build {r['build_s']:.1f} s, "
            f"step compile {r['step_compile_s']:.1f} s, sampler compile "
            f"{r['sampler_compile_s']:.1f} s", flush=True)
      if use_plain:
        plain[name] = r
      else:
        results.append(r)
  rows = [[r['config'], 'x'.join(map(str, r['image_shape'])), r['method'],
           f"{r['step_compile_s']:.1f} ({r['step_trace_lower_s']:.1f})", r['sampler'],
           f"{r['sampler_compile_s']:.1f}", f"{r['build_s']:.1f}"] for r in results]
  header = ['config', 'image', 'method', 'step compile (s) (trace + lower)', 'sampler',
            'sampler compile (s)', 'build + init (s)']
  if plain:
    header.append("step compile, flax's layers (s): project / flax")
    for row, r in zip(rows, results):
      q = plain.get(r['config'])
      row.append(f"{q['step_compile_s']:.1f}: {r['step_compile_s'] / q['step_compile_s']:.2f}x"
                 if q else '-')
  print()
  print(common.markdown_table(header, rows))
  worst = max(r['step_compile_s'] for r in results)
  print(f'\nslowest step compile {worst:.1f} s (goal < 30 s); load average at end '
        f'{common.load_average()}')
  common.write_json(args.json, steps_per_call=args.steps_per_call, results=results,
                    plain_layers=plain)
  return results


if __name__ == '__main__':
  main()
