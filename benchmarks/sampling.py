"""Sampling speed in one run: 100-step DDIM of cdiff_jax next to PyTorch, and the annealed
MCMC samplers (ULA, MALA, U-HMC, HMC) of an energy-parameterized model of the same size.

For each model (``--models``; see ``benchmarks/common.py``): images/s of the compiled JAX
DDIM sampler (``Sampler``, EMA parameters, ``--num-samples`` images per call) and of the
PyTorch port's DDIM loop (``torch_reference.Reference.ddim``, ``torch.no_grad``) with the
same parameters and batch, timed in alternating rounds (medians and their ratio); on CPU the
JAX sampler also without oneDNN kernels (``parallel.INFERENCE_CPU_OPTIONS``), in the same
rounds, with the largest difference between the two samplers' outputs; then, for
an energy-parameterized copy of the model (the score is an input gradient: one forward and
one backward per network evaluation), ``AnnealedMCMC`` with ``--levels`` noise levels and
``--mcmc-steps`` MCMC steps per level, reporting images/s and network evaluations per level.

Run: ``.venv/bin/python benchmarks/sampling.py --torch-python .venv-torch/bin/python``
(``make bench`` runs it with the PyTorch venv it makes).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


def time_rounds(runs: dict, repeats: int) -> dict:
  """{name: fn() -> seconds}: warm each up, then ``repeats`` alternating rounds; medians."""
  for fn in runs.values():
    fn()
  times = {k: [] for k in runs}
  for _ in range(repeats):
    for k, fn in runs.items():
      times[k].append(fn())
  return {k: common.median(v) for k, v in times.items()}


def bench_model(name: str, args, torch) -> dict:
  import jax
  import numpy as np
  from cdiff_jax.sampling import mcmc

  exp = common.build_experiment(name)
  state = exp.init_state()
  # Off the zero init of the output convs, so the samplers do real work on real numbers.
  params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(1), p.shape),
                        jax.device_get(state.ema_params))
  n, steps = args.num_samples, args.ddim_steps
  onednn = bool(args.inference_onednn)
  sampler = exp.sampler(sampler='ddim', num_steps=steps, clip=1.0, cpu_onednn=onednn)
  start = time.perf_counter()
  first = np.asarray(sampler(params, jax.random.key(0), n))
  first_s = time.perf_counter() - start

  def timer(s):
    def run():
      begin = time.perf_counter()
      jax.block_until_ready(s(params, jax.random.key(2), n))
      return time.perf_counter() - begin
    return run

  runs = {'jax_ddim': timer(sampler)}
  if onednn and jax.default_backend() == 'cpu':
    # The same sampler compiled with XLA's own kernels (parallel.INFERENCE_CPU_OPTIONS off).
    plain = exp.sampler(sampler='ddim', num_steps=steps, clip=1.0, cpu_onednn=False)
    onednn_diff = float(np.abs(first - np.asarray(plain(params, jax.random.key(0), n))).max())
    runs['jax_ddim_no_onednn'] = timer(plain)
  if torch is not None:
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, 'p.npz')
      np.savez(path, **common.flatten_params(params))
      torch('build', args=common.torch_args(exp, params_npz=path))
    runs['torch_ddim'] = lambda: torch('sample', n=n, num_steps=steps, clip=1.0)['seconds']
  med = time_rounds(runs, args.repeats)
  result = dict(model=name, image_shape=list(exp.image_shape), num_samples=n, ddim_steps=steps,
                jax_ddim_first_call_s=first_s,
                **{f'{k}_images_per_s': n / v for k, v in med.items()})
  if torch is not None:
    result['ddim_ratio'] = result['jax_ddim_images_per_s'] / result['torch_ddim_images_per_s']
  if 'jax_ddim_no_onednn' in med:
    result['onednn_speedup'] = med['jax_ddim_no_onednn'] / med['jax_ddim']
    result['onednn_max_abs_diff'] = onednn_diff
    print(f"[{name}] DDIM with oneDNN {result['jax_ddim_images_per_s']:.1f} img/s, without "
          f"{result['jax_ddim_no_onednn_images_per_s']:.1f} img/s "
          f"({result['onednn_speedup']:.2f}x); samples differ by at most {onednn_diff:.1e}")

  if args.guided:
    result.update(bench_guided(exp, params, args))

  # Annealed MCMC on an energy-parameterized model of the same architecture.
  config = common.model_config(name)
  config.model.parameterization = 'energy'
  from cdiff_jax import train
  shape = common.MODELS[name]['image_shape']
  eexp = train.build(config, common.synthetic_dataset(shape) if shape else None)
  eparams = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(1), p.shape),
                         jax.device_get(eexp.init_state().ema_params))
  potential = mcmc.potential_from_model(eexp.model)
  mruns, evals = {}, {}
  for kind in args.kinds.split(','):
    s = mcmc.AnnealedMCMC(potential, eexp.model.schedule, eexp.image_shape, kind=kind,
                          num_steps=args.levels, steps_per_level=args.mcmc_steps,
                          step_size=0.05, num_leapfrog=args.leapfrog, cpu_onednn=onednn)
    # Network evaluations (forward + input gradient) per level: the diffusion step, the
    # chain's first gradient at the new level (mcmc.run_chain), then MALA/ULA one per step,
    # HMC/U-HMC one per leapfrog step.
    per_step = args.leapfrog if kind in ('hmc', 'uhmc') else 1
    evals[kind] = 2 + args.mcmc_steps * per_step

    def run(s=s):
      begin = time.perf_counter()
      jax.block_until_ready(s(eparams, jax.random.key(3), n)[0])
      return time.perf_counter() - begin
    mruns[f'mcmc_{kind}'] = run
  med = time_rounds(mruns, max(1, args.repeats // 2))
  for k, v in med.items():
    result[f'{k}_images_per_s'] = n / v
    result[f'{k}_evals_per_level'] = evals[k[5:]]
  return result


def bench_guided(exp, params, args) -> dict:
  """Classifier-guided DDIM (a noisy ConvClassifier differentiated at every step inside
  the sampler's loop), its 3x3 convolutions traced with loop-friendly gradients or with
  XLA's own; same samples either way (checked here)."""
  import jax
  import numpy as np
  from cdiff_jax.methods import guidance
  from cdiff_jax.methods import noisy_classifier as nc
  from cdiff_jax.sampling.diffusion import Sampler
  clf = nc.NoisyClassifier(nc.build_net('conv', 10, ch=32, ch_mult=(1, 2)), 10)
  clf_params = clf.init(jax.random.key(4), exp.image_shape)
  gparams = dict(model=params, classifier=clf_params)
  n, steps = args.num_samples, args.ddim_steps
  labels = jax.numpy.arange(n) % 10
  samplers = {
      name: Sampler(guidance.classifier_guided_eps_fn(exp.eps_fn, clf, exp.model.schedule, 2.0,
                                                      loop_friendly_grads=friendly),
                    exp.model.schedule, exp.image_shape, 'ddim', steps, clip=1.0)
      for name, friendly in (('guided_xla_grads', False), ('guided_loop_friendly', True))}
  out = {k: np.asarray(s(gparams, jax.random.key(5), n, labels)) for k, s in samplers.items()}
  diff = float(np.abs(out['guided_xla_grads'] - out['guided_loop_friendly']).max())

  def timer(s):
    def run():
      begin = time.perf_counter()
      jax.block_until_ready(s(gparams, jax.random.key(6), n, labels))
      return time.perf_counter() - begin
    return run
  med = time_rounds({k: timer(s) for k, s in samplers.items()}, max(1, args.repeats // 2))
  result = {f'{k}_images_per_s': n / v for k, v in med.items()}
  result['guided_speedup'] = med['guided_xla_grads'] / med['guided_loop_friendly']
  result['guided_max_abs_diff'] = diff
  print(f"classifier-guided DDIM-{steps}: XLA's gradients "
        f"{result['guided_xla_grads_images_per_s']:.1f} img/s, loop-friendly "
        f"{result['guided_loop_friendly_images_per_s']:.1f} img/s "
        f"({result['guided_speedup']:.2f}x); samples differ by at most {diff:.1e}")
  return result


def main(argv=None):
  p = common.base_parser(__doc__.split('\n')[0])
  p.add_argument('--num-samples', type=int, default=64)
  p.add_argument('--ddim-steps', type=int, default=100)
  p.add_argument('--levels', type=int, default=100, help='MCMC: noise levels')
  p.add_argument('--mcmc-steps', type=int, default=2, help='MCMC: steps per level')
  p.add_argument('--leapfrog', type=int, default=3, help='HMC/U-HMC: leapfrog steps')
  p.add_argument('--kinds', default='ula,mala,uhmc,hmc')
  p.add_argument('--inference-onednn', type=int, default=1,
                 help="1: the samplers as shipped (on CPU compiled with oneDNN, "
                      "parallel.INFERENCE_CPU_OPTIONS; DDIM is also timed without it); 0: XLA's "
                      'own kernels for all')
  p.add_argument('--guided', action='store_true',
                 help="also time classifier-guided DDIM, loop-friendly vs XLA's gradients")
  args = p.parse_args(argv)
  torch = common.start(args)
  results = [bench_model(m, args, torch) for m in args.models.split(',')]
  if torch is not None:
    torch.close()
  kinds = args.kinds.split(',')
  header = ['model', f'JAX DDIM-{args.ddim_steps} img/s', 'PyTorch img/s', 'JAX / PyTorch',
            'JAX without oneDNN img/s'] + [
      f'{k.upper()} img/s ({args.levels}x{args.mcmc_steps})' for k in kinds]
  rows = []
  for r in results:
    rows.append([f"{r['model']} ({'x'.join(map(str, r['image_shape']))})",
                 f"{r['jax_ddim_images_per_s']:.1f}",
                 f"{r['torch_ddim_images_per_s']:.1f}" if 'torch_ddim_images_per_s' in r else '-',
                 f"{r['ddim_ratio']:.2f}x" if 'ddim_ratio' in r else '-',
                 f"{r['jax_ddim_no_onednn_images_per_s']:.1f}"
                 if 'jax_ddim_no_onednn_images_per_s' in r else '-']
                + [f"{r[f'mcmc_{k}_images_per_s']:.1f}" for k in kinds])
  print()
  print(common.markdown_table(header, rows))
  print(f'\nmachine: {common.machine()}; batch {args.num_samples}; DDIM: medians of '
        f'{args.repeats} alternating rounds, MCMC and guided samplers: of '
        f'{max(1, args.repeats // 2)}; load average at end {common.load_average()}')
  common.write_json(args.json, results=results)
  return results


if __name__ == '__main__':
  main()
