"""Guidance and composition on the embedded 8x8 digits, measured by the evaluation classifier.

  python -m experiments.digits_guidance --config=configs/digits_cfg.py --workdir=runs/digits_guidance

1. Trains the class-conditional model of the config (label dropout to a null class) with
   ``train.train_and_evaluate`` in WORKDIR/model (a finished run there is reused).
2. Samples, with the config's sampler, ``guidance.num_samples`` images per setting:
   * unconditional (the null class);
   * conditional with classifier-free guidance ``eps_u + w (eps_c - eps_u)`` for each
     ``w`` in ``guidance.cfg_scales`` (labels spread evenly over the classes);
   * "any digit but N" (``N = guidance.not_class``): the composition
     ``eps_u - w (eps_N - eps_u)`` (ANY as the positive concept, N with weight ``-w``),
     all conditions in one batched call;
   * the exact "any digit but N" for comparison: the conditional model (w = 1) with its
     labels spread evenly over the other classes;
   * classifier guidance of the unconditional model, ``eps_u - w sigma_t grad log p(y|x_t, t)``,
     with a noise-aware classifier trained here on noised digits.
3. Labels every sample with the evaluation classifier (trained once on the real balanced
   training set and cached) and writes WORKDIR/guidance.{md,json} (class frequencies, hit
   rate of the requested class, TV to uniform and classifier FID, both over the setting's
   target classes: every class, or for "any digit but N" the others, whose held-out images
   are then the FID's reference), WORKDIR/frequencies.png and one sample
   grid per setting under WORKDIR/grids/ (conditional grids: one column per class), and
   every setting's samples as WORKDIR/samples/<setting>.npy (conditional settings: sample
   i requested class i mod k).
"""

from __future__ import annotations

import json
import os
import time

from absl import flags

from cdiff_jax import cli

_CONFIG = cli.define_config_file('config', 'configs/digits_cfg.py',
                                 'Config of the class-conditional model.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/digits_guidance', 'Output directory.')
_PROGRESS = cli.define_progress_flags()


def validate(config, trained) -> None:
  """``trained``: the classes the model trains on (all the data's, unless
  ``data.keep_classes`` / ``drop_classes`` remove some)."""
  from cdiff_jax import config as config_lib
  from cdiff_jax.config import ConfigError
  g = config.guidance
  if not config.model.conditional or config.model.class_dropout <= 0:
    raise ConfigError('config.model.conditional/class_dropout: guidance needs a conditional model '
                      'trained with label dropout; set model.conditional=True and '
                      'model.class_dropout=0.1.')
  trained = [int(c) for c in trained]
  if g.not_class not in trained:
    raise ConfigError(f'config.guidance.not_class={g.not_class}: must be a class the model '
                      f'trains on ({",".join(map(str, trained))}).')
  if len(trained) < 2:
    raise ConfigError(f'config.data: the model trains on class {trained[0]} only; "any digit '
                      f'but {g.not_class}" needs another (data.keep_classes / drop_classes).')
  config_lib._positive(config, 'guidance.classifier_steps')  # checked before the training
  if g.num_samples < len(trained):
    raise ConfigError(f'config.guidance.num_samples={g.num_samples}: need at least one sample '
                      f'per class ({len(trained)}).')


def train_model(config, workdir: str, progress: bool):
  """The trained conditional model (the run in WORKDIR/model, resumed or reused)."""
  from cdiff_jax import train
  model_dir = os.path.join(workdir, 'model')
  summary_path = os.path.join(model_dir, 'summary.json')
  if os.path.exists(summary_path):  # finished earlier
    from cdiff_jax import config as config_lib
    # Not the answer for another config; one with other steps is refused, not extended.
    # The guidance section is read only by the evaluations after training.
    config_lib.check_finished_run(model_dir, config, unused=('guidance',))
    summary = json.load(open(summary_path))
    if summary.get('final_step') == config.train.steps:
      exp, state = train.load_run(model_dir, config=config)
      print(f'model: reusing the finished run in {model_dir}')
      return exp, state, summary.get('seconds')  # None: a run older than the record
  result = train.train_and_evaluate(config, model_dir, progress=progress)
  return result['experiment'], result['state'], result['seconds']  # every invocation's part


def main(argv):
  del argv
  import jax
  import numpy as np
  from cdiff_jax import evaluation, train, writers
  from cdiff_jax.methods import guidance
  from cdiff_jax.sampling import Sampler

  config = _CONFIG.value
  cli.require_config(config, 'experiments.digits_guidance', 'configs/digits_cfg.py',
                     section='guidance')
  workdir = os.path.abspath(_WORKDIR.value)
  progress = _PROGRESS.value
  # Checked before training, so a bad guidance field costs no training run; a ConfigError
  # is one error line (cli.run).
  full = train.load_training_data(config.data)
  validate(config, np.unique(full.labels[train.train_indices(config.data, full)]))
  train.check_workdir(workdir)
  for sub in ('grids', 'samples'):
    os.makedirs(os.path.join(workdir, sub), exist_ok=True)
  train.setup_jax(config)
  exp, state, train_seconds = train_model(config, workdir, progress)
  t_start = time.time()
  g = config.guidance
  model, sched, k = exp.model, exp.model.schedule, exp.num_classes
  params = state.ema_params if config.sample.use_ema else state.params
  sc = config.sample
  sampler_kw = dict(sampler=sc.sampler, num_steps=sc.num_steps, eta=sc.eta,
                    clip=sc.clip or None, mesh=exp.mesh)
  make = lambda eps_fn: Sampler(eps_fn, sched, exp.image_shape, **sampler_kw)
  n = g.num_samples
  trained = [int(c) for c in exp.sample_classes]
  per_class = lambda start, m: exp.sample_labels(m, offset=start)   # the trained classes in turn
  requested_all = np.asarray(per_class(0, n))
  every = None if len(trained) == k else trained   # the target of the settings of every class

  print('evaluation classifier (trained once, cached)...')
  clf = evaluation.classifier_for(config, progress=progress)

  # name -> (samples, requested labels or None, description, target classes or None: all)
  settings = {}
  others = [c for c in trained if c != g.not_class]   # the target of "any digit but N"
  t0 = time.time()
  # n samples in batches of 500 (padded to the mesh's devices), cond_fn(start, m) each.
  draw = lambda sampler, params, cond_fn, seed: evaluation.sample_in_batches(
      sampler, params, n, cond_fn, seed, 500, exp.mesh.devices.size, progress)
  settings['unconditional'] = (draw(make(guidance.cfg_eps_fn(model, 1.0, k)), params,
                                    lambda s, m: None, 1), None, 'null class', every)
  for w in g.cfg_scales:
    x = draw(make(guidance.cfg_eps_fn(model, w, k)), params, per_class, 2)
    settings[f'CFG w={w:g}'] = (x, requested_all, f'eps_u + {w:g} (eps_c - eps_u)', every)
  composed = make(guidance.composed_eps_fn(model, k))  # the weights are inputs: one compile
  for w in g.not_scales:
    cond = lambda s, m, w=w: guidance.make_composition((guidance.ANY, g.not_class), (1.0, -w),
                                                       m, k, field='guidance')
    x = draw(composed, params, cond, 3)
    settings[f'NOT {g.not_class} w={w:g}'] = (
        x, None, f'eps_u - {w:g} (eps_{g.not_class} - eps_u)', others)
  # What NOT approximates, drawn exactly: the conditional model, labels over the other classes.
  in_turn = lambda s, m: exp.sample_labels(m, offset=s, classes=others)
  complement = np.asarray(in_turn(0, n))
  x = draw(make(guidance.cfg_eps_fn(model, 1.0, k)), params, in_turn, 5)
  settings[complement_setting(g.not_class)] = (x, complement, 'eps_c, c != '
                                               f'{g.not_class} in turn', others)
  sampling_seconds = time.time() - t0

  t0 = time.time()
  print('noise-aware classifier for classifier guidance...')
  clf_net, clf_params, clf_metrics = guidance.train_guidance_classifier(
      exp.dataset.subset(exp.train_idx), sched, steps=g.classifier_steps, seed=config.seed,
      progress=progress)
  classifier_train_seconds = time.time() - t0
  t0 = time.time()
  for w in g.classifier_scales:
    eps_fn = guidance.classifier_guided_eps_fn(guidance.cfg_eps_fn(model, 1.0, k), clf_net,
                                               sched, w)
    x = draw(make(eps_fn), dict(model=params, classifier=clf_params), per_class, 4)
    settings[f'classifier guidance w={w:g}'] = (
        x, requested_all, f'eps_u - {w:g} sigma_t grad log p(y|x_t)', every)
  sampling_seconds += time.time() - t0

  rows = {}
  for name, (x, requested, formula, classes) in settings.items():
    # Against the setting's target: uniform over its classes, and their held-out images.
    ev = evaluation.evaluate_images(exp, x, classes)
    pred = clf.predict(x)
    row = dict(formula=formula, class_frequencies=ev['class_frequencies'],
               tv_to_uniform=ev['tv_to_uniform'], classifier_fid=ev['classifier_fid'],
               num_samples=ev['num_samples'], target_classes=ev.get('uniform_over'))
    if requested is not None:
      row['hit_rate'] = float(np.mean(pred == requested))
      row['per_class_hit_rate'] = [float(np.mean(pred[requested == c] == c))
                                   if np.any(requested == c) else None for c in range(k)]
    rows[name] = row
    # Conditional settings cycle their target classes, so each grid column is one class.
    file_name = name.replace(' ', '_')
    ncols = None if requested is None else k if classes is None else len(classes)
    writers.save_image_grid(os.path.join(workdir, 'grids', file_name + '.png'), x[:100],
                            ncols=ncols)
    # Every sample (sample i of a conditional setting requested the (i mod m)-th of its m
    # target classes), so the figures can be recomputed or relabelled with another classifier.
    writers.save_arrays_atomic(os.path.join(workdir, 'samples', file_name + '.npy'), x)

  writers.plot_class_frequencies(
      os.path.join(workdir, 'frequencies.png'),
      {name: r['class_frequencies'] for name, r in rows.items()
       if name in ('unconditional', complement_setting(g.not_class)) or name.startswith('NOT')},
      target=evaluation.uniform_over(others, k),   # what "any digit but N" asks for
      title=f'class frequencies (evaluation classifier): unconditional vs '
            f'"any digit but {g.not_class}"')
  # The model's training over all its invocations, then this invocation's guidance work.
  total = None if train_seconds is None else train_seconds + time.time() - t_start
  meta = dict(evaluation_classifier_accuracy=clf.accuracy,
              guidance_classifier=clf_metrics, sampler=sc.sampler, num_steps=sc.num_steps,
              train_seconds=train_seconds, classifier_train_seconds=classifier_train_seconds,
              sampling_seconds=sampling_seconds, total_seconds=total,
              devices=[str(d) for d in jax.devices()])
  table = markdown(rows, meta, g.not_class)
  writers.write_atomic(os.path.join(workdir, 'guidance.md'), table)
  writers.write_atomic(os.path.join(workdir, 'guidance.json'),
                       json.dumps(dict(settings=rows, **meta), indent=2))
  print(table)
  print(f'outputs in {workdir}')


def complement_setting(not_class: int) -> str:
  """The name of the setting that draws "any digit but ``not_class``" exactly."""
  return f'CFG w=1 on the classes but {not_class}'


def markdown(rows: dict, meta: dict, not_class: int) -> str:
  lines = ['| setting | hit rate of requested class | frequency of ' + str(not_class) +
           ' | TV to uniform | class frequencies 0..9 | classifier FID |',
           '|---|---|---|---|---|---|']
  for name, r in rows.items():
    hit = f"{r['hit_rate']:.3f}" if 'hit_rate' in r else '-'
    freqs = ' '.join(f'{v:.2f}' for v in r['class_frequencies'])
    lines.append(f"| {name} | {hit} | {r['class_frequencies'][not_class]:.3f} | "
                 f"{r['tv_to_uniform']:.3f} | {freqs} | {r['classifier_fid']:.2f} |")
  gc = meta['guidance_classifier']
  minutes = lambda s: '-' if s is None else f'{s / 60:.1f} min'
  lines += ['', f'TV to uniform and classifier FID are over each setting\'s target classes: '
            f'all, or for NOT {not_class} and the classes but {not_class} the other classes '
            f'(uniform over them, and their held-out images as the FID\'s reference).',
            '', f"{rows[next(iter(rows))]['num_samples']} samples per setting, "
            f"{meta['sampler']} sampler with {meta['num_steps']} steps. Evaluation classifier "
            f"test accuracy {meta['evaluation_classifier_accuracy']:.4f}; the guidance "
            f"classifier's accuracy on noised training digits (all t) "
            f"{gc.get('accuracy', float('nan')):.3f}. Run time {minutes(meta['total_seconds'])} "
            f"(model training {minutes(meta['train_seconds'])}, guidance classifier "
            f"{minutes(meta['classifier_train_seconds'])}, sampling "
            f"{minutes(meta['sampling_seconds'])}).", '']
  return '\n'.join(lines)


if __name__ == '__main__':
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  cli.run(main)
