"""Fine-tuning without overfitting (the paper's Figure 4).

  python -m experiments.finetune --config=configs/digits_finetune.py --workdir=runs/finetune

1. pretrain: plain DSM on the training set without the classes in
   ``finetune.pretrain_drop_classes`` (the 9s);
2. generate ``finetune.num_generated`` samples from it: the data set q_pre of the constraint;
3. a new, small data set of ``finetune.new_data_size`` training images of all classes
   (so it contains 9s) is the objective;
4. fine-tune from the pre-trained weights, twice: plain fine-tuning on the new data
   (unconstrained arm: multipliers fixed at 0) and constrained fine-tuning with
   ``KL(q_pre || p) <= b``, b set relative to the pre-trained model's own loss on q_pre;
5. evaluate both (class frequencies, classifier FID against held-out real images of all
   classes, and the mean distance of samples to their nearest new-data image, which falls
   when a model memorizes the small set) and write WORKDIR/comparison.{md,json} and figures.

Finished stages found in WORKDIR are reused; the q_pre samples only while the pre-trained
model and the sampling settings that made them are unchanged.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import numpy as np
from absl import flags

from cdiff_jax import cli

if not __package__:  # run as a file (python experiments/finetune.py): experiments.* from the root
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = cli.define_config_file('config', 'configs/digits_finetune.py', 'Fine-tuning config.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/finetune', 'Output directory.')
_PROGRESS = cli.define_progress_flags()


def validate(config, train_size: int, num_classes: int):
  """The ``finetune`` fields and the pre-training config, checked before any work: a wrong
  field costs no pre-training run, and is named as the user set it (a ConfigError is one
  error line, ``cli.run``)."""
  from cdiff_jax import config as config_lib
  from cdiff_jax import train
  fc = config.finetune
  k = config.train.steps_per_call
  if fc.pretrain_steps <= 0 or fc.pretrain_steps % k:
    config_lib._fail('finetune.pretrain_steps', fc.pretrain_steps,
                     f'must be a positive multiple of train.steps_per_call={k}.')
  config_lib._positive(config, 'finetune.pretrain_batch')
  config_lib._positive(config, 'finetune.num_generated')
  config_lib._positive(config, 'finetune.new_data_seed', allow_zero=True)
  if fc.get('pretrain_lr'):   # else the pre-training takes optim.lr
    config_lib._positive(config, 'finetune.pretrain_lr')
  drop = tuple(fc.pretrain_drop_classes)
  if not drop or any(not 0 <= c < num_classes for c in drop):
    config_lib._fail('finetune.pretrain_drop_classes', drop,
                     f'must name at least one class in 0..{num_classes - 1} (the classes the '
                     'pre-trained model never sees).')
  if not 0 < fc.new_data_size <= train_size:
    config_lib._fail('finetune.new_data_size', fc.new_data_size,
                     f'must lie in 1..{train_size} (the training set\'s size).')
  train.validate(config)
  config_lib.validate(pretrain_config(config))
  from experiments.minority import check_evaluated
  check_evaluated(config)


def pretrain_config(config):
  c = copy.deepcopy(config)
  fc = config.finetune
  c.method = type(config.method)(dict(name='dsm'))
  c.data.drop_classes = tuple(fc.pretrain_drop_classes)
  c.train.steps = fc.pretrain_steps
  c.train.batch_size = fc.pretrain_batch
  if fc.get('pretrain_lr'):  # pre-training from scratch may want a larger rate than fine-tuning
    c.optim.lr = fc.pretrain_lr
  c.train.init_from = ''
  c.eval.enabled = True
  return c


def pretrain(config, workdir: str, progress: bool):
  """Step 1: (its config, its workdir WORKDIR/pretrained, its figures), trained or reused.
  Its finetune fields are copied into the config's own; the others (q_pre, the new data)
  are read only by the later steps, so other values of them reuse the finished run."""
  from experiments.minority import run_arm
  pre_cfg, pre_dir = pretrain_config(config), os.path.join(workdir, 'pretrained')
  return pre_cfg, pre_dir, run_arm(pre_cfg, pre_dir, progress, unused=('finetune',))


def samples_key(params, pre_cfg, fc) -> str:
  """Identifies the q_pre samples: the pre-trained parameters (by value), the sampler and
  the evaluation classifier that labels them, their number and seed."""
  import hashlib
  from cdiff_jax import checkpoint
  h = hashlib.sha256()
  checkpoint.hash_pytree(h, params)
  h.update(json.dumps([pre_cfg.sample.to_dict(), pre_cfg.eval.to_dict(), fc.num_generated,
                       fc.new_data_seed], sort_keys=True, default=str).encode())
  return h.hexdigest()


def build_finetune_dataset(config, full, generated: np.ndarray, generated_labels: np.ndarray):
  """New small data (source 0) drawn from the training set ``full`` + the pre-trained
  model's samples (source 1)."""
  from cdiff_jax.data import sources
  rng = np.random.default_rng(config.finetune.new_data_seed)
  new_idx = np.sort(rng.choice(len(full), config.finetune.new_data_size, replace=False))
  new = full.subset(new_idx)
  images = np.concatenate([sources.to_float(new.images), generated.astype(np.float32)])
  labels = np.concatenate([new.labels, generated_labels]).astype(np.int32)
  source = np.concatenate([np.zeros(len(new), np.int32), np.ones(len(generated), np.int32)])
  return sources.ArrayDataset(images, labels, full.num_classes, f'{full.name}+pretrained',
                              {'source': source}), sources.to_float(new.images)


def dataset_key(dataset) -> str:
  """A hash of a dataset's images, labels and attributes."""
  import hashlib
  from cdiff_jax import checkpoint
  h = hashlib.sha256()
  checkpoint.hash_pytree(h, (dataset.images, dataset.labels, dataset.attributes))
  return h.hexdigest()[:16]


def nearest_distance(samples: np.ndarray, data: np.ndarray) -> float:
  """Mean L2 distance from each sample to its nearest image of ``data`` (per pixel RMS)."""
  s = samples.reshape(len(samples), -1).astype(np.float64)
  d = data.reshape(len(data), -1).astype(np.float64)
  d2 = (s ** 2).sum(1)[:, None] + (d ** 2).sum(1)[None] - 2 * s @ d.T
  return float(np.sqrt(np.clip(d2.min(1), 0, None) / s.shape[1]).mean())


def dropped_class_table(dropped, pre: dict, arms: dict) -> str:
  """Each arm's (and the pre-trained model's) share of samples in the classes left out of
  pre-training, together, with the arms' mean distance to the new data and their loss on
  q_pre over the last logging interval (the constraint's loss, logged by both arms)."""
  what = f'{dropped[0]}s' if len(dropped) == 1 else 'classes ' + ', '.join(map(str, dropped))
  share = lambda ev: sum(ev['class_frequencies'][c] for c in dropped)
  lines = ['', f'| arm | fraction of {what} | mean distance to nearest new-data image | '
               'loss on q_pre (last log interval) |', '|---|---|---|---|']
  for name, arm in arms.items():
    ev = arm['eval']
    q_pre = arm.get('final_metrics', {}).get('constraint_loss')
    lines.append(f"| {name} | {share(ev):.3f} | "
                 f"{ev.get('nearest_new_data_distance', float('nan')):.4f} | "
                 f"{'-' if q_pre is None else f'{q_pre[0]:.4f}'} |")
  lines.append(f"| pretrained (no {what}) | {share(pre['eval']):.3f} | - | - |")
  return '\n'.join(lines)


def main(argv):
  del argv
  from cdiff_jax import evaluation, parallel, train, writers
  from experiments.minority import (comparison_table, run_arm, unconstrained_arm,
                                    write_constraint_figure)
  from cdiff_jax.data import sources
  config = _CONFIG.value
  cli.require_config(config, 'experiments.finetune', 'configs/digits_finetune.py',
                     section='finetune')
  fc = config.finetune
  workdir = os.path.abspath(_WORKDIR.value)
  progress = _PROGRESS.value
  train_set = sources.load_dataset(config.data, 'train')
  validate(config, len(train_set), train_set.num_classes)
  train.setup_jax(config)  # XLA options before the samples of step 2 start the backend

  pre_cfg, pre_dir, pre = pretrain(config, workdir, progress)

  gen_path = os.path.join(workdir, 'pretrained_samples.npz')
  from cdiff_jax import checkpoint as ckpt_lib
  # The parameters the pre-trained model samples with (sample.use_ema).
  params = ckpt_lib.load_params(pre_dir, 'ema_params' if pre_cfg.sample.use_ema else 'params')
  key = samples_key(params, pre_cfg, fc)
  cached = None
  if os.path.exists(gen_path):
    with np.load(gen_path) as f:
      if 'key' in f and str(f['key']) == key:
        cached = f['images'], f['labels']
      else:
        print(f'{gen_path}: made by another pre-trained model or sampler; sampling again.')
  if cached is None:
    exp = train.build(pre_cfg)
    # load_params gives the parameters on one device; the sampler's state is replicated
    # over the run's mesh (with several devices, mixing the two fails).
    params = parallel.put_replicated(params, exp.mesh)
    state = exp.init_state().replace(params=params, ema_params=params)
    generated = evaluation.generate(exp, state, fc.num_generated, seed=fc.new_data_seed + 7,
                                    progress=progress)
    clf = evaluation.classifier_for(config)
    cached = generated, clf.predict(generated)
    writers.save_arrays_atomic(gen_path, images=cached[0], labels=cached[1], key=key)
  generated, generated_labels = cached
  dataset, new_images = build_finetune_dataset(config, train_set, generated, generated_labels)
  data_key = dataset_key(dataset)

  arms = {}
  for name in ('unconstrained', 'constrained'):
    c = unconstrained_arm(config) if name == 'unconstrained' else copy.deepcopy(config)
    c.train.init_from = pre_dir
    # Saved with the arm's config: a finished arm is not reused once q_pre has changed
    # (a retrained pre-trained model), it is refused by name; and the hash of the data the
    # arm trains on goes into config.data, which its checkpoints are keyed by, so that an
    # interrupted arm is not resumed on other data (a new q_pre or new_data_seed).
    with c.unlocked():
      c.finetune.q_pre_samples = key[:16]
      c.data.finetune_data_key = data_key
    if name == 'constrained':
      c.method.threshold_mode = 'reference'
      c.method.threshold_reference = 'constraint'
      c.method.reference_workdir = pre_dir
    arm_dir = os.path.join(workdir, name)
    # The arm's data is built here, not by its config: saved with it for `cdiff_jax.sample`.
    arms[name] = run_arm(c, arm_dir, progress, dataset=dataset, save_dataset=True)
    samples = np.load(os.path.join(arm_dir, 'eval_samples.npy'))
    arms[name]['eval']['nearest_new_data_distance'] = nearest_distance(samples, new_images)

  table = comparison_table(config, arms) + '\n' + dropped_class_table(fc.pretrain_drop_classes,
                                                                    pre, arms)
  writers.write_atomic(os.path.join(workdir, 'comparison.md'), table + '\n')
  writers.write_atomic(os.path.join(workdir, 'comparison.json'), json.dumps(
      {'pretrained': pre['eval'], **{n: a['eval'] for n, a in arms.items()}}, indent=2))
  series = {'pretrained': pre['eval']['class_frequencies']}
  series.update({n: a['eval']['class_frequencies'] for n, a in arms.items()})
  writers.plot_class_frequencies(os.path.join(workdir, 'comparison_frequencies.png'), series,
                                 title='fine-tuning: generated class frequencies')
  write_constraint_figure(workdir, config, arms)
  print('\n' + table)


if __name__ == '__main__':
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  cli.run(main)
