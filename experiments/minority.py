"""Constrained vs unconstrained training on an imbalanced dataset (the paper's Figure 1).

  python -m experiments.minority --config=configs/digits_minority.py --workdir=runs/demo

Runs two arms of the same config into WORKDIR/unconstrained and WORKDIR/constrained:

1. unconstrained: the same batches and logs, multipliers fixed at 0;
2. constrained: dual training; with threshold_mode='reference' and no reference_workdir,
   the unconstrained arm is the reference model (so b is set in the loss units of this very
   model and data).

Then writes WORKDIR/comparison.{md,json} (class frequencies, total-variation distance to
uniform, classifier FID, thresholds, final multipliers, run times) and the figures
comparison_frequencies.png, comparison_samples.png and comparison_constraints.png (the
constraint gaps of both arms over training), and prints the table. Arms already
finished in WORKDIR are reused (delete them to retrain); an interrupted arm resumes.
"""

from __future__ import annotations

import json
import os

from absl import flags

from cdiff_jax import cli

_FLAGS = {}


def _define_flags():
  """The command-line flags, defined only when this file is the program (other experiments
  and the notebook import ``run_arm`` and ``comparison_table`` with flags of their own)."""
  _FLAGS['config'] = cli.define_config_file('config', 'configs/digits_minority.py',
                                            'Config of the constrained arm.')
  _FLAGS['workdir'] = flags.DEFINE_string('workdir', 'runs/demo', 'Output directory of both arms.')
  _FLAGS['progress'] = cli.define_progress_flags()


def check_evaluated(config) -> None:
  """The experiments compare their arms by the arms' evaluations (eval.json)."""
  if not config.eval.enabled:
    from cdiff_jax.config import ConfigError
    raise ConfigError('config.eval.enabled=False: this experiment compares its arms by their '
                      'evaluation (class frequencies, classifier FID); set eval.enabled=True.')


def run_arm(config, workdir: str, progress: bool, dataset=None, unused=(),
            save_dataset: bool = False) -> dict:
  """Trains and evaluates one arm (or reuses it when finished); returns its figures.
  ``unused``: fields or sections of ``config`` the arm never reads (other values of them
  reuse a finished arm); an arm with the constrained method disabled never reads its
  ``DUAL_FIELDS`` either. ``dataset`` / ``save_dataset``: ``train.train_and_evaluate``'s
  (a finished arm that lacks its saved dataset gets it, as if it had been trained now)."""
  from cdiff_jax import parallel, train
  from cdiff_jax.methods import constrained
  check_evaluated(config)
  summary_path = os.path.join(workdir, 'summary.json')
  eval_path = os.path.join(workdir, 'eval.json')
  if os.path.exists(summary_path):
    # A finished arm answers only its own config: one finished with other steps is refused,
    # not extended (its schedule ran to its own end).
    from cdiff_jax import config as config_lib
    if config.method.name == 'constrained' and not config.method.enabled:
      unused = tuple(unused) + tuple(f'method.{f}' for f in constrained.DUAL_FIELDS)
    config_lib.check_finished_run(workdir, config, unused)
    summary = json.load(open(summary_path))
    # Its samples are read back by the experiments' figures: an arm that lost them (or its
    # eval.json) is run again, which redoes only the sampling and evaluation.
    if (summary.get('final_step') == config.train.steps and os.path.exists(eval_path)
        and os.path.exists(os.path.join(workdir, 'eval_samples.npy'))):
      print(f'{workdir}: finished earlier, reusing it.')
      if (save_dataset and dataset is not None and parallel.is_main_process()
          and not os.path.exists(os.path.join(workdir, train.TRAINING_DATA))):
        train.save_training_data(workdir, dataset)
      return dict(eval=json.load(open(eval_path)), seconds=summary.get('seconds'),
                  final_metrics=summary.get('final_metrics', {}),
                  final_extras=summary.get('final_extras', {}))
  result = train.train_and_evaluate(config, workdir, dataset=dataset, progress=progress,
                                    save_dataset=save_dataset)
  # The run's time over all its invocations (an interrupted arm resumed counts both parts).
  return dict(eval=result['eval'], seconds=result['seconds'],
              final_metrics=result.get('final_metrics', {}),
              final_extras=result.get('final_extras', {}))


def end_lambda(arm: dict) -> list:
  """The multipliers at the arm's last step (the logged ones are interval means; an arm
  finished before the end state was recorded falls back to its last record)."""
  return arm.get('final_extras', {}).get('lam', arm['final_metrics'].get('lam', []))


def _fmt(values, digits=3):
  return ', '.join(f'{v:.{digits}f}' for v in values)


def comparison_table(config, arms: dict) -> str:
  # The constrained classes: the data's minority classes, or (e.g. a long-tailed TIW-DSM
  # split, where data.minority_classes is empty) the classes the constraints are on.
  # None (fine-tuning, whose constraint is on a data source): no such column.
  minority = set(config.data.minority_classes) or set(config.method.get('constraint_classes', ()))
  freq_col = (' minority freq. (' + ', '.join(str(c) for c in sorted(minority)) + ') |'
              if minority else '')
  lines = ['| arm | TV to uniform | classifier FID |' + freq_col + ' class frequencies | '
           'lambda (end) | thresholds b | run time |',
           '|---|---|---|' + ('---|' if minority else '') + '---|---|---|---|']
  for name, arm in arms.items():
    ev, fm = arm['eval'], arm['final_metrics']
    freqs = ev['class_frequencies']
    lam = end_lambda(arm)
    thr = fm.get('threshold', [])
    seconds = arm.get('seconds')
    time_str = f'{seconds / 60:.1f} min' if seconds else '-'
    lines.append(
        f"| {name} | {ev['tv_to_uniform']:.3f} | {ev['classifier_fid']:.2f} | "
        + (f"{_fmt([freqs[c] for c in sorted(minority)])} | " if minority else '')
        + f"{_fmt(freqs, 2)} | "
        f"{_fmt(lam) if name == 'constrained' else '0 (fixed)'} | "
        f"{_fmt(thr, 4) if name == 'constrained' else '-'} | {time_str} |")
  ev = next(iter(arms.values()))['eval']
  lines.append('')
  lines.append(f"Training-set class frequencies: {_fmt(ev['training_class_frequencies'], 3)}; "
               f"{ev['num_samples']} samples per arm; evaluation classifier test accuracy "
               f"{ev['classifier_accuracy']:.4f}; classifier FID against "
               f"{ev['num_reference']} held-out real images.")
  return '\n'.join(lines)


LABEL_HEIGHT = 14  # pixels of the arm's name above its sample grid


def _labelled(grid, name: str):
  """``grid`` (uint8, H x W or H x W x C) under a white strip with ``name`` written in it."""
  import numpy as np
  from PIL import Image, ImageDraw
  header = Image.fromarray(np.full((LABEL_HEIGHT,) + grid.shape[1:], 255, np.uint8))
  ImageDraw.Draw(header).text((2, 1), name, fill='black')
  return np.concatenate([np.asarray(header), grid], axis=0)


def write_figures(workdir: str, config, arms: dict):
  import numpy as np
  from PIL import Image
  from cdiff_jax import evaluation, writers
  first = next(iter(arms.values()))['eval']
  series = {'training data': first['training_class_frequencies']}
  series.update({name: arm['eval']['class_frequencies'] for name, arm in arms.items()})
  # the TV's target: uniform over the trained classes (data.keep_classes / drop_classes)
  target = evaluation.uniform_over(first.get('uniform_over'), len(first['class_frequencies']))
  writers.plot_class_frequencies(os.path.join(workdir, 'comparison_frequencies.png'), series,
                                 target=target,
                                 title='class frequencies: training data and each arm\'s '
                                       'samples (classifier-labelled)')
  grids = [_labelled(np.asarray(Image.open(os.path.join(workdir, name, 'samples',
                                                      'eval_samples.png'))), name)
           for name in arms]
  h = max(g.shape[0] for g in grids)
  pad = [np.pad(g, ((0, h - g.shape[0]), (0, 8)) + (((0, 0),) if g.ndim == 3 else ()),
                constant_values=255) for g in grids]
  Image.fromarray(np.concatenate(pad, axis=1)).save(os.path.join(workdir, 'comparison_samples.png'))
  write_constraint_figure(workdir, config, arms)


def write_constraint_figure(workdir: str, config, arms: dict) -> str | None:
  """comparison_constraints.png: each constraint's loss over training in every arm (from its
  metrics.jsonl), against the constrained arm's threshold b_i: what the constraint held."""
  from cdiff_jax import writers
  from cdiff_jax.methods import constrained
  runs = {name: writers.read_metrics(os.path.join(workdir, name)) for name in arms}
  b = arms.get('constrained', {}).get('final_metrics', {}).get('threshold')
  return writers.plot_compared_curves(
      os.path.join(workdir, 'comparison_constraints.png'), runs, 'constraint_loss',
      constrained.constraint_names(config), thresholds=b,
      title='constraint losses over training (dashed: b)')


def unconstrained_arm(config):
  """The config of the unconstrained arm: the constrained one with lambda fixed at 0. It
  never reads a reference run, so it does not carry one (or a rerun naming another
  reference would find its finished arm "finished with another config")."""
  import copy
  unconstrained = copy.deepcopy(config)
  unconstrained.method.enabled = False
  unconstrained.method.reference_workdir = ''
  return unconstrained


def with_reference_key(constrained):
  """The constrained arm's config with ``method.reference_key``, a hash of the reference
  parameters its thresholds come from: saved with the arm's config, so a finished arm is
  not reused once its reference has been retrained or replaced (it is refused by name)."""
  import copy
  import hashlib
  from cdiff_jax import checkpoint
  from cdiff_jax.methods.constrained import reference_params
  mc = constrained.method
  if mc.threshold_mode != 'reference' or not mc.enabled:
    return constrained
  h = hashlib.sha256()
  checkpoint.hash_pytree(h, checkpoint.load_params(mc.reference_workdir, reference_params(mc)))
  keyed = copy.deepcopy(constrained)
  with keyed.unlocked():
    keyed.method.reference_key = h.hexdigest()[:16]
  return keyed


def main(argv):
  del argv
  import copy
  from cdiff_jax import train, writers
  config = _FLAGS['config'].value
  workdir = os.path.abspath(_FLAGS['workdir'].value)
  cli.require_config(config, 'experiments.minority', 'configs/digits_minority.py',
                     method='constrained')
  check_evaluated(config)

  constrained = copy.deepcopy(config)
  own_reference = (constrained.method.threshold_mode == 'reference'
                   and not constrained.method.reference_workdir)
  if own_reference:
    constrained.method.reference_workdir = os.path.join(workdir, 'unconstrained')
  # Checked now, not after the unconstrained arm's training (but for its own reference, the
  # unconstrained arm, which that training makes).
  train.validate(constrained, check_paths=not own_reference)
  train.validate(unconstrained_arm(config))  # (a wrong parallel.* must not start a cluster)
  # XLA options before anything starts the backend: the reference's parameters, read for
  # the constrained arm's key when the reference is reused, would.
  train.setup_jax(config)
  # Each arm checks its config and data before writing (train_and_evaluate): the workdir is
  # created by the first arm, not before.
  arms = {'unconstrained': run_arm(unconstrained_arm(config),
                                   os.path.join(workdir, 'unconstrained'), _FLAGS['progress'].value)}
  arms['constrained'] = run_arm(with_reference_key(constrained),
                                os.path.join(workdir, 'constrained'), _FLAGS['progress'].value)

  table = comparison_table(config, arms)
  writers.write_atomic(os.path.join(workdir, 'comparison.md'), table + '\n')
  writers.write_atomic(os.path.join(workdir, 'comparison.json'), json.dumps(
      {name: dict(eval=a['eval'], seconds=a['seconds'], lam=end_lambda(a) or None,
                  thresholds=a['final_metrics'].get('threshold'))
       for name, a in arms.items()}, indent=2))
  write_figures(workdir, config, arms)
  print('\n' + table + '\n')
  print(f'Figures: {workdir}/comparison_frequencies.png, {workdir}/comparison_samples.png, '
        f'{workdir}/comparison_constraints.png, {workdir}/constrained/lambda.png; per-arm '
        f'outputs in {workdir}/<arm>/.')


if __name__ == '__main__':
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  _define_flags()
  cli.run(main)
