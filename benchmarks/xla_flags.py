"""Train-step speed under XLA:CPU flag sets, against the default flags, in one run.

The baseline is XLA's own defaults (the project's ``config.train.xla_cpu_flags`` are not
applied here). Each flag set runs in its own process (XLA reads ``XLA_FLAGS`` once), builds
the same jitted train step as ``benchmarks/train_step.py`` on the same parameters and batch,
reports how far one step's loss, gradient norm and Adam moments (which hold the gradient
and its square) move from the default flags' (numerics are part of the comparison), and
times it. The default set runs first and last, so drift of the machine's speed during the
run shows up in the table.

  .venv/bin/python benchmarks/xla_flags.py --models default
  .venv/bin/python benchmarks/xla_flags.py --flags=--xla_cpu_use_onednn=true
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

# Candidate sets: the XLA:CPU options of this jaxlib that change how convolutions, dots and
# fusions are emitted. An option this jaxlib does not know makes its process fail; the
# table then says so.
CANDIDATES = [
    '--xla_cpu_experimental_ynn_fusion_type=dot',   # the project's default (parallel.py)
    '--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce',
    '--xla_cpu_use_onednn=true',
    '--xla_cpu_enable_fast_math=true',
]


def rel_diff(a: float, b: float) -> float:
  return abs(a - b) / max(abs(b), 1e-12)


def child(name: str, seconds: float, repeats: int) -> dict:
  import jax
  import numpy as np
  from benchmarks.train_step import calls_for, jax_step_runner
  from cdiff_jax import parallel
  run, per_call, info = jax_step_runner(name)
  exp = info['exp']
  # Numerics: one step from the same initial state and batch. The parameters cannot show a
  # difference: Adam's first update is lr * g / |g| elementwise, the same for nearby
  # gradients. Its moments hold g and g^2 themselves, so those are compared.
  state = exp.init_state()
  batch = parallel.put_batch(exp.batcher.batch(0), exp.mesh, 0)
  new_state, metrics = exp.step(state, batch)
  leaves = [x for x in jax.tree.leaves(jax.device_get(new_state.opt_state))
            if np.issubdtype(np.asarray(x).dtype, np.floating) and np.ndim(x)]
  checksum = [float(np.sum(np.abs(np.asarray(x, np.float64)))) for x in leaves]
  calls = calls_for(run(1), seconds)
  times = [run(calls) / calls for _ in range(repeats)]
  return dict(images_per_s=per_call / float(np.median(times)), compile_s=info['compile_s'],
              loss=float(metrics['loss']), grad_norm=float(metrics['grad_norm']),
              moment_sums=checksum)


def main(argv=None):
  p = common.base_parser(__doc__.split('\n')[0])
  p.add_argument('--flags', action='append', default=[],
                 help='an XLA_FLAGS string to compare (repeatable); default: the candidates')
  p.add_argument('--child', default='', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    print('RESULT ' + json.dumps(child(args.child, args.seconds, args.repeats)), flush=True)
    return
  flag_sets = [''] + (args.flags or CANDIDATES) + ['']
  print(f'machine: {common.machine()}')
  header = ['model', 'XLA_FLAGS', 'img/s', 'vs default', 'first compile',
            'max rel. Adam-moment diff', 'rel. loss diff', 'rel. grad-norm diff']
  rows, out = [], []
  for name in args.models.split(','):
    base = None
    for flags in flag_sets:
      env = dict(os.environ, XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') + ' ' + flags).strip())
      begin = time.perf_counter()
      proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--child', name,
                             '--seconds', str(args.seconds), '--repeats', str(args.repeats)],
                            env=env, capture_output=True, text=True)
      lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
      if proc.returncode or not lines:
        from cdiff_jax import parallel
        err = (parallel.xla_flag_error(proc.stderr) or
               (proc.stderr.strip().splitlines() or ['no output'])[-1])[:120]
        print(f'[{name}] {flags or "(default)"}: failed: {err}', flush=True)
        rows.append([name, flags or '(default)', 'failed', '-', '-', '-', err])
        continue
      r = json.loads(lines[0][len('RESULT '):])
      r.update(model=name, flags=flags, wall_s=time.perf_counter() - begin)
      if base is None:
        base = r
      rel = max(map(rel_diff, r['moment_sums'], base['moment_sums']))
      r.update(max_rel_moment_sum_diff=rel, rel_loss_diff=rel_diff(r['loss'], base['loss']),
               rel_grad_norm_diff=rel_diff(r['grad_norm'], base['grad_norm']))
      ratio = r['images_per_s'] / base['images_per_s']
      print(f'[{name}] {flags or "(default)"}: {r["images_per_s"]:.0f} img/s ({ratio:.2f}x), '
            f'compile {r["compile_s"]:.1f} s, loss {r["loss"]:.8f}, grad norm '
            f'{r["grad_norm"]:.8f}, moment diff {rel:.1e} (load {common.load_average()})',
            flush=True)
      rows.append([name, flags or '(default)', f'{r["images_per_s"]:.0f}', f'{ratio:.2f}x',
                   f'{r["compile_s"]:.1f} s', f'{rel:.1e}', f'{r["rel_loss_diff"]:.1e}',
                   f'{r["rel_grad_norm_diff"]:.1e}'])
      out.append(r)
  print()
  print(common.markdown_table(header, rows))
  common.write_json(args.json, results=out)


if __name__ == '__main__':
  main()
