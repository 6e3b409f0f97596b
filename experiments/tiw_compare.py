"""DSM(ref), DSM(obs), IW-DSM, TIW-DSM and a weight-temperature sweep on one biased dataset.

  python experiments/tiw_compare.py --workdir=runs/tiw_compare          # digits, CPU minutes
  python experiments/tiw_compare.py --config=configs/mnist_tiw.py --workdir=runs/mnist_cmp \\
      --ref_fractions=0.05,0.1 --config.data.source=idx --config.data.data_dir=IDX_DIR

Any config field is overridden as in the launcher (``--config.train.steps=1500``); ``--arms``
picks the arms to run by label (``--arms='DSM(obs),TIW-DSM'``), ``--alphas=`` drops the sweep.
Arms finished earlier in WORKDIR with the same config are tabulated too, so the arms can run
as separate jobs (one ``--arms`` each) and any of them writes the whole table; an arm
finished with another config (other steps, learning rate, ...) is refused, not reported.

Every arm is one ``train_and_evaluate`` run of the config with ``method.variant`` and
``method.alpha`` set, in ``WORKDIR/ref{fraction}/{arm}`` (an interrupted comparison resumes:
finished arms are read back, unfinished ones resume from their checkpoints). Evaluation is
the project's: the classifier trained on the real balanced training set gives the class
frequencies of the generated samples and the classifier FID against the held-out set. The
TIW arms of one reference fraction share one pretrained time-dependent discriminator
(cached); IW-DSM trains its own at t = 0 (cached too).

Columns: classifier FID (lower is better), total variation of the generated class
frequencies to uniform, the generated mass of the tail (the rarer half of the biased set's
classes), and the copying check ``NN ratio to D_ref`` (median distance of samples to their
nearest reference image over the same for held-out images; ~1 is healthy, << 1 means the
model reproduces D_ref).

Writes ``results.md`` (the table), ``results.json``, ``class_frequencies.png`` and
``alpha_sweep.png`` to WORKDIR. Alpha = 0 is DSM(obs), so the sweep's first point is that arm.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import jax
import numpy as np
from absl import app, flags

from cdiff_jax import cli, evaluation, train, writers
from cdiff_jax import config as config_lib
from cdiff_jax.data import sources
from cdiff_jax.methods import tiw

if not __package__:  # run as a file: configs that import configs.* need the root
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_FLAGS = {}


def arms(alphas):
  out = [('DSM(ref)', 'dsm_ref', 1.0), ('DSM(obs)', 'dsm_obs', 1.0), ('IW-DSM', 'iw', 1.0),
         ('TIW-DSM', 'tiw', 1.0)]
  out += [(f'TIW-DSM a={a:g}', 'tiw', a) for a in alphas if a != 1.0]
  return out


def slug(label: str) -> str:
  return ''.join(c if c.isalnum() else '_' for c in label).strip('_').lower()


def finished_arm(config, workdir: str) -> dict | None:
  """The record of an arm finished earlier in ``workdir`` with this config, else None.

  An arm finished with another config (say other steps or learning rate; log/checkpoint
  cadence and the data path do not count) is refused rather than reported as this one.
  """
  done = os.path.join(workdir, 'arm.json')
  # summary.json too: a run of the arm's workdir started since (by hand) removed it.
  if not (os.path.exists(done) and os.path.exists(os.path.join(workdir, 'summary.json'))):
    return None
  config_lib.check_finished_run(workdir, config)
  with open(done) as f:
    return json.load(f)


def run_arm(config, workdir: str, progress: bool) -> dict:
  record = finished_arm(config, workdir)
  if record is not None:
    return record
  done = os.path.join(workdir, 'arm.json')
  result = train.train_and_evaluate(config, workdir, progress=progress)
  record = dict(eval=result['eval'], seconds=result['seconds'],  # every invocation's part
                final_metrics={k: v for k, v in result.get('final_metrics', {}).items()
                               if np.ndim(v) == 0})
  # The arm's "finished" mark: whole or absent, as the project's other caches.
  writers.write_atomic(done, json.dumps(record, indent=2, default=float))
  return record


def nearest_distances(queries: np.ndarray, images: np.ndarray, chunk: int = 500) -> np.ndarray:
  """L2 distance from every query image to its nearest image in ``images``."""
  x = images.reshape(len(images), -1).astype(np.float32)
  x2 = (x ** 2).sum(1)
  out = []
  for i in range(0, len(queries), chunk):
    q = queries[i:i + chunk].reshape(-1, x.shape[1]).astype(np.float32)
    d2 = (q ** 2).sum(1)[:, None] + x2[None] - 2 * q @ x.T
    out.append(np.sqrt(np.maximum(d2.min(1), 0.0)))
  return np.concatenate(out)


def copying(samples: np.ndarray, config) -> dict:
  """How close samples sit to the reference images, relative to held-out real images.

  ``ref_nn_ratio`` = median distance of a sample to its nearest D_ref image divided by the
  same median for held-out test images: about 1 for a model of p_data, well below 1 for a
  model that reproduces the few reference images (the risk of DSM(ref)). The classifier
  FID hardly sees such copying, so the table reports both.
  """
  dataset = sources.load_dataset(config.data, 'train')
  bias, ref = tiw.split_indices(config.method, dataset, train.train_indices(config.data, dataset))
  test = sources.to_float(sources.load_dataset(config.data, 'test').images)
  ref_images = sources.to_float(dataset.images[ref])
  obs_images = sources.to_float(dataset.images[np.concatenate([bias, ref])])
  ratio = lambda pool: float(np.median(nearest_distances(samples, pool))
                             / np.median(nearest_distances(test, pool)))
  return dict(ref_nn_ratio=ratio(ref_images), obs_nn_ratio=ratio(obs_images))


def split_frequencies(config, num_classes: int) -> dict:
  """Class frequencies of the biased set, the reference set and the score minibatch mix."""
  dataset = sources.load_dataset(config.data, 'train')
  idx = train.train_indices(config.data, dataset)
  bias, ref = tiw.split_indices(config.method, dataset, idx)
  freq = lambda i: np.bincount(dataset.labels[i], minlength=num_classes) / len(i)
  pi = round(config.method.ref_batch_fraction * config.train.batch_size) / config.train.batch_size
  return dict(bias=freq(bias).tolist(), ref=freq(ref).tolist(),
              obs_mix=(pi * freq(ref) + (1 - pi) * freq(bias)).tolist(),
              num_bias=int(len(bias)), num_ref=int(len(ref)))


def write_plots(workdir: str, results: dict, alphas) -> None:
  fracs = sorted(results)
  fig, axes = writers.new_figure(1, len(fracs), figsize=(6.5 * len(fracs), 3.8),
                                 squeeze=False)
  for ax, frac in zip(axes[0], fracs):
    r = results[frac]
    k = len(r['data']['bias'])
    ax.plot(range(k), r['data']['bias'], 'k:', lw=1.5, label='biased set')
    ax.plot(range(k), r['data']['obs_mix'], 'k--', lw=1, label='minibatch mix (pi)')
    for label, row in r['arms'].items():
      ax.plot(range(k), row['class_frequencies'], marker='o', ms=3, lw=1, label=label)
    ax.axhline(1 / k, color='gray', lw=0.8, label='uniform')
    ax.set_xticks(range(k))
    ax.set_xlabel('class')
    counts = {row.get('num_samples') for row in r['arms'].values()}
    n = counts.pop() if len(counts) == 1 else None   # the arms' eval.num_samples
    ax.set_ylabel(f'frequency in {n:,} samples' if n else 'frequency')
    ax.set_title(f'reference = {float(frac):g} x |biased set|', fontsize=9)
    ax.legend(fontsize=6.5, ncol=2)
  writers.save_figure(fig, os.path.join(workdir, 'class_frequencies.png'))

  fig, axes = writers.new_figure(1, 2, figsize=(9, 3.4))
  for frac in fracs:
    arms_ = results[frac]['arms']
    pts = [(0.0, arms_.get('DSM(obs)'))] + [
        (a, arms_.get('TIW-DSM' if a == 1.0 else f'TIW-DSM a={a:g}')) for a in sorted(set(alphas) | {1.0})]
    pts = [(a, row) for a, row in pts if row]
    for ax, key in zip(axes, ('classifier_fid', 'tv_to_uniform')):
      ax.plot([a for a, _ in pts], [row[key] for _, row in pts], marker='o',
              label=f'TIW-DSM, ref {float(frac):g}')
      if 'IW-DSM' in arms_:
        ax.axhline(arms_['IW-DSM'][key], ls=':', lw=1, label=f'IW-DSM, ref {float(frac):g}')
  for ax, title in zip(axes, ('classifier FID (lower is better)', 'TV to uniform classes (lower is better)')):
    ax.set_xlabel('alpha (0 = DSM(obs))')
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
  writers.save_figure(fig, os.path.join(workdir, 'alpha_sweep.png'))


def write_table(workdir: str, results: dict, header: str) -> str:
  lines = [header, '']
  for frac in sorted(results):
    r = results[frac]
    k = len(r['data']['bias'])
    # the rarer half of the biased set's classes (5-9 for 0..9 from head to tail; a
    # method.class_order puts the head elsewhere)
    tail = sorted(np.argsort(-np.asarray(r['data']['bias']), kind='stable')[k // 2:].tolist())
    names = (f'{tail[0]}-{tail[-1]}' if tail == list(range(tail[0], tail[-1] + 1)) else
             ','.join(map(str, tail)))
    lines += [f'Reference = {float(frac):g} x |biased set| ({r["data"]["num_ref"]} reference, '
              f'{r["data"]["num_bias"]} biased images). Tail = classes {names} '
              f'(uniform: {len(tail) / k:.2f}; biased set: {sum(r["data"]["bias"][c] for c in tail):.2f}).',
              '',
              '| arm | classifier FID | TV to uniform | tail mass | NN ratio to D_ref | minutes |',
              '|---|---:|---:|---:|---:|---:|']
    for label, row in r['arms'].items():
      lines.append(f'| {label} | {row["classifier_fid"]:.2f} | {row["tv_to_uniform"]:.3f} | '
                   f'{sum(row["class_frequencies"][c] for c in tail):.3f} | '
                   f'{row["ref_nn_ratio"]:.2f} | {row["seconds"] / 60:.1f} |')
    a = r['arms']
    if {'TIW-DSM', 'DSM(obs)', 'IW-DSM'} <= set(a):
      fid = {n: a[n]['classifier_fid'] for n in ('TIW-DSM', 'DSM(obs)', 'IW-DSM')}
      lines += ['', f'Paper ordering (FID): TIW-DSM < DSM(obs): '
                f'{"yes" if fid["TIW-DSM"] < fid["DSM(obs)"] else "no"}; '
                f'DSM(obs) < IW-DSM: {"yes" if fid["DSM(obs)"] < fid["IW-DSM"] else "no"}.']
    lines.append('')
  text = '\n'.join(lines)
  writers.write_atomic(os.path.join(workdir, 'results.md'), text)
  return text


def _define_flags():
  """The command-line flags, defined only when this file is the program."""
  _FLAGS['config'] = cli.define_config_file(
      'config', 'configs/digits_tiw.py', 'Config of every arm (method.variant and '
      'method.alpha are set per arm, method.ref_fraction by --ref_fractions); override '
      'fields as --config.train.steps=1500.')
  _FLAGS['workdir'] = flags.DEFINE_string('workdir', 'runs/tiw_compare', 'Output directory.')
  _FLAGS['ref_fractions'] = flags.DEFINE_list(
      'ref_fractions', [], 'Reference-set sizes, e.g. 0.05,0.1 (default: the config\'s '
      'method.ref_fraction).')
  _FLAGS['alphas'] = flags.DEFINE_list('alphas', ['0.5', '2'], 'Extra TIW-DSM temperatures.')
  _FLAGS['arms'] = flags.DEFINE_list('arms', [], 'Arm labels to run (default: all).')
  _FLAGS['progress'] = cli.define_progress_flags()


def _numbers(flag: str) -> list[float]:
  values = _FLAGS[flag].value
  try:
    return [float(v) for v in values]
  except ValueError:
    example = {'alphas': '0.5,1', 'ref_fractions': '0.05,0.1'}[flag]
    raise config_lib.ConfigError(f'--{flag}={",".join(values)}: give numbers separated by '
                                 f'commas, e.g. --{flag}={example}.') from None


def arm_config(base, variant: str, alpha: float, frac: float):
  """The config of one arm: ``base`` with the variant, alpha and reference fraction."""
  config = base.copy_and_resolve_references()
  config.method.variant, config.method.alpha = variant, alpha
  config.method.ref_fraction = frac
  return config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  base = _FLAGS['config'].value
  cli.require_config(base, 'experiments/tiw_compare.py', 'configs/digits_tiw.py', method='tiw')
  workdir, progress = _FLAGS['workdir'].value, _FLAGS['progress'].value
  base.eval.enabled = True
  alphas, fractions = _numbers('alphas'), _numbers('ref_fractions')
  fractions = fractions or [base.method.ref_fraction]   # (the config's own, by default)
  selected = _FLAGS['arms'].value
  labels = [label for label, _, _ in arms(alphas)]
  unknown = [a for a in selected if a not in labels]
  if unknown:
    raise config_lib.ConfigError(f'--arms: no arm {unknown}; the arms are {labels} '
                                 '(TIW-DSM a=... from --alphas).')
  for frac in fractions:  # every arm's config checked before anything is written
    for _, variant, alpha in arms(alphas):
      train.validate(arm_config(base, variant, alpha, frac))
  train.check_workdir(workdir)
  os.makedirs(workdir, exist_ok=True)

  train.setup_jax(base)  # XLA options before the classifier starts the backend
  t_start = time.perf_counter()
  clf = evaluation.classifier_for(base, progress=progress)
  results = {}
  for frac in fractions:
    key = f'{frac:g}'
    results[key] = dict(arms={})
    for label, variant, alpha in arms(alphas):
      config = arm_config(base, variant, alpha, frac)
      wd = os.path.join(workdir, f'ref{key}', slug(label))
      if selected and label not in selected:
        # Not asked for, but finished earlier with this config (one arm per job): tabulated.
        record = finished_arm(config, wd)
        if record is None:
          continue
        print(f'=== reference {key}: {label}: finished earlier in {wd}')
      else:
        print(f'=== reference {key}: {label} -> {wd}')
        record = run_arm(config, wd, progress=progress)
      samples = np.load(os.path.join(wd, 'eval_samples.npy')).astype(np.float32)
      results[key]['arms'][label] = dict(record['eval'], seconds=record['seconds'],
                                         **copying(samples, config))
    results[key]['data'] = split_frequencies(_with_fraction(base, frac), clf.num_classes)
  minutes = (time.perf_counter() - t_start) / 60
  header = (f'TIW-DSM comparison: {base.data.name}, {base.train.steps} steps of batch '
            f'{base.train.batch_size} per arm, '
            f'{base.eval.num_samples} samples per arm, evaluation classifier accuracy '
            f'{clf.accuracy:.3f}; {os.cpu_count()}-core {platform.machine()} '
            f'{jax.default_backend()}, {minutes:.0f} minutes in this invocation.')
  writers.write_atomic(os.path.join(workdir, 'results.json'),
                       json.dumps(dict(header=header, results=results), indent=2, default=float))
  write_plots(workdir, results, alphas)
  print(write_table(workdir, results, header))


def _with_fraction(base, frac):
  config = base.copy_and_resolve_references()
  config.method.ref_fraction = frac
  return config


if __name__ == '__main__':
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  _define_flags()
  cli.run(main)
