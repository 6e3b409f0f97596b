"""The experiments' tables, figures' data and helper metrics, recomputed by hand from the
records they are made of (made-up per-arm eval records; no training)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

import run_files
from cdiff_jax import config as config_lib
from cdiff_jax import writers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _run(code: str, *args) -> None:
  """Experiment modules that define their flags on import: one module per process."""
  out = subprocess.run([sys.executable, '-c', textwrap.dedent(code), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and out.stdout.strip().endswith('ok'), out.stderr[-3000:]


def _minority_arm(seed: int, lam=None, seconds=None):
  rng = np.random.default_rng(seed)
  freqs = rng.dirichlet(np.ones(10))
  ev = dict(tv_to_uniform=float(rng.uniform(0.1, 0.4)),
            classifier_fid=float(rng.uniform(10, 90)), class_frequencies=freqs.tolist(),
            training_class_frequencies=rng.dirichlet(np.ones(10)).tolist(), num_samples=500,
            classifier_accuracy=0.97, num_reference=300)
  fm = {} if lam is None else dict(lam=lam, threshold=[0.011, 0.022, 0.033])
  return dict(eval=ev, final_metrics=fm, seconds=seconds)


def test_minority_table_reads_each_arms_own_figures():
  from configs import digits_minority
  from experiments import minority
  config = digits_minority.get_config()
  arms = {'unconstrained': _minority_arm(0, seconds=90.0),
          'constrained': _minority_arm(1, lam=[0.5, 1.25, 2.0], seconds=None)}
  rows = run_files.markdown_rows(minority.comparison_table(config, arms))
  assert set(rows) == {'unconstrained', 'constrained'}
  classes = sorted(config.data.minority_classes)
  for name, arm in arms.items():
    row, ev = rows[name], arm['eval']
    freq_col = next(h for h in row if h.startswith('minority freq.'))
    assert freq_col == f"minority freq. ({', '.join(map(str, classes))})"
    assert abs(float(row['TV to uniform']) - ev['tv_to_uniform']) < 5e-4
    assert abs(float(row['classifier FID']) - ev['classifier_fid']) < 5e-3
    np.testing.assert_allclose(run_files.floats(row[freq_col]),
                               [ev['class_frequencies'][c] for c in classes], atol=5e-4)
    np.testing.assert_allclose(run_files.floats(row['class frequencies']), ev['class_frequencies'],
                               atol=5e-3)
  assert rows['unconstrained']['lambda (end)'] == '0 (fixed)'
  assert rows['unconstrained']['thresholds b'] == '-'
  assert rows['unconstrained']['run time'] == '1.5 min'
  constrained = rows['constrained']
  np.testing.assert_allclose(run_files.floats(constrained['lambda (end)']), [0.5, 1.25, 2.0])
  np.testing.assert_allclose(run_files.floats(constrained['thresholds b']),
                             [0.011, 0.022, 0.033])
  assert rows['constrained']['run time'] == '-'
  # Fine-tuning constrains a data source, not classes: no (empty) minority column.
  from configs import digits_finetune
  rows = run_files.markdown_rows(minority.comparison_table(digits_finetune.get_config(), arms))
  assert not any(h.startswith('minority freq.') for h in rows['constrained'])
  np.testing.assert_allclose(run_files.floats(rows['constrained']['class frequencies']),
                             arms['constrained']['eval']['class_frequencies'], atol=5e-3)
  np.testing.assert_allclose(run_files.floats(rows['constrained']['lambda (end)']),
                             [0.5, 1.25, 2.0])
  # A long-tailed TIW-DSM split has no data.minority_classes: the constrained classes'.
  from configs import digits_tiw_minority
  config = digits_tiw_minority.get_config()
  classes = sorted(config.method.constraint_classes)
  assert not config.data.minority_classes and classes
  rows = run_files.markdown_rows(minority.comparison_table(config, arms))
  for name, arm in arms.items():
    col = f"minority freq. ({', '.join(map(str, classes))})"
    np.testing.assert_allclose(run_files.floats(rows[name][col]),
                               [arm['eval']['class_frequencies'][c] for c in classes], atol=5e-4)


def test_minority_figures_show_the_training_data_and_each_arm(tmp_path, monkeypatch):
  """The frequency figure's series: the training data's frequencies, then each arm's
  samples; the sample figure puts the arms' grids side by side."""
  from configs import digits_minority
  from experiments import minority
  arms = {'unconstrained': _minority_arm(2), 'constrained': _minority_arm(3)}
  sizes = {'unconstrained': (10, 12), 'constrained': (14, 9)}
  grids = {}
  for name, shape in sizes.items():
    grids[name] = np.random.default_rng(len(name)).integers(0, 255, shape, np.uint8)
    os.makedirs(tmp_path / name / 'samples')
    Image.fromarray(grids[name]).save(tmp_path / name / 'samples' / 'eval_samples.png')
  plotted = {}

  def plot(path, series, target=None, **kw):
    plotted.update(series={k: list(v) for k, v in series.items()}, target=np.asarray(target))
    return path

  monkeypatch.setattr(writers, 'plot_class_frequencies', plot)
  minority.write_figures(str(tmp_path), digits_minority.get_config(), arms)
  first = arms['unconstrained']['eval']
  assert plotted['series'] == {'training data': first['training_class_frequencies'],
                               'unconstrained': first['class_frequencies'],
                               'constrained': arms['constrained']['eval']['class_frequencies']}
  np.testing.assert_allclose(plotted['target'], np.full(10, 0.1))
  side = np.asarray(Image.open(tmp_path / 'comparison_samples.png'))
  top = minority.LABEL_HEIGHT   # each grid under a strip with its arm's name
  assert side.shape == (top + 14, 12 + 8 + 9 + 8)
  np.testing.assert_array_equal(side[top:top + 10, :12], grids['unconstrained'])
  np.testing.assert_array_equal(side[top:, 20:29], grids['constrained'])
  assert (side[:top, :12] < 128).any() and (side[:top, 20:29] < 128).any()  # names written
  # trained on some classes only (data.keep_classes): the TV's target, 0 for the others
  for arm in arms.values():
    arm['eval']['uniform_over'] = [1, 4, 6, 8]
  minority.write_figures(str(tmp_path), digits_minority.get_config(), arms)
  np.testing.assert_allclose(plotted['target'], [0, .25, 0, 0, .25, 0, .25, 0, .25, 0])


def test_constraint_figure_shows_every_arms_constraint_losses_against_b(tmp_path, monkeypatch):
  """comparison_constraints.png: each arm's logged constraint losses, one panel per
  constraint named as in the logs, with the constrained arm's thresholds."""
  from configs import digits_minority
  from experiments import minority
  arms = {'unconstrained': _minority_arm(2, lam=[0.0] * 3),
          'constrained': _minority_arm(3, lam=[0.5] * 3)}
  records = {}
  for k, name in enumerate(arms):
    records[name] = [dict(step=s, constraint_loss=[s * 0.1 + k, 2.0, 3.0]) for s in (4, 8)]
    os.makedirs(tmp_path / name)
    (tmp_path / name / 'metrics.jsonl').write_text(
        ''.join(json.dumps(r) + '\n' for r in records[name]))
  drawn = {}

  def plot(path, runs, key, entry_names=None, thresholds=None, title=''):
    drawn.update(path=path, runs=runs, key=key, names=entry_names, b=thresholds)
    return path

  monkeypatch.setattr(writers, 'plot_compared_curves', plot)
  minority.write_constraint_figure(str(tmp_path), digits_minority.get_config(), arms)
  assert drawn['path'] == str(tmp_path / 'comparison_constraints.png')
  assert drawn['runs'] == records and drawn['key'] == 'constraint_loss'
  assert drawn['names'] == ('class_4', 'class_5', 'class_7')
  assert drawn['b'] == [0.011, 0.022, 0.033]


def _finished(workdir, config, arm, **summary):
  """What a finished arm of ``config`` leaves in ``workdir`` (``summary``: more of
  summary.json's fields)."""
  os.makedirs(workdir, exist_ok=True)
  (workdir / 'config.json').write_text(config.to_json_best_effort())
  (workdir / 'eval.json').write_text(json.dumps(arm['eval']))
  np.save(workdir / 'eval_samples.npy', np.zeros((2, 8, 8, 1), np.float16))
  (workdir / 'summary.json').write_text(json.dumps(dict(
      dict(final_step=config.train.steps, seconds=3.0, final_metrics={}), **summary)))


def test_minority_reuses_a_finished_arm_only_for_its_config(tmp_path):
  from configs import digits_minority
  from experiments import minority
  config = digits_minority.get_config()
  arm = _minority_arm(4, lam=[0.1, 0.2, 0.3])
  end = dict(lam=[0.15, 0.25, 0.35])  # the multipliers at the last step, not a record's means
  _finished(tmp_path, config, arm, seconds=12.0, final_metrics=arm['final_metrics'],
            final_extras=end)
  reused = minority.run_arm(config, str(tmp_path), progress=False)
  assert reused == dict(eval=arm['eval'], seconds=12.0, final_metrics=arm['final_metrics'],
                        final_extras=end)
  assert minority.end_lambda(reused) == [0.15, 0.25, 0.35]
  row = run_files.markdown_rows(minority.comparison_table(config, {'constrained': reused}))
  np.testing.assert_allclose(run_files.floats(row['constrained']['lambda (end)']), end['lam'])
  config.optim.lr *= 2
  with pytest.raises(config_lib.ConfigError, match='optim.lr'):
    minority.run_arm(config, str(tmp_path), progress=False)
  # More steps: refused too, not trained on from the finished checkpoint (whose schedule
  # ran to its own end), also when the evaluation is missing.
  longer = digits_minority.get_config()
  longer.train.steps += 500
  (tmp_path / 'eval.json').unlink()
  with pytest.raises(config_lib.ConfigError, match='train.steps: saved 1500 vs now 2000'):
    minority.run_arm(longer, str(tmp_path), progress=False)


def test_a_finished_unconstrained_arm_answers_any_dual_setting(tmp_path):
  """lambda fixed at 0 trains the same model whatever the dual fields hold: a sweep of them
  reuses the unconstrained arm; the constrained arm, and any training field, still count."""
  from configs import digits_minority
  from experiments import minority
  arm = _minority_arm(5)
  _finished(tmp_path, minority.unconstrained_arm(digits_minority.get_config()), arm)
  other = digits_minority.get_config()
  other.method.dual_lr, other.method.dual_start = 0.05, 150
  other.method.target_frequency, other.method.reference_params = 0.2, 'ema_params'
  reused = minority.run_arm(minority.unconstrained_arm(other), str(tmp_path), progress=False)
  assert reused['eval'] == arm['eval']
  with pytest.raises(config_lib.ConfigError, match='method.dual_lr: saved 0.005 vs now 0.05'):
    minority.run_arm(other, str(tmp_path), progress=False)   # enabled: it reads them
  other.optim.lr *= 2
  with pytest.raises(config_lib.ConfigError, match='optim.lr'):
    minority.run_arm(minority.unconstrained_arm(other), str(tmp_path), progress=False)


def test_unconstrained_arm_drops_the_reference_it_never_reads():
  from configs import digits_minority
  from experiments import minority
  config = digits_minority.get_config()
  config.method.reference_workdir = '/elsewhere/reference'
  arm = minority.unconstrained_arm(config)
  assert not arm.method.enabled and arm.method.reference_workdir == ''
  assert config.method.enabled and config.method.reference_workdir == '/elsewhere/reference'
  arm.method.reference_workdir, arm.method.enabled = config.method.reference_workdir, True
  assert arm.to_dict() == config.to_dict()   # nothing else changed


def test_guidance_classes_must_be_trained_ones():
  """"Any digit but N" asks for a class N the model trains on, and another class beside it;
  each refusal names the trained classes or the data fields."""
  from configs import digits_cfg
  from experiments import digits_guidance
  config = digits_cfg.get_config()
  digits_guidance.validate(config, [0, 1, 2])
  with pytest.raises(config_lib.ConfigError, match=r'not_class=1: .* \(0,2,3\)'):
    digits_guidance.validate(config, [0, 2, 3])
  with pytest.raises(config_lib.ConfigError, match='keep_classes'):
    digits_guidance.validate(config, [1])
  config.guidance.num_samples = 2
  with pytest.raises(config_lib.ConfigError, match=r'num_samples=2: .*\(3\)'):
    digits_guidance.validate(config, [0, 1, 2])


def test_guidance_model_finished_with_other_steps_is_refused(tmp_path):
  from configs import digits_cfg
  from experiments import digits_guidance
  config = digits_cfg.get_config()
  model = tmp_path / 'model'
  model.mkdir()
  (model / 'config.json').write_text(config.to_json_best_effort())
  (model / 'summary.json').write_text(json.dumps(dict(final_step=config.train.steps)))
  config.train.steps *= 2
  with pytest.raises(config_lib.ConfigError, match='train.steps'):
    digits_guidance.train_model(config, str(tmp_path), progress=False)


def _tiw_row(seed, fid):
  rng = np.random.default_rng(seed)
  return dict(classifier_fid=fid, tv_to_uniform=float(rng.uniform(0, 0.5)),
              class_frequencies=rng.dirichlet(np.ones(4)).tolist(),
              ref_nn_ratio=float(rng.uniform(0.2, 0.6)), obs_nn_ratio=float(rng.uniform(0.7, 1.2)),
              seconds=float(rng.uniform(30, 300)), num_samples=500)


def test_tiw_table_tail_mass_copying_ratio_and_ordering(tmp_path):
  from experiments import tiw_compare
  bias = [0.55, 0.25, 0.15, 0.05]
  arms = {'DSM(obs)': _tiw_row(0, 30.0), 'IW-DSM': _tiw_row(1, 20.0),
          'TIW-DSM': _tiw_row(2, 25.0)}
  results = {'0.1': dict(arms=arms, data=dict(bias=bias, ref=[0.25] * 4, obs_mix=bias,
                                                num_bias=900, num_ref=90))}
  text = tiw_compare.write_table(str(tmp_path), results, 'header')
  assert (tmp_path / 'results.md').read_text() == text
  rows = run_files.markdown_rows(text)
  for label, row in arms.items():
    cells = rows[label]
    assert abs(float(cells['classifier FID']) - row['classifier_fid']) < 5e-3
    assert abs(float(cells['TV to uniform']) - row['tv_to_uniform']) < 5e-4
    # the tail: the upper half of the classes, 2 and 3 of 4
    assert abs(float(cells['tail mass']) - sum(row['class_frequencies'][2:])) < 5e-4
    assert abs(float(cells['NN ratio to D_ref']) - row['ref_nn_ratio']) < 5e-3
    assert abs(float(cells['minutes']) - row['seconds'] / 60) < 0.05 + 1e-9
  assert 'Tail = classes 2-3' in text and 'biased set: 0.20' in text
  # FID: TIW-DSM 25 < DSM(obs) 30 holds; DSM(obs) 30 < IW-DSM 20 does not.
  assert 'TIW-DSM < DSM(obs): yes; DSM(obs) < IW-DSM: no.' in text
  # method.class_order=(3, 0, 2, 1): the head is class 3, the tail classes 1 and 2
  results['0.1']['data'] = dict(results['0.1']['data'], bias=[0.25, 0.05, 0.15, 0.55])
  rows = run_files.markdown_rows(tiw_compare.write_table(str(tmp_path), results, 'header'))
  for label, row in arms.items():
    expected = row['class_frequencies'][1] + row['class_frequencies'][2]
    assert abs(float(rows[label]['tail mass']) - expected) < 5e-4
  assert 'Tail = classes 1-2' in (tmp_path / 'results.md').read_text()
  results['0.1']['data']['bias'] = [0.15, 0.25, 0.05, 0.55]   # order (3, 1, 0, 2)
  assert 'Tail = classes 0,2 ' in tiw_compare.write_table(str(tmp_path), results, 'header')


def test_tiw_alpha_sweep_starts_at_dsm_obs(tmp_path, monkeypatch):
  """The sweep plots FID and TV over alpha: alpha 0 is DSM(obs), then the TIW-DSM arms."""
  from experiments import tiw_compare
  arms = {'DSM(ref)': _tiw_row(3, 50.0), 'DSM(obs)': _tiw_row(4, 30.0),
          'TIW-DSM a=0.5': _tiw_row(5, 27.0), 'TIW-DSM': _tiw_row(6, 25.0),
          'TIW-DSM a=2': _tiw_row(7, 26.0)}
  results = {'0.1': dict(arms=arms, data=dict(bias=[0.4, 0.3, 0.2, 0.1], ref=[0.25] * 4,
                                                obs_mix=[0.35, 0.3, 0.2, 0.15], num_bias=9,
                                                num_ref=1))}
  figures = []
  new_figure = writers.new_figure

  def recording(*args, **kw):
    fig, axes = new_figure(*args, **kw)
    figures.append(axes)
    return fig, axes

  monkeypatch.setattr(writers, 'new_figure', recording)
  tiw_compare.write_plots(str(tmp_path), results, [0.5, 2.0])
  freq_ax = figures[0][0][0]
  lines = {l.get_label(): list(l.get_ydata()) for l in freq_ax.get_lines()}
  assert lines['biased set'] == results['0.1']['data']['bias']
  assert lines['minibatch mix (pi)'] == results['0.1']['data']['obs_mix']
  assert freq_ax.get_ylabel() == 'frequency in 500 samples'   # the arms' eval.num_samples
  for label, row in arms.items():
    assert lines[label] == row['class_frequencies'], label
  order = ['DSM(obs)', 'TIW-DSM a=0.5', 'TIW-DSM', 'TIW-DSM a=2']
  for ax, key in zip(figures[1], ('classifier_fid', 'tv_to_uniform')):
    sweep = ax.get_lines()[0]
    assert list(sweep.get_xdata()) == [0.0, 0.5, 1.0, 2.0]
    assert list(sweep.get_ydata()) == [arms[a][key] for a in order]


def test_tiw_split_frequencies_and_copying_ratios():
  """Class frequencies of the biased and reference sets counted by hand, the minibatch mix
  with the integer share of reference examples, and the nearest-neighbour ratios by brute
  force."""
  from cdiff_jax import train
  from cdiff_jax.data import sources
  from cdiff_jax.methods import tiw
  from configs import digits_tiw
  from experiments import tiw_compare
  config = digits_tiw.get_config()
  config.train.batch_size = 30
  config.method.ref_batch_fraction = 0.25   # 7.5 -> 8 reference examples of 30
  dataset = sources.load_dataset(config.data, 'train')
  bias, ref = tiw.split_indices(config.method, dataset,
                                train.train_indices(config.data, dataset))
  got = tiw_compare.split_frequencies(config, 10)
  count = lambda i: [float(np.sum(dataset.labels[i] == c)) / len(i) for c in range(10)]
  np.testing.assert_allclose(got['bias'], count(bias))
  np.testing.assert_allclose(got['ref'], count(ref))
  pi = 8 / 30
  np.testing.assert_allclose(got['obs_mix'], pi * np.array(count(ref)) +
                             (1 - pi) * np.array(count(bias)))
  assert (got['num_bias'], got['num_ref']) == (len(bias), len(ref))

  test = sources.to_float(sources.load_dataset(config.data, 'test').images)
  rng = np.random.default_rng(0)
  samples = np.concatenate([sources.to_float(dataset.images[ref[:5]]),
                            np.clip(test[:20] + rng.normal(0, 0.3, test[:20].shape), -1, 1)])

  def nn(x, pool):
    x, pool = x.reshape(len(x), -1).astype(np.float64), pool.reshape(len(pool), -1)
    return np.array([np.sqrt(((pool - q) ** 2).sum(1)).min() for q in x])

  ratio = lambda pool: np.median(nn(samples, pool)) / np.median(nn(test, pool))
  out = tiw_compare.copying(samples, config)
  ref_images = sources.to_float(dataset.images[ref])
  obs_images = sources.to_float(dataset.images[np.concatenate([bias, ref])])
  np.testing.assert_allclose(out['ref_nn_ratio'], ratio(ref_images), rtol=1e-4)
  np.testing.assert_allclose(out['obs_nn_ratio'], ratio(obs_images), rtol=1e-4)
  np.testing.assert_allclose(tiw_compare.nearest_distances(samples, ref_images, chunk=7),
                             nn(samples, ref_images), rtol=1e-4, atol=1e-3)


def test_finetune_helpers():
  """nearest_distance is the per-pixel RMS distance to the nearest data image, averaged over
  samples; the fine-tuning data set is the new images (source 0) then the generated ones
  (source 1); pre-training drops the held-out classes with its own steps and batch."""
  _run('''
    import numpy as np
    import experiments.finetune as f
    from cdiff_jax.data import sources
    from configs import digits_finetune
    rng = np.random.default_rng(0)
    s, d = rng.normal(size=(5, 3, 2, 1)), rng.normal(size=(7, 3, 2, 1))
    brute = np.mean([min(np.sqrt(np.mean((a - b) ** 2)) for b in d) for a in s])
    assert abs(f.nearest_distance(s, d) - brute) < 1e-9, (f.nearest_distance(s, d), brute)

    c = digits_finetune.get_config()
    c.finetune.pretrain_batch, c.finetune.pretrain_steps = 32, 40
    pre = f.pretrain_config(c)
    assert pre.method.name == 'dsm' and not pre.train.init_from
    assert tuple(pre.data.drop_classes) == tuple(c.finetune.pretrain_drop_classes)
    assert tuple(pre.data.keep_classes) == tuple(c.data.keep_classes)
    assert (pre.train.steps, pre.train.batch_size) == (40, 32)

    full = sources.load_dataset(c.data, 'train')
    gen = rng.uniform(-1, 1, (4,) + full.image_shape).astype(np.float32)
    gen_labels = np.array([9, 9, 3, 1])
    ds, new_images = f.build_finetune_dataset(c, full, gen, gen_labels)
    n = c.finetune.new_data_size
    assert len(ds) == n + 4 and len(new_images) == n
    np.testing.assert_array_equal(ds.attributes['source'], [0] * n + [1] * 4)
    np.testing.assert_array_equal(ds.images[n:], gen)
    np.testing.assert_array_equal(ds.labels[n:], gen_labels)
    np.testing.assert_array_equal(ds.images[:n], new_images)
    # the new images are distinct training images, with their own labels
    flat = sources.to_float(full.images).reshape(len(full), -1)
    idx = [int(np.argmin(((flat - x.ravel()) ** 2).sum(1))) for x in new_images]
    assert len(set(idx)) == n
    np.testing.assert_array_equal(ds.labels[:n], full.labels[idx])

    # The dropped classes' share is their summed frequency, named after the classes dropped.
    freqs = lambda *pairs: dict(class_frequencies=dict(pairs))
    pre = dict(eval=freqs((7, 0.01), (9, 0.02)))
    arms = dict(unconstrained=dict(eval=dict(freqs((7, 0.05), (9, 0.06)),
                                             nearest_new_data_distance=0.25)),
                constrained=dict(eval=dict(freqs((7, 0.1), (9, 0.125)),
                                           nearest_new_data_distance=0.3)))
    table = f.dropped_class_table((7, 9), pre, arms)
    assert '| unconstrained | 0.110 | 0.2500 |' in table, table
    assert '| constrained | 0.225 | 0.3000 |' in table, table
    assert '| pretrained (no classes 7, 9) | 0.030 | - |' in table, table
    assert 'fraction of classes 7, 9 |' in table, table
    one = f.dropped_class_table((7,), pre, arms)
    assert 'fraction of 7s |' in one and '| constrained | 0.100 |' in one, one
    print('ok')
  ''')


def test_guidance_sampling_in_batches_and_table():
  """evaluation.sample_in_batches (the script's sampling) gives exactly ``num`` samples,
  each batch conditioned on its own slice of the sequence and padded to the mesh's devices
  (a batch of 500 on 8 devices was refused after training); the table's columns hold the
  rows' own figures."""
  _run('''
    import numpy as np
    import experiments.digits_guidance as g
    from cdiff_jax import evaluation
    for devices, want in ((1, [10, 10, 3]), (4, [12, 12, 4])):
      sizes = []
      def sampler(params, rng, n, cond, progress=False):
        assert n % devices == 0, n
        sizes.append(n)
        return np.asarray(cond, np.float32)[:, None]   # each "sample" is its label
      x = evaluation.sample_in_batches(sampler, None, 23, lambda s, m: np.arange(s, s + m) % 10,
                                       seed=0, batch_size=10, num_devices=devices)
      assert sizes == want, sizes
      np.testing.assert_array_equal(x[:, 0], np.arange(23) % 10)

    rows = {'unconditional': dict(class_frequencies=list(np.linspace(0.01, 0.19, 10)),
                                  classifier_fid=12.34, num_samples=100, tv_to_uniform=0.2345),
            'CFG w=3': dict(class_frequencies=[0.1] * 10, classifier_fid=5.67, num_samples=100,
                            hit_rate=0.875, tv_to_uniform=0.0125)}
    meta = dict(guidance_classifier=dict(accuracy=0.8), sampler='ddim', num_steps=10,
                evaluation_classifier_accuracy=0.99, total_seconds=600.0, train_seconds=None,
                classifier_train_seconds=60.0, sampling_seconds=120.0)
    lines = [l.strip('|').split('|') for l in g.markdown(rows, meta, 3).splitlines()
             if l.startswith('|')]
    header = [h.strip() for h in lines[0]]
    table = {cells[0].strip(): dict(zip(header, (c.strip() for c in cells))) for cells in lines[2:]}
    for name, r in rows.items():
      t = table[name]
      hit = f"{r['hit_rate']:.3f}" if 'hit_rate' in r else '-'
      assert t['hit rate of requested class'] == hit
      assert float(t['frequency of 3']) == round(r['class_frequencies'][3], 3)
      assert float(t['TV to uniform']) == round(r['tv_to_uniform'], 3)
      assert float(t['classifier FID']) == round(r['classifier_fid'], 2)
      assert [float(v) for v in t['class frequencies 0..9'].split()] == [
          round(v, 2) for v in r['class_frequencies']]
    print('ok')
  ''')


def test_toy_scores_table_and_log_normalizer():
  """Mean log-likelihood with each sample floored at LL_FLOOR (non-finite ones too), the
  table's columns, and log Z by quadrature against a Gaussian energy's closed form."""
  _run('''
    import types
    import jax.numpy as jnp
    import numpy as np
    import experiments.toy_composition as t
    from cdiff_jax import toys
    from configs import toy_composition
    ring = toys.ring()
    x = np.array([[0.5, 0.0], [0.0, 0.49], [5.0, 5.0], [np.nan, 0.0], [0.3, 0.3]], np.float32)
    ll = np.asarray(ring.log_prob(jnp.asarray(x)), np.float64)
    assert ll[2] < t.LL_FLOOR and ll[0] > t.LL_FLOOR
    floored = [max(v, t.LL_FLOOR) if np.isfinite(v) else t.LL_FLOOR for v in ll]
    m = t.evaluate(ring, x, ring.sample(np.random.default_rng(0), 50))
    assert abs(m['log_likelihood'] - np.mean(floored)) < 1e-5, (m, floored)
    assert m['nonfinite'] == 1

    c = toy_composition.get_config()
    row = dict(benchmark='product', components='oracle', sampler='mala', log_likelihood=-1.25,
               exact_log_likelihood=-0.5, sliced_w2=0.0123, exact_sliced_w2=0.0045,
               accept_rate=0.75)
    line = [l for l in t.markdown_table([row], c, 60.0, {}).splitlines()
            if l.startswith('| product')][0]
    assert [s.strip() for s in line.strip('|').split('|')] == [
        'product', 'oracle', 'mala', '-1.250 (-0.500)', '0.0123 (0.0045)', '0.75']
    # The footnote's step sizes scale with sigma_t only under step_schedule='sigma'.
    assert f'MALA {c.mcmc.mala_step} x sigma_t^2;' in t.markdown_table([row], c, 60.0, {})
    c.mcmc.step_schedule = 'constant'
    note = t.markdown_table([row], c, 60.0, {})
    assert f'MALA {c.mcmc.mala_step}; U-HMC' in note and 'sigma_t' not in note

    schedule = t.score_model(c).schedule
    model = types.SimpleNamespace(
        schedule=schedule,
        energy=lambda p, x, tt: jnp.sum(x ** 2, -1) / (2 * p['s'] ** 2))
    s = np.array([0.15, 0.25])
    table = t.log_normalizer_table(model, {'s': jnp.asarray(s)}, np.array([0.05, 0.5]), 201)
    expected = np.log(2 * np.pi * s ** 2)
    np.testing.assert_allclose(table, np.stack([expected, expected]), atol=1e-3)
    # The noised data's own spread at high noise (variance a^2 s^2 + sigma^2): the grid
    # must reach it, not only the data's range.
    var = lambda p, tt: schedule.alpha(tt) ** 2 * p['s'] ** 2 + schedule.sigma(tt) ** 2
    model.energy = lambda p, x, tt: jnp.sum(x ** 2, -1) / (2 * var(p, tt))
    times = np.array([0.5, 0.9])
    table = t.log_normalizer_table(model, {'s': jnp.asarray(s)}, times, 201)
    expected = np.log(2 * np.pi * np.asarray(var({'s': s[None]}, times[:, None])))
    np.testing.assert_allclose(table, expected, atol=1e-3)
    print('ok')
  ''')


def test_toy_figures_draw_each_panels_own_density_and_tell_the_lines_apart(tmp_path):
  """components.png's panels each carry the contours of their own component (they all
  carried those of the five together), and toy_acceptance.png gives every curve its own
  (colour, line style): one colour per benchmark/components, one style per sampler."""
  _run('''
    import numpy as np
    import experiments.toy_composition as t
    from cdiff_jax import toys, writers
    drawn = {}
    def record(fig, path):
      drawn[path] = fig
    writers.save_figure = record
    x = np.zeros((4, 2), np.float32)
    ring, box = toys.ring(), toys.box(0.5)
    panels = {('learned', 'ring'): (x, ''), ('learned', 'small_box'): (x, '')}
    def paths(path):
      return [[p.vertices.tolist() for c in ax.collections for p in c.get_paths()]
              for ax in drawn[path].axes]
    t.plot_benchmark('both', '', panels, {'ring': ring, 'small_box': box})
    t.plot_benchmark('ring', '', panels, ring)
    t.plot_benchmark('box', '', panels, box)
    both, only_ring, only_box = paths('both'), paths('ring'), paths('box')
    assert both[0] == only_ring[0] and both[1] == only_box[1] and both[0] != both[1]
    curves = {f'{b}/{s}/{k}': (np.linspace(1, 0, 5), np.full(5, 0.5))
              for b in ('product', 'negation') for s in ('oracle', 'learned')
              for k in ('mala', 'hmc', 'ula')}
    t.plot_acceptance('acc', curves)
    lines = drawn['acc'].axes[0].get_lines()
    looks = {(l.get_color(), l.get_linestyle()) for l in lines}
    assert len(lines) == 12 and len(looks) == 12, looks
    print('ok')
  ''')


def test_toy_panel_titles_clear_the_figure_title_and_the_row_above(tmp_path):
  """The toy sample grids (square axes, two-line titles), as saved: no axes title overlaps
  the figure's title or another panel's frame (they did under tight_layout), in one row
  (components.png) and in two (the benchmarks')."""
  _run('''
    import sys
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    import experiments.toy_composition as t
    from cdiff_jax import toys, writers
    made = []
    new_figure = writers.new_figure
    writers.new_figure = lambda *a, **k: made.append(new_figure(*a, **k)) or made[-1]
    overlap = lambda a, b: a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1
    target = toys.benchmarks()['product'].target
    x = target.sample(np.random.default_rng(0), 50)
    for rows in (('learned',), ('oracle', 'learned')):
      panels = {(r, s): (x, 'LL 1.00  SW 0.050') for r in rows
                for s in ('diffusion', 'ula', 'mala', 'uhmc', 'hmc')}
      t.plot_benchmark(sys.argv[1] + '/t.png', 'ring AND vertical bar', panels, target,
                       exact=(x, 'LL 1.50'))
      fig, axes = made[-1]
      renderer = FigureCanvasAgg(fig).get_renderer()  # the positions of the saved draw
      frames = [ax.get_window_extent(renderer) for ax in axes.flat]
      titles = [ax.title.get_window_extent(renderer) for ax in axes.flat]
      top = fig._suptitle.get_window_extent(renderer)
      assert all(b.height > 0 and not overlap(b, top) for b in titles), rows
      assert not any(overlap(b, f) for b in titles for f in frames), rows
    print('ok')
  ''', str(tmp_path))


def test_a_finished_constrained_arm_is_tied_to_its_reference_parameters(tmp_path):
  """The constrained arm's config carries a hash of the reference parameters its thresholds
  come from, so a finished arm is refused, not reused, once the reference has been
  retrained (an earlier version compared the path alone and reused the old thresholds)."""
  from configs import digits_minority
  from cdiff_jax import checkpoint
  from experiments import minority
  config = digits_minority.get_config()
  config.method.reference_workdir = str(tmp_path / 'reference')

  def reference(params, step):  # the newest checkpoint is the one read
    ckpt = checkpoint.Checkpointer(str(tmp_path / 'reference' / 'checkpoints'))
    ckpt.save(step, dict(params=params, ema_params=params), config)
    ckpt.close()
    return minority.with_reference_key(config)

  first = reference({'w': np.arange(3.0)}, 1)
  assert first.method.reference_key == reference({'w': np.arange(3.0)}, 2).method.reference_key
  retrained = reference({'w': np.arange(3.0) + 1}, 3)
  assert retrained.method.reference_key != first.method.reference_key
  assert 'reference_key' not in config.method   # the caller's config is left as it was
  (tmp_path / 'arm').mkdir()
  (tmp_path / 'arm' / 'config.json').write_text(first.to_json_best_effort())
  (tmp_path / 'arm' / 'summary.json').write_text(json.dumps(dict(final_step=1500)))
  with pytest.raises(config_lib.ConfigError, match='method.reference_key'):
    minority.run_arm(retrained, str(tmp_path / 'arm'), progress=False)
  config.method.threshold_mode = 'absolute'
  assert minority.with_reference_key(config) is config


def test_experiments_refuse_an_unevaluated_arm_before_any_work(tmp_path):
  """The minority and fine-tuning experiments compare arms by their evaluations: with
  eval.enabled=False they stop with the fix named, before anything is trained or written
  (run_arm used to fail on a missing 'eval' after training the arm)."""
  for module in ('minority', 'finetune'):
    _run(f'''
      import os, sys
      import pytest
      from cdiff_jax.config import ConfigError
      from configs import digits_finetune, digits_minority
      from experiments import {module} as experiment
      config = (digits_minority if '{module}' == 'minority' else digits_finetune).get_config()
      config.eval.enabled = False
      with pytest.raises(ConfigError, match='eval.enabled=False: .*set eval.enabled=True'):
        if '{module}' == 'minority':
          experiment.run_arm(experiment.unconstrained_arm(config), sys.argv[1], False)
        else:
          experiment.validate(config, 1000, 10)
      assert not os.path.exists(sys.argv[1])
      print('ok')
    ''', str(tmp_path / 'arm'))
