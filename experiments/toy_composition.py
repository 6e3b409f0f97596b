"""Composition of separately trained 2-D energy models, sampled by reverse diffusion and
annealed MCMC, judged against exact answers.

  python -m experiments.toy_composition --config=configs/toy_composition.py --workdir=runs/toy

From Python (notebooks/composition_mcmc.ipynb does): ``run(config, workdir)``.

Steps (each component model is trained once and cached in WORKDIR/components/):

1. Train one energy-parameterized MLP per component density (ring, vertical bar,
   horizontal bar, big box, small box) on exact samples of it, with the library's DSM
   training (``train.build`` + ``train.fit``).
2. For every benchmark (``cdiff_jax.toys.benchmarks``), compose its components — from the
   trained models (one vmapped call over their stacked parameters) and from the exact
   noised component densities ("oracle", which isolates the sampler's error) — as a product
   or as a (signed) mixture of normalized energies. The learned models' log-normalizers
   ``log Z_k(t)`` are computed by quadrature on a grid at every noise level: mixture
   weights mean nothing without them.
3. Sample with plain ancestral reverse diffusion and with annealed ULA / MALA / U-HMC /
   HMC, and score the samples by their mean exact log-likelihood under the composed target
   (per-sample floor of -20 nats, so a few far outliers cannot dominate) and their sliced
   Wasserstein distance to exact samples.

Outputs: WORKDIR/toy_table.{md,json}, WORKDIR/toy_<benchmark>.png (sample scatter plots),
WORKDIR/toy_acceptance.png (acceptance rate per noise level), WORKDIR/components.png and
WORKDIR/toy_samples.npz (every row's samples, under 'benchmark/components/sampler').
"""

from __future__ import annotations

import json
import os
import time

from absl import flags

from cdiff_jax import cli

_CONFIG = cli.define_config_file('config', 'configs/toy_composition.py',
                                 'Config of the toy composition experiment.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/toy', 'Output directory.')
_PROGRESS = cli.define_progress_flags()

LL_FLOOR = -20.0
# Which component density each trained model learns; benchmarks refer to these names.
COMPONENTS = ('ring', 'vertical_bar', 'horizontal_bar', 'big_box', 'small_box')
BENCHMARK_COMPONENTS = {'product': ('ring', 'vertical_bar'),
                        'mixture': ('vertical_bar', 'horizontal_bar'),
                        'negation': ('big_box', 'small_box')}


def component_densities():
  from cdiff_jax import toys
  return {'ring': toys.ring(), 'vertical_bar': toys.vertical_bar(),
          'horizontal_bar': toys.horizontal_bar(), 'big_box': toys.box(1.0),
          'small_box': toys.box(0.5)}


def validate(config):
  from cdiff_jax import config as config_lib
  from cdiff_jax.sampling import mcmc
  if not config.toy.benchmarks:  # it trained every component for a table without rows
    config_lib._fail('toy.benchmarks', tuple(config.toy.benchmarks),
                     f'name at least one of {tuple(BENCHMARK_COMPONENTS)}.')
  bad = [b for b in config.toy.benchmarks if b not in BENCHMARK_COMPONENTS]
  if bad:
    raise config_lib.ConfigError(f'config.toy.benchmarks: {bad} unknown; use some of '
                                 f'{tuple(BENCHMARK_COMPONENTS)}.')
  bad = [c for c in config.toy.components if c not in ('oracle', 'learned')]
  if bad:
    raise config_lib.ConfigError(f"config.toy.components: {bad} unknown; use 'oracle' and/or "
                                 "'learned'.")
  for field in ('toy.num_train', 'toy.num_samples', 'toy.quadrature_points'):
    config_lib._positive(config, field)
  mc = config.mcmc
  for kind in mcmc.KINDS:  # AnnealedMCMC's own checks; every kind's step size, listed or not
    try:
      mcmc.check_settings(kind, mc.steps_per_level, mc[f'{kind}_step'], mc.num_leapfrog,
                          mc.damping, has_energy=True, step_schedule=mc.step_schedule)
    except mcmc.SettingError as e:
      config_lib._fail('mcmc.' + (f'{kind}_step' if e.field == 'step_size' else e.field),
                       e.value, e.fix)
  bad = [s for s in config.mcmc.samplers if s != 'diffusion' and s not in mcmc.KINDS]
  if bad:
    raise config_lib.ConfigError(f"config.mcmc.samplers: {bad} unknown; use 'diffusion' or "
                                 f'some of {mcmc.KINDS}.')
  if 'learned' in config.toy.components and config.model.parameterization != 'energy':
    needs = [s for s in config.mcmc.samplers if s in ('mala', 'hmc')]
    if needs or any(b != 'product' for b in config.toy.benchmarks):
      raise config_lib.ConfigError(
          f"config.model.parameterization={config.model.parameterization!r}: MALA/HMC and "
          "mixtures need energies; set it to 'energy'.")


# ----------------------------------------------------------------------------- training

def components_fingerprint(config) -> dict:
  """Every field the components' training reads (a changed learning rate or EMA decay
  retrains them); the samplers' settings (toy.* but num_train, mcmc.*, sample.*) do not."""
  from cdiff_jax import config as config_lib
  out = {k: v for k, v in config_lib.computing_fields(config).items()
         if k.split('.')[0] in ('seed', 'data', 'model', 'diffusion', 'optim', 'train', 'method')}
  out['toy.num_train'] = config.toy.num_train
  return out


def train_components(config, workdir: str, progress: bool) -> tuple[dict, dict]:
  """({name: EMA params}, {name: training seconds}): each component trained, or loaded from
  WORKDIR/components/NAME.msgpack (the seconds only of those trained in this call)."""
  import flax.serialization
  import jax
  import numpy as np
  from cdiff_jax import train, writers
  from cdiff_jax.data.sources import ArrayDataset

  directory = os.path.join(workdir, 'components')
  os.makedirs(directory, exist_ok=True)
  fingerprint = components_fingerprint(config)
  densities = component_densities()
  out, timings = {}, {}
  for i, name in enumerate(COMPONENTS):
    path = os.path.join(directory, name)
    data = densities[name].sample(np.random.default_rng(1000 + i), config.toy.num_train)
    exp = train.build(config, ArrayDataset(data, np.zeros(len(data), np.int32), 1, name))
    state = exp.init_state()
    if os.path.exists(path + '.json') and json.load(open(path + '.json')) == fingerprint:
      with open(path + '.msgpack', 'rb') as f:
        out[name] = flax.serialization.from_bytes(jax.device_get(state.ema_params), f.read())
      print(f'component {name}: loaded {path}.msgpack')
      continue
    start = time.time()
    state, history = train.fit(exp, state, progress=progress)
    timings[name] = time.time() - start
    loss = float(np.mean([np.asarray(m['loss']) for m in history[-100:]]))
    print(f'component {name}: {config.train.steps} steps in {timings[name]:.0f} s, '
          f'final loss {loss:.4f}')
    out[name] = jax.device_get(state.ema_params)
    # The fingerprint goes first and comes back last: a run killed in between leaves the
    # new parameters under no fingerprint (trained again), never under the old one.
    if os.path.exists(path + '.json'):
      os.remove(path + '.json')
    writers.write_atomic(path + '.msgpack', flax.serialization.to_bytes(out[name]))
    writers.write_atomic(path + '.json', json.dumps(fingerprint))
  return out, timings


def score_model(config):
  from cdiff_jax import train
  return train.build_score_model(config, num_classes=1)


def log_normalizer_table(model, stacked, times, points: int):
  """log Z_k(t) = log int exp(-E_k(x, t)) dx by quadrature, for each level t: (T, K).

  The grid covers where the noised data can be (alpha_t * [-1.2, 1.2] widened by 5 sigma_t),
  so its spacing shrinks with the noise and resolves the sharp densities at small t.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.scipy.special import logsumexp

  @jax.jit
  def level(t):
    a, s = model.schedule.alpha(t), model.schedule.sigma(t)
    half = 1.2 * a + 5.0 * s
    g = jnp.linspace(-half, half, points)
    xx, yy = jnp.meshgrid(g, g)
    x = jnp.stack([xx.ravel(), yy.ravel()], -1)
    tt = jnp.full((x.shape[0],), t)
    energies = jax.vmap(lambda p: model.energy(p, x, tt))(stacked)      # (K, N)
    return logsumexp(-energies, axis=1) + 2 * jnp.log(g[1] - g[0])

  return np.stack([np.asarray(level(t)) for t in np.asarray(times)])


# ----------------------------------------------------------------------------- sampling

def build_potential(config, bench_name: str, source: str, params: dict):
  import jax.numpy as jnp
  import numpy as np
  from cdiff_jax import toys
  from cdiff_jax.methods import guidance

  bench = toys.benchmarks()[bench_name]
  kind = 'product' if bench.kind == 'product' else 'mixture'
  model = score_model(config)
  if source == 'oracle':
    comps = guidance.analytic_components([c.log_prob for c in bench.components], model.schedule)
    return guidance.combine(comps, kind, bench.weights), None
  stacked = guidance.stack_params([params[n] for n in BENCHMARK_COMPONENTS[bench_name]])
  comps = guidance.model_components(model)
  log_z = None
  if kind == 'mixture':
    times = np.unique(np.concatenate([np.asarray(model.schedule.time_grid(config.sample.num_steps)),
                                      [model.schedule.t_min]]))
    table = log_normalizer_table(model, stacked, times, config.toy.quadrature_points)
    t_grid, table = jnp.asarray(times), jnp.asarray(table)
    # (K,) at scalar t, interpolated between the quadrature levels.
    log_z = lambda t: jnp.stack([jnp.interp(t, t_grid, table[:, k])
                                 for k in range(table.shape[1])])
  return guidance.combine(comps, kind, bench.weights, log_normalizer=log_z), stacked


def run_sampler(config, name: str, potential, params, rng, n: int):
  import jax
  import numpy as np
  from cdiff_jax.sampling import Sampler, mcmc

  model = score_model(config)
  if name == 'diffusion':
    sampler = Sampler(mcmc.eps_fn_from_potential(potential, model.schedule), model.schedule, (2,),
                      sampler='ancestral', num_steps=config.sample.num_steps, num_chunks=1)
    return np.asarray(sampler(params, rng, n)), {}
  mc = config.mcmc
  sampler = mcmc.AnnealedMCMC(potential, model.schedule, (2,), kind=name,
                              num_steps=config.sample.num_steps,
                              steps_per_level=mc.steps_per_level, step_size=mc[f'{name}_step'],
                              step_schedule=mc.step_schedule, num_leapfrog=mc.num_leapfrog,
                              damping=mc.damping)
  x, info = sampler(params, rng, n)
  return np.asarray(x), jax.device_get(info)


def evaluate(target, samples, exact):
  import jax.numpy as jnp
  import numpy as np
  from cdiff_jax import toys
  ll = np.asarray(target.log_prob(jnp.asarray(samples, jnp.float32)))
  ll = np.where(np.isfinite(ll), ll, LL_FLOOR)
  return dict(log_likelihood=float(np.mean(np.maximum(ll, LL_FLOOR))),
              sliced_w2=toys.sliced_wasserstein(samples, exact),
              nonfinite=int(np.sum(~np.isfinite(samples).all(1))))


# ----------------------------------------------------------------------------- plots

def plot_benchmark(path, title, panels: dict, target, exact=None):
  """One row per component source, one column per sampler (first column: exact samples).

  ``panels``: {(row, column): (samples, label)}. ``target``: the exact density, or
  {column: density} when each column has its own (the components). Grey lines: contours of
  the exact log-density (so flat and sharp parts both show).
  """
  import jax.numpy as jnp
  import numpy as np
  from cdiff_jax import toys, writers

  rows = list(dict.fromkeys(r for r, _ in panels))
  cols = (['exact'] if exact is not None else []) + list(dict.fromkeys(c for _, c in panels))
  num = 150
  pts, _ = toys.grid_points(1.5, num)
  g = np.linspace(-1.5, 1.5, num)
  contours = {}   # density -> (log-density on the grid, its contour levels)

  def contour(ax, density):
    if id(density) not in contours:
      log_dens = np.asarray(density.log_prob(jnp.asarray(pts))).reshape(num, num)
      peak = np.max(log_dens[np.isfinite(log_dens)])
      contours[id(density)] = (np.where(np.isfinite(log_dens), log_dens, peak - 50),
                               peak - np.array([8.0, 4.0, 2.0, 1.0]))
    z, levels = contours[id(density)]
    ax.contour(g, g, z, levels=levels, colors='0.65', linewidths=0.5, linestyles='solid')

  fig, axes = writers.new_figure(len(rows), len(cols), squeeze=False,
                                 figsize=(2.1 * len(cols), 2.3 * len(rows) + 0.4),
                                 layout='constrained')  # titles clear of square axes
  for i, r in enumerate(rows):
    for j, c in enumerate(cols):
      ax = axes[i, j]
      contour(ax, target[c] if isinstance(target, dict) else target)
      x, label = exact if c == 'exact' else panels.get((r, c), (None, ''))
      if x is not None:
        ax.scatter(x[:1500, 0], x[:1500, 1], s=1, alpha=0.5, color='C0' if c != 'exact' else 'C2')
      ax.set_title(f'{r}: {c}\n{label}' if c != 'exact' else f'exact samples\n{label}', fontsize=7)
      ax.set_xlim(-1.5, 1.5)
      ax.set_ylim(-1.5, 1.5)
      ax.set_xticks([])
      ax.set_yticks([])
      ax.set_aspect('equal')
  fig.suptitle(title, fontsize=9)
  writers.save_figure(fig, path)


def plot_acceptance(path, curves: dict):
  """``curves``: {'benchmark/components/sampler': (times, acceptance rates)}. One colour per
  benchmark and components, one line style per sampler; the legend beside the axes."""
  import numpy as np
  from cdiff_jax import writers
  if not curves:
    return
  keys = [k.rsplit('/', 1) for k in curves]
  colors = {g: f'C{i % 10}' for i, g in enumerate(dict.fromkeys(g for g, _ in keys))}
  styles = {s: ('-', '--', ':', '-.')[i % 4]
            for i, s in enumerate(dict.fromkeys(s for _, s in keys))}
  fig, ax = writers.new_figure(figsize=(8, 3.5))
  for (group, sampler), (t, acc) in zip(keys, curves.values()):
    ax.plot(np.asarray(t), np.asarray(acc), label=f'{group}/{sampler}', lw=1,
            color=colors[group], linestyle=styles[sampler])
  ax.set_xlabel('noise level t (sampling runs from 1 to 0)')
  ax.set_ylabel('acceptance rate')
  ax.invert_xaxis()
  ax.legend(fontsize=6, loc='center left', bbox_to_anchor=(1.01, 0.5))
  writers.save_figure(fig, path)


# ----------------------------------------------------------------------------- main

def main(argv):
  del argv
  table = run(_CONFIG.value, _WORKDIR.value, _PROGRESS.value)
  print(table)
  print(f'outputs in {os.path.abspath(_WORKDIR.value)}')


def run(config, workdir: str, progress: bool = True) -> str:
  """The whole experiment (what the command runs; the notebook calls it too): trains or
  loads the components, samples every benchmark x components x sampler, writes the table,
  the samples and the plots into ``workdir``, and returns the table (markdown)."""
  import jax
  import numpy as np
  from cdiff_jax import config as config_lib
  from cdiff_jax import toys, train, writers
  from cdiff_jax.methods import guidance
  from tqdm.auto import tqdm

  workdir = os.path.abspath(workdir)
  cli.require_config(config, 'experiments.toy_composition', 'configs/toy_composition.py',
                     section='toy')
  config_lib.validate(config)  # a ConfigError is one error line (cli.run); nothing written
  validate(config)
  train.check_workdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  writers.write_atomic(os.path.join(workdir, 'config.json'),
                       config.to_json_best_effort(indent=2, sort_keys=True))
  train.setup_jax(config)  # persistent compilation cache: the 5 models share one program
  start_all = time.time()
  params, train_seconds = ({}, {})
  if 'learned' in config.toy.components:
    params, train_seconds = train_components(config, workdir, progress)

  rows, curves, n = [], {}, config.toy.num_samples
  samples = {}   # 'benchmark/components/sampler' -> the row's samples (toy_samples.npz)
  benches = toys.benchmarks()
  densities = component_densities()
  # Component check: each learned model alone, by reverse diffusion (its own quality).
  component_panels = {}
  if params:
    model = score_model(config)
    for name in COMPONENTS:
      pot = guidance.combine(guidance.model_components(model), 'product', (1.0,))
      x, _ = run_sampler(config, 'diffusion', pot, guidance.stack_params([params[name]]),
                         jax.random.key(7), n)
      exact = densities[name].sample(np.random.default_rng(3), n)
      m = evaluate(densities[name], x, exact)
      ref = evaluate(densities[name], densities[name].sample(np.random.default_rng(4), n), exact)
      rows.append(dict(benchmark=f'component {name}', components='learned', sampler='diffusion',
                       **m, exact_log_likelihood=ref['log_likelihood'],
                       exact_sliced_w2=ref['sliced_w2']))
      component_panels[('learned', name)] = (x, f"LL {m['log_likelihood']:.2f}")
      samples[f'component {name}/learned/diffusion'] = x
    plot_benchmark(os.path.join(workdir, 'components.png'), 'component models (reverse diffusion)',
                   component_panels, densities)

  jobs = [(b, s, k) for b in config.toy.benchmarks for s in config.toy.components
          for k in config.mcmc.samplers]
  bar = tqdm(total=len(jobs), desc='composing and sampling', disable=not progress)
  for bench_name in config.toy.benchmarks:
    bench = benches[bench_name]
    exact = bench.target.sample(np.random.default_rng(11), n)
    ref = evaluate(bench.target, bench.target.sample(np.random.default_rng(12), n), exact)
    panels = {}
    for source in config.toy.components:
      potential, stacked = build_potential(config, bench_name, source, params)
      for sampler_name in config.mcmc.samplers:
        t0 = time.time()
        x, info = run_sampler(config, sampler_name, potential, stacked,
                              jax.random.key(0), n)
        seconds = time.time() - t0
        m = evaluate(bench.target, x, exact)
        acc = info.get('accept_rate')
        row = dict(benchmark=bench_name, components=source, sampler=sampler_name, **m,
                   exact_log_likelihood=ref['log_likelihood'], exact_sliced_w2=ref['sliced_w2'],
                   accept_rate=None if acc is None else float(np.mean(acc)),
                   seconds=seconds)
        rows.append(row)
        key = f'{bench_name}/{source}/{sampler_name}'
        samples[key] = x
        if acc is not None:
          curves[key] = (info['times'], acc)
        panels[(source, sampler_name)] = (
            x, f"LL {m['log_likelihood']:.2f}  SW {m['sliced_w2']:.3f}")
        bar.update(1)
        bar.set_postfix(last=key)
        if not progress:
          print(f"{key}: LL {m['log_likelihood']:.3f}, "
                f"sliced W2 {m['sliced_w2']:.4f}, {seconds:.0f} s", flush=True)
    plot_benchmark(os.path.join(workdir, f'toy_{bench_name}.png'), bench.name, panels,
                   bench.target, exact=(exact, f"LL {ref['log_likelihood']:.2f}"))
    write_table(workdir, rows, config, time.time() - start_all, train_seconds)
    writers.save_arrays_atomic(os.path.join(workdir, 'toy_samples.npz'), **samples)
  bar.close()
  plot_acceptance(os.path.join(workdir, 'toy_acceptance.png'), curves)
  return write_table(workdir, rows, config, time.time() - start_all, train_seconds)


def write_table(workdir, rows, config, total, train_seconds) -> str:
  """Writes toy_table.{md,json} (after every benchmark, so a long run shows its progress)."""
  import jax
  from cdiff_jax import writers
  table = markdown_table(rows, config, total, train_seconds)
  writers.write_atomic(os.path.join(workdir, 'toy_table.md'), table)
  writers.write_atomic(os.path.join(workdir, 'toy_table.json'), json.dumps(
      dict(rows=rows, total_seconds=total, train_seconds=train_seconds,
           devices=[str(d) for d in jax.devices()]), indent=2))
  return table


def markdown_table(rows, config, total_seconds, train_seconds) -> str:
  lines = ['| benchmark | components | sampler | exact LL of samples (exact samples) | '
           'sliced W2 (exact vs exact) | acceptance |',
           '|---|---|---|---|---|---|']
  for r in rows:
    acc = '-' if r.get('accept_rate') is None else f"{r['accept_rate']:.2f}"
    lines.append(f"| {r['benchmark']} | {r['components']} | {r['sampler']} | "
                 f"{r['log_likelihood']:.3f} ({r['exact_log_likelihood']:.3f}) | "
                 f"{r['sliced_w2']:.4f} ({r['exact_sliced_w2']:.4f}) | {acc} |")
  mc = config.mcmc
  by_sigma = mc.step_schedule == 'sigma'  # 'constant': the step sizes as they are
  sq, lin = (' x sigma_t^2', ' x sigma_t') if by_sigma else ('', '')
  lines += ['', f'{config.toy.num_samples} samples per row; {config.sample.num_steps} noise levels '
            f'x {mc.steps_per_level} MCMC steps (step sizes ULA {mc.ula_step}, MALA '
            f'{mc.mala_step}{sq}; U-HMC {mc.uhmc_step}, HMC {mc.hmc_step}{lin}; '
            f'{mc.num_leapfrog} leapfrog steps, damping {mc.damping}). LL: mean exact '
            f'log-density of the samples, each floored at {LL_FLOOR:g}. '
            f'Total run time {total_seconds / 60:.1f} min'
            + (f" (training {sum(train_seconds.values()) / 60:.1f} min)" if train_seconds else '')
            + '.', '']
  return '\n'.join(lines)


if __name__ == '__main__':
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  cli.run(main)
