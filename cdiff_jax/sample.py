"""Samples from a trained run: ``python -m cdiff_jax.sample --workdir=RUN``.

Draws ``--num_samples`` images from the newest checkpoint of a run of the launcher or of an
experiment's arm (e.g. ``runs/demo/constrained``), with the run's sampler unless a flag
changes it, and writes a PNG grid and an ``.npz`` (``images`` in [-1, 1], NHWC; ``labels``
of a class-conditional model's draw, not of a ``--compose``; ``predicted`` by the
evaluation classifier with ``--evaluate``)::

  python -m cdiff_jax.sample --workdir=runs/demo/constrained --num_samples=100 --evaluate
  python -m cdiff_jax.sample --workdir=runs/digits_cfg --classes=4,5,7 --guidance_scale=3
  python -m cdiff_jax.sample --workdir=runs/digits_cfg --compose=any:1,1:-3 --evaluate

``--classes`` picks the labels of a class-conditional model (cycled in the order given;
default: every class it was trained on), ``--guidance_scale`` / ``--sampler`` /
``--num_steps`` / ``--eta`` override the run's ``config.sample``. ``--compose`` samples an
AND/NOT composition of such a model's classes instead of one class per sample:
``CLASS:WEIGHT`` pairs, ``CLASS`` a trained class or ``any`` (the unconditional, null-class
model), ``eps = eps_u + sum_k w_k (eps_k - eps_u)`` (``guidance.composed_eps_fn``), e.g.
``any:1,1:-3`` "any digit but 1", ``4:1,7:1`` "4 AND 7", ``4:3`` guidance towards 4 at
weight 3. ``--mcmc=ula|mala|uhmc|hmc`` samples with annealed MCMC instead (``--num_steps``
levels, ``--steps_per_level``, ``--step_size``, ``--num_leapfrog``, ``--damping``; MALA and
HMC need an energy-parameterized model and print their acceptance rates), over the
composed potential with ``--compose``. ``--evaluate`` labels the samples with the run's
evaluation classifier (trained and cached on first use, as for the run's evaluation) and
prints and saves (``.json``) their class frequencies, TV to uniform over the classes asked
for (default: those trained; with ``--compose``, its positive classes, or all trained
classes if ``any`` is among them, less the negated ones) and classifier FID against
held-out images of those classes. The same seed gives the same images: ``--seed=1234`` (the
run's ``evaluation.EVAL_SEED``) with ``--num_samples`` at its ``eval.num_samples`` redraws
the samples of its ``eval.json``, and ``--evaluate`` then gives the same figures.
The run's data must be readable (as for ``train.load_run``); the run is read, not changed:
the only files written are the grid and the ``.npz`` / ``.json`` beside it (by default in
``RUN/samples/``). Exit status 2 with one ``error:`` line on bad input.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import tempfile

import numpy as np
from absl import app, flags
from absl import logging as absl_logging

from cdiff_jax import cli

_FLAGS = {}


def _define_flags():
  """The command-line flags, defined only when this file is the program (code that imports
  ``draw`` keeps its own flags)."""
  d = _FLAGS
  d['workdir'] = flags.DEFINE_string('workdir', None, 'Workdir of a trained run (holds '
                                     'config.json and checkpoints/).')
  d['num_samples'] = flags.DEFINE_integer('num_samples', 64, 'How many images.')
  d['seed'] = flags.DEFINE_integer('seed', 0, 'Random seed of the samples.')
  d['classes'] = flags.DEFINE_list('classes', [], 'Labels for a class-conditional model, '
                                   'cycled (default: the classes it was trained on).')
  d['guidance_scale'] = flags.DEFINE_float('guidance_scale', None, 'Classifier-free guidance '
                                           'weight (default: the run\'s sample.guidance_scale).')
  d['sampler'] = flags.DEFINE_string('sampler', None, 'ancestral | ddim | euler_maruyama | '
                                     'heun (default: the run\'s).')
  d['num_steps'] = flags.DEFINE_integer('num_steps', None, 'Sampling steps (default: the '
                                        'run\'s).')
  d['eta'] = flags.DEFINE_float('eta', None, 'DDIM eta (default: the run\'s).')
  d['out'] = flags.DEFINE_string('out', None, 'PNG path; the .npz goes beside it '
                                 '(default: WORKDIR/samples/drawn_seed{seed}.png).')
  d['evaluate'] = flags.DEFINE_bool('evaluate', False, 'Label the samples with the run\'s '
                                    'evaluation classifier; print and save class '
                                    'frequencies, TV to uniform and classifier FID.')
  d['compose'] = flags.DEFINE_list('compose', [], 'AND/NOT of a class-conditional model\'s '
                                   'classes, as CLASS:WEIGHT pairs (CLASS a class or "any", '
                                   'the unconditional model): eps_u + sum_k w_k (eps_k - '
                                   'eps_u). E.g. any:1,1:-3 (any digit but 1), 4:1,7:1.')
  d['mcmc'] = flags.DEFINE_enum('mcmc', None, ['ula', 'mala', 'uhmc', 'hmc'], 'Annealed '
                                 'MCMC instead of the run\'s sampler: reverse diffusion over '
                                 'num_steps levels with MCMC steps at each.')
  d['steps_per_level'] = flags.DEFINE_integer('steps_per_level', 2, 'MCMC steps per level.')
  d['step_size'] = flags.DEFINE_float('step_size', 0.05, 'MCMC step size at sigma = 1 '
                                      '(scaled with sigma^2 for ULA/MALA, sigma for U-HMC/HMC).')
  d['num_leapfrog'] = flags.DEFINE_integer('num_leapfrog', 3, 'Leapfrog steps (U-HMC, HMC).')
  d['damping'] = flags.DEFINE_float('damping', 0.5, 'Momentum refresh of U-HMC / HMC, in '
                                    '(0, 1].')
  d['progress'] = cli.define_progress_flags()


SAMPLE_FIELDS = ('guidance_scale', 'sampler', 'num_steps', 'eta')
MCMC_FIELDS = ('kind', 'steps_per_level', 'step_size', 'num_leapfrog', 'damping')


def _why_no_guidance(config) -> str | None:
  """``config.no_guidance`` as the end of a sentence 'the run in WORKDIR ...'."""
  from cdiff_jax import config as config_lib
  return {'unconditional': 'trained an unconditional model',
          'no null class': 'never trained the null class (model.class_dropout=0)',
          None: None}[config_lib.no_guidance(config.model)]


def _run_config(workdir: str, **sample_overrides):
  """The run's config with ``config.sample`` overrides, set up to sample in this process."""
  from cdiff_jax import config as config_lib
  from cdiff_jax import train
  if not os.path.isdir(workdir):
    raise config_lib.ConfigError(f'--workdir={workdir}: no such folder; give the workdir '
                                 'of a trained run.')
  if not os.path.exists(os.path.join(workdir, 'config.json')):
    runs = sorted(d for d in os.listdir(workdir)
                  if os.path.exists(os.path.join(workdir, d, 'config.json')))
    if not runs:  # tiw_compare's arms sit one level further down (ref0.1/tiw_dsm)
      runs = sorted(os.path.join(d, e) for d in os.listdir(workdir)
                    if os.path.isdir(os.path.join(workdir, d))
                    for e in os.listdir(os.path.join(workdir, d))
                    if os.path.exists(os.path.join(workdir, d, e, 'config.json')))
    hint = (f'it holds the runs {", ".join(runs)} (an experiment\'s arms); give one of '
            f'them, e.g. --workdir={os.path.join(workdir, runs[0])}' if runs else
            'give the folder the launcher or an experiment wrote a run to')
    raise config_lib.ConfigError(f'--workdir={workdir} holds no config.json, so it is not '
                                 f'the workdir of a run: {hint}.')
  config = train.load_config(workdir)
  if config.data.name == 'toy':
    raise config_lib.ConfigError(
        f'--workdir={workdir} holds experiments/toy_composition.py\'s 2-D components, not a '
        'run of images: load them with toy_composition.train_components(train.load_config('
        'DIR), DIR, False)[0] (notebooks/composition_mcmc.ipynb samples and plots them).')
  for field, value in sample_overrides.items():
    if field not in SAMPLE_FIELDS:
      raise TypeError(f'unknown sampling override {field!r}; one of {SAMPLE_FIELDS}.')
    if value is not None:
      config.sample[field] = value
  if sample_overrides.get('eta') is not None and config.sample.sampler != 'ddim':
    raise config_lib.ConfigError(f'--eta={sample_overrides["eta"]}: read only by the DDIM '
                                 f'sampler, and this draw uses {config.sample.sampler!r}; add '
                                 '--sampler=ddim, or drop --eta.')
  w = config.sample.get('guidance_scale', 1.0)
  if w != 1.0 and (why := _why_no_guidance(config)):
    raise config_lib.ConfigError(f'--guidance_scale={w}: the run in {workdir} {why}, so it '
                                 'has no classifier-free guidance; drop --guidance_scale.')
  # One process, the devices it sees: the run may have been trained on a cluster.
  config.train.num_devices = 0
  if 'parallel' in config:
    config.parallel.distributed = False
  return config


def _library_forms(classes, compose):
  """``draw``'s ``classes`` and ``compose`` also as the command line gives them: one class
  as an int, the composition as ``--compose``'s text; a string of classes is refused ('45'
  would be the classes 4 and 5)."""
  from cdiff_jax import config as config_lib
  if isinstance(classes, str):
    raise config_lib.ConfigError(f'classes={classes!r}: give a list of class indices, e.g. '
                                 '[4, 5, 7] (or one int).')
  classes = [classes] if isinstance(classes, (int, np.integer)) else classes
  compose = parse_compose(compose.split(',')) if isinstance(compose, str) else compose
  return classes, compose


def draw(workdir: str, num_samples: int = 64, seed: int = 0, classes=None,
         progress: bool = False, mcmc: dict | None = None, compose: dict | None = None,
         **sample_overrides) -> dict:
  """``num_samples`` samples of the run in ``workdir`` (EMA parameters unless its config
  says ``sample.use_ema=False``): ``{'images', 'labels', 'exp', 'state', 'info'}`` (labels
  None for an unconditional model; ``info`` as below, None for the diffusion samplers).
  ``classes``: labels of a conditional model (a list, or one int), cycled in the given
  order (default: its trained classes); ``sample_overrides``: any of ``SAMPLE_FIELDS``
  (None keeps the run's). ``mcmc``: ``{'kind': 'ula' | 'mala' | 'uhmc' | 'hmc', ...}`` (the
  other ``MCMC_FIELDS`` as ``mcmc.AnnealedMCMC`` takes them) samples with annealed MCMC
  over ``sample.num_steps`` levels instead (``info``: its step sizes and, for MALA / HMC,
  acceptance rates per level). ``compose``: ``{'concepts': [class or guidance.ANY, ...],
  'weights': [...]}`` or the ``--compose`` text (``'any:1,1:-3'``), an AND/NOT composition
  of a conditional model's classes sampled instead of ``classes`` (labels None), with the
  run's sampler or ``mcmc``. Raises ``ConfigError`` on bad input."""
  from cdiff_jax import config as config_lib
  from cdiff_jax import evaluation, train
  from cdiff_jax.methods import guidance
  if num_samples < 1:
    raise config_lib.ConfigError(f'--num_samples={num_samples}: give a positive number.')
  classes, compose = _library_forms(classes, compose)
  config = _run_config(workdir, **sample_overrides)
  classes = [int(c) for c in classes] if classes is not None and len(classes) else None
  if classes and not config.model.conditional:
    raise config_lib.ConfigError(f'--classes={",".join(map(str, classes))}: the run in '
                                 f'{workdir} trained an unconditional model; drop --classes.')
  given_guidance = sample_overrides.get('guidance_scale') is not None
  if compose is not None:
    _check_compose(compose, config, workdir, classes, given_guidance)
  if mcmc is not None:
    _check_mcmc(mcmc, config, given_guidance, composed=compose is not None)
  try:
    train.setup_jax(config)
    exp, state = train.load_run(workdir, config=config)
  except FileNotFoundError as e:  # no checkpoint (yet): the message says what to do
    raise config_lib.ConfigError(f'--workdir={workdir}: {e}') from e
  except config_lib.ConfigError as e:  # a sampling override the config checks refuse
    msg = str(e)
    for field, value in sample_overrides.items():
      if value is not None and msg.startswith(f'config.sample.{field}='):
        raise config_lib.ConfigError(f'--{field}={value}: {msg.split(": ", 1)[-1]}') from e
    raise
  trained = [int(c) for c in exp.sample_classes]
  for flag, asked in (('classes', classes), ('compose', compose and compose['concepts'])):
    # (ANY, -1, is a composition's "any class" concept, not a class of --classes.)
    if untrained := [c for c in asked or ()
                     if c not in trained and not (flag == 'compose' and c == guidance.ANY)]:
      raise config_lib.ConfigError(
          f'--{flag}: the run in {workdir} was not trained on class(es) '
          f'{",".join(map(str, untrained))}; it knows {",".join(map(str, trained))}.')
  cond_fn = None  # n -> the sampler's cond for n samples, in place of their labels
  if compose is not None:
    cond_fn = lambda n: guidance.make_composition(compose['concepts'], compose['weights'], n,
                                                  exp.num_classes)
    try:  # its own checks: one weight per concept, a positive one
      cond_fn(1)
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f'--compose={_compose_text(compose)}: '
                                   f'{str(e).split(": ", 1)[-1]}') from e
  labels = None if compose else exp.sample_labels(num_samples, classes=classes)
  info = None
  if mcmc is None:
    sampler = None
    if compose is not None:
      composed = exp.sampler(guidance.composed_eps_fn(exp.model, exp.num_classes))
      sampler = lambda params, rng, n, labels, progress=False: composed(
          params, rng, n, cond_fn(n), progress=progress)
    images = evaluation.generate(exp, state, num_samples, seed=seed, progress=progress,
                                 classes=classes, sampler=sampler)
  else:
    images, info = _mcmc_samples(exp, state, num_samples, seed, classes, mcmc, cond_fn)
  return dict(images=images, labels=None if labels is None else np.asarray(labels),
              exp=exp, state=state, info=info)


def parse_compose(items) -> dict:
  """``['any:1', '1:-3']`` (the ``--compose`` flag) -> ``draw``'s ``compose``."""
  from cdiff_jax import config as config_lib
  from cdiff_jax.methods import guidance
  concepts, weights = [], []
  try:
    for item in items:
      c, w = item.split(':')
      concepts.append(guidance.ANY if c.strip() == 'any' else int(c))
      weights.append(float(w))
  except ValueError:
    raise config_lib.ConfigError(
        f'--compose={",".join(items)}: give CLASS:WEIGHT pairs separated by commas, CLASS a '
        'class index or "any" (the unconditional model), e.g. --compose=any:1,1:-3 (any digit '
        'but 1) or --compose=4:1,7:1 (4 AND 7).') from None
  return dict(concepts=concepts, weights=weights)


def composition_classes(compose: dict, trained) -> list[int]:
  """The classes a composition asks for, which ``--evaluate`` measures against: its
  positive classes, or with ``any`` among them the trained classes; less the negated ones."""
  from cdiff_jax.methods import guidance
  pos = {c for c, w in zip(compose['concepts'], compose['weights']) if w > 0}
  neg = {c for c, w in zip(compose['concepts'], compose['weights']) if w < 0}
  pool = {int(c) for c in trained} if guidance.ANY in pos else pos
  return sorted(pool - neg)


def _compose_text(compose: dict) -> str:
  from cdiff_jax.methods import guidance
  return ','.join(f'{"any" if c == guidance.ANY else c}:{w:g}'
                  for c, w in zip(compose['concepts'], compose['weights']))


def _check_compose(compose: dict, config, workdir: str, classes, given_guidance: bool) -> None:
  """What a composition needs, before the run is loaded: a conditional model with a trained
  null class, and no other choice of classes or guidance weight."""
  from cdiff_jax import config as config_lib
  text = _compose_text(compose)
  if why := _why_no_guidance(config):
    if 'null class' in why:
      why += ', which every composition starts from'
    raise config_lib.ConfigError(f'--compose={text}: the run in {workdir} {why}; drop --compose.')
  for flag, given in (('classes', classes), ('guidance_scale', given_guidance)):
    if given:
      raise config_lib.ConfigError(f'--compose={text} and --{flag}: the composition sets the '
                                   f'classes and their weights; drop --{flag} (--compose=4:3 '
                                   'is class 4 at guidance weight 3).')


def _check_mcmc(mcmc: dict, config, given_guidance: bool, composed: bool = False) -> None:
  """``mcmc.check_settings`` before the run is loaded, naming the command line's flags."""
  from cdiff_jax import config as config_lib
  from cdiff_jax.sampling import mcmc as mcmc_lib
  if unknown := set(mcmc) - set(MCMC_FIELDS):
    raise TypeError(f'unknown MCMC settings {sorted(unknown)}; use {MCMC_FIELDS}.')
  settings = {name: p.default for name, p in
              inspect.signature(mcmc_lib.AnnealedMCMC).parameters.items() if name in MCMC_FIELDS}
  settings.update(mcmc)
  try:
    mcmc_lib.check_settings(**settings, has_energy=config.model.parameterization == 'energy')
  except mcmc_lib.SettingError as e:
    raise config_lib.ConfigError(f'--{"mcmc" if e.field == "kind" else e.field}={e.value}: '
                                 f'{e.fix}') from e
  if (w := config.sample.get('guidance_scale', 1.0)) != 1.0 and not composed:
    fix = ('drop --guidance_scale' if given_guidance else
           f'this run samples with sample.guidance_scale={w}: add --guidance_scale=1')
    raise config_lib.ConfigError(
        f'--mcmc={mcmc["kind"]} samples the model itself, without classifier-free guidance; '
        f'{fix}, or give the guidance as a composition (--compose=4:{w:g}: class 4 at '
        f'weight {w:g}).')


def _mcmc_samples(exp, state, num_samples: int, seed: int, classes, mcmc: dict,
                  cond_fn=None):
  """Annealed MCMC samples, batched and keyed as ``evaluation.generate`` batches and keys
  the run's sampler; ``info`` of the first batch, acceptance rates averaged over all.
  ``cond_fn``: n -> a composition's cond (``guidance.composed_potential``) for n samples."""
  import jax.numpy as jnp
  from cdiff_jax import evaluation
  from cdiff_jax.methods import guidance
  from cdiff_jax.sampling import mcmc as mcmc_lib
  sc = exp.config.sample
  settings = {k: v for k, v in mcmc.items() if k != 'kind'}
  model = exp.model
  if mcmc['kind'] in ('mala', 'hmc') and model.net.dtype != jnp.float32:
    # The Metropolis test compares energies of hundreds to thousands of nats to within a
    # fraction of a nat; a bfloat16 network rounds them by nats at low noise. The
    # parameters are float32 already, so only the computation changes.
    model = dataclasses.replace(model, net=model.net.clone(dtype=jnp.float32))
  potential = (mcmc_lib.potential_from_model(model) if cond_fn is None else
               guidance.composed_potential(model, exp.num_classes))
  sampler = mcmc_lib.AnnealedMCMC(potential, exp.model.schedule,
                                  exp.image_shape, kind=mcmc['kind'], num_steps=sc.num_steps,
                                  mesh=exp.mesh, cpu_onednn=sc.get('cpu_onednn', True),
                                  clip=sc.clip or None, **settings)
  batches = []  # (number of samples, info) of each batch

  def run(params, rng, n, labels, progress=False):
    x, info = sampler(params, rng, n, labels if cond_fn is None else cond_fn(n))
    batches.append((n, {k: np.asarray(v) for k, v in info.items()}))
    return x

  images = evaluation.generate(exp, state, num_samples, seed=seed, classes=classes,
                               sampler=run)
  info = dict(batches[0][1])
  if 'accept_rate' in info:
    info['accept_rate'] = (sum(n * b['accept_rate'] for n, b in batches)
                           / sum(n for n, _ in batches))
  return images, info


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  from cdiff_jax import config as config_lib
  from cdiff_jax import evaluation, writers
  f = {name: flag.value for name, flag in _FLAGS.items()}
  try:
    classes = [int(c) for c in f['classes']]
  except ValueError:
    raise config_lib.ConfigError(f'--classes={",".join(f["classes"])}: give class indices '
                                 'separated by commas, e.g. --classes=4,5,7.') from None
  mcmc, steps = None, [k for k in MCMC_FIELDS if k != 'kind']
  if f['mcmc']:
    mcmc = dict(kind=f['mcmc'], **{k: f[k] for k in steps})
  given = lambda names: [n for n in names if flags.FLAGS[n].present]
  if not f['mcmc'] and (unread := given(steps)):
    raise config_lib.ConfigError(f'--{unread[0]}: an MCMC setting, read only with --mcmc; add '
                                 '--mcmc=ula|mala|uhmc|hmc, or drop it.')
  if f['mcmc'] and (unread := given(('sampler', 'eta'))):
    raise config_lib.ConfigError(f'--{unread[0]} with --mcmc={f["mcmc"]}: annealed MCMC '
                                 'replaces the run\'s sampler (its levels: --num_steps); drop '
                                 f'--{unread[0]}.')
  compose = parse_compose(f['compose']) if f['compose'] else None
  if f['evaluate'] and f['num_samples'] < 2:
    raise config_lib.ConfigError(f'--num_samples={f["num_samples"]} with --evaluate: the '
                                 'classifier FID needs at least 2 samples (1,000 give figures '
                                 'comparable with a run\'s eval.json).')
  if f['out'] is not None and not f['out'].lower().endswith('.png'):
    raise config_lib.ConfigError(f'--out={f["out"]}: give a path ending in .png (the .npz and '
                                 f'.json go beside it), e.g. --out={f["out"]}.png.')
  if f['out'] is not None:  # checked before sampling, not after
    folder = os.path.dirname(os.path.abspath(f['out']))
    try:
      os.makedirs(folder, exist_ok=True)
      tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
      raise config_lib.ConfigError(f'--out={f["out"]}: cannot write files in {folder} '
                                   f'({e.strerror}); give another path.') from e
  out = draw(f['workdir'], f['num_samples'], f['seed'], classes, progress=f['progress'],
             mcmc=mcmc, compose=compose, **{field: f[field] for field in SAMPLE_FIELDS})
  exp, images, labels = out['exp'], out['images'], out['labels']
  if out['info'] is not None and 'accept_rate' in out['info']:
    rate = out['info']['accept_rate']
    print(f'{f["mcmc"].upper()} acceptance rate: mean {rate.mean():.3f} over {len(rate)} '
          f'levels (first {rate[0]:.3f}, last {rate[-1]:.3f})')
  png = f['out'] or os.path.join(f['workdir'], 'samples', f'drawn_seed{f["seed"]}.png')
  ncols = (grid_columns(len(images), len(classes or exp.sample_classes))
           if labels is not None else None)
  writers.save_image_grid(png, images, ncols=ncols)
  arrays = dict(images=images) if labels is None else dict(images=images, labels=labels)
  stem = os.path.splitext(png)[0]
  if f['evaluate']:
    asked = classes or (compose and composition_classes(compose, exp.sample_classes)) or None
    result = evaluation.evaluate_images(exp, images, asked, progress=f['progress'])
    arrays['predicted'] = evaluation.classifier_for(exp.config).predict(images)
    if labels is not None:
      result['agreement_with_labels'] = float(np.mean(arrays['predicted'] == labels))
    if compose is not None:
      result['compose'] = _compose_text(compose)
  if os.path.exists(stem + '.json'):  # an earlier --evaluate's, of other samples
    os.remove(stem + '.json')
  # The samples before their evaluation, each whole: a .json always describes the .npz.
  writers.save_arrays_atomic(stem + '.npz', **arrays)
  if f['evaluate']:
    writers.write_atomic(stem + '.json', json.dumps(result, indent=2))
    print(_evaluation_lines(result))
  print(f'wrote {len(images)} samples of {f["workdir"]} to {png} and {stem}.npz'
        + (f' (evaluation: {stem}.json)' if f['evaluate'] else ''))


def grid_columns(n: int, k: int) -> int:
  """Columns of a grid of ``n`` samples whose labels cycle over ``k`` classes: a multiple of
  ``k`` (each column holds one class), as near square as that allows."""
  return k * max(1, round(np.sqrt(n) / k))


def _evaluation_lines(result: dict) -> str:
  over = result.get('uniform_over')
  over = 'the classes ' + ','.join(map(str, over)) if over else 'all classes'
  lines = [f'class frequencies (evaluation classifier, accuracy '
           f'{result["classifier_accuracy"]:.3f} on held-out data):',
           '  ' + ' '.join(f'{c}:{f:.3f}' for c, f in enumerate(result['class_frequencies'])),
           f'TV to uniform over {over}: {result["tv_to_uniform"]:.3f}; classifier FID '
           f'{result["classifier_fid"]:.2f} against {result["num_reference"]} held-out images']
  if 'agreement_with_labels' in result:
    lines.append(f'agreement with the labels asked for: {result["agreement_with_labels"]:.3f}')
  return '\n'.join(lines)


def run():
  _define_flags()
  flags.mark_flags_as_required(['workdir'])
  cli.run(main)


if __name__ == '__main__':
  run()
