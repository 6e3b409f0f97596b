"""Samples from a trained run (``python -m cdiff_jax.sample``), checked against the same
samples composed by hand from the library: the run's checkpoint, a DDIM ``Sampler`` over
classifier-free guided eps at the weight asked for, and the labels asked for; the command
line writes those images and labels, and its evaluation is that of the run's evaluation
classifier recomputed from the definitions; bad input stops with one line naming the flag."""

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import run_files
from cdiff_jax import config as config_lib
from cdiff_jax import evaluation, sample, train
from cdiff_jax.data import sources
from cdiff_jax.methods import guidance
from cdiff_jax.sampling import diffusion, mcmc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config():
  c = run_files.tiny_digits_config(log_every=4, checkpoint_every=4)
  c.model.conditional, c.model.class_dropout = True, 0.1
  c.eval.enabled, c.eval.num_samples, c.eval.classifier_steps = True, 6, 30
  return c


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('cond_run'))
  train.train_and_evaluate(_config(), workdir, progress=False)
  return workdir


def _command_line(*flags) -> subprocess.CompletedProcess:
  """``python -m cdiff_jax.sample FLAGS --no_progress``, which must succeed."""
  done = subprocess.run([sys.executable, '-m', 'cdiff_jax.sample', *flags, '--no_progress'],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  return done


def _by_hand(workdir, n, seed, labels, w, num_steps):
  """The first batch of ``evaluation.generate`` written out: DDIM over the CFG eps of the
  run's EMA parameters, n rounded up to the 2 test devices."""
  exp, state = train.load_run(workdir)
  eps = lambda p, x, t, y: guidance.cfg_eps(exp.model, p, x, t, y, w, exp.num_classes)
  sampler = diffusion.Sampler(eps, exp.model.schedule, exp.image_shape, sampler='ddim',
                              num_steps=num_steps, eta=0.0, clip=exp.config.sample.clip,
                              mesh=exp.mesh)
  n_pad = -(-n // 2) * 2
  y = np.resize(np.asarray(labels, np.int32), n_pad)
  x = sampler(state.ema_params, jax.random.fold_in(jax.random.key(seed), 0), n_pad, y)
  return np.asarray(x)[:n]


def test_draw_is_the_guided_sampler_of_the_checkpoint(run):
  out = sample.draw(run, num_samples=5, seed=3, classes=[2, 7], guidance_scale=2.0,
                    num_steps=3)
  np.testing.assert_array_equal(out['labels'], [2, 7, 2, 7, 2])
  assert out['images'].shape == (5, 8, 8, 1)
  np.testing.assert_allclose(out['images'], _by_hand(run, 5, 3, [2, 7], 2.0, 3), atol=1e-5)
  # The run's own guidance weight (1) and another seed give other images.
  plain = sample.draw(run, num_samples=5, seed=3, classes=[2, 7], num_steps=3)['images']
  np.testing.assert_allclose(plain, _by_hand(run, 5, 3, [2, 7], 1.0, 3), atol=1e-5)
  assert np.abs(plain - out['images']).max() > 1e-3
  other = sample.draw(run, num_samples=5, seed=4, classes=[2, 7], guidance_scale=2.0,
                      num_steps=3)['images']
  assert np.abs(other - out['images']).max() > 1e-3


NOT3 = dict(concepts=[guidance.ANY, 3], weights=[1.0, -2.0])  # "any digit but 3", weight 2


def _composed_by_hand(workdir, n, seed, compose, num_steps):
  """The first batch of ``evaluation.generate`` with the run's sampler (DDIM) over
  ``guidance.composed_eps_fn`` and the composition as every sample's cond."""
  exp, state = train.load_run(workdir)
  sampler = diffusion.Sampler(guidance.composed_eps_fn(exp.model, exp.num_classes),
                              exp.model.schedule, exp.image_shape, sampler='ddim',
                              num_steps=num_steps, eta=0.0, clip=exp.config.sample.clip,
                              mesh=exp.mesh)
  n_pad = -(-n // 2) * 2
  cond = guidance.make_composition(compose['concepts'], compose['weights'], n_pad,
                                   exp.num_classes)
  x = sampler(state.ema_params, jax.random.fold_in(jax.random.key(seed), 0), n_pad, cond)
  return np.asarray(x)[:n]


def test_a_machine_whose_device_count_does_not_divide_the_runs_batch_samples_it(run, tmp_path):
  """A run trained with batch 16 on 2 devices, sampled where 3 are visible: the mesh takes
  the 2 that divide its batch (before, the batch check refused, naming a field the sampler
  cannot set), and the samples are those drawn on 2 devices."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=3')
  png = tmp_path / 'three.png'
  done = subprocess.run([sys.executable, '-m', 'cdiff_jax.sample', f'--workdir={run}',
                         '--classes=2', '--num_samples=3', '--num_steps=2', '--seed=4',
                         f'--out={png}', '--no_progress'], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  np.testing.assert_allclose(np.load(str(tmp_path / 'three.npz'))['images'],
                             _by_hand(run, 3, 4, [2], 1.0, 2), atol=1e-5)


def test_compose_is_the_composed_sampler_of_the_checkpoint(run):
  out = sample.draw(run, num_samples=5, seed=3, compose=NOT3, num_steps=3)
  assert out['labels'] is None
  np.testing.assert_allclose(out['images'], _composed_by_hand(run, 5, 3, NOT3, 3), atol=1e-5)
  # One positive class at weight w is classifier-free guidance (guidance.cfg_eps) at w.
  single = sample.draw(run, num_samples=4, seed=3, compose=dict(concepts=[7], weights=[2.0]),
                       num_steps=3)['images']
  cfg = sample.draw(run, num_samples=4, seed=3, classes=[7], guidance_scale=2.0,
                    num_steps=3)['images']
  np.testing.assert_allclose(single, cfg, atol=1e-5)
  assert np.abs(single - out['images'][:4]).max() > 1e-3


def test_draw_takes_the_command_lines_forms():
  """The library takes the --compose text and one class as an int (TypeErrors inside draw);
  a string of digits is refused, not read digit by digit."""
  assert sample._library_forms(7, 'any:1,3:-2') == ([7], NOT3)
  assert sample._library_forms(np.int64(7), None) == ([7], None)   # e.g. labels[0]
  assert sample._library_forms([4, 5], NOT3) == ([4, 5], NOT3)
  with pytest.raises(config_lib.ConfigError, match=r"classes='45': give a list of class"):
    sample._library_forms('45', None)


def test_compose_with_mcmc_is_the_annealed_sampler_of_the_composed_potential(run):
  """ULA over ``guidance.composed_potential`` of the (score-only) conditional run; the
  run's own guidance weight does not stand in the way of a composition."""
  settings = dict(kind='ula', steps_per_level=1, step_size=0.05)
  out = sample.draw(run, num_samples=3, seed=2, num_steps=3, mcmc=settings, compose=NOT3)
  exp, state = train.load_run(run)
  sampler = mcmc.AnnealedMCMC(guidance.composed_potential(exp.model, exp.num_classes),
                              exp.model.schedule, exp.image_shape, mesh=exp.mesh, num_steps=3,
                              clip=exp.config.sample.clip or None, **settings)
  cond = guidance.make_composition(NOT3['concepts'], NOT3['weights'], 4, exp.num_classes)
  x, _ = sampler(state.ema_params, jax.random.fold_in(jax.random.key(2), 0), 4, cond)
  np.testing.assert_allclose(out['images'], np.asarray(x)[:3], atol=1e-5)


@pytest.mark.parametrize('compose, expected', [
    (dict(concepts=[guidance.ANY, 1], weights=[1.0, -3.0]), [0, 2, 3, 4, 5, 6, 7, 8, 9]),
    (dict(concepts=[4, 7], weights=[1.0, 1.0]), [4, 7]),
    (dict(concepts=[4, 7, 1], weights=[3.0, 1.0, -1.0]), [4, 7]),
    (dict(concepts=[guidance.ANY, 2, 5], weights=[1.0, -1.0, -1.0]), [0, 1, 3, 4, 6, 7, 8, 9]),
])
def test_composition_classes(compose, expected):
  assert sample.composition_classes(compose, np.arange(10)) == expected


def test_command_line_writes_images_labels_and_their_evaluation(run, tmp_path):
  png = str(tmp_path / 'grid.png')
  done = _command_line(f'--workdir={run}', '--classes=3,1', '--num_samples=4', '--num_steps=2',
                       '--seed=5', f'--out={png}', '--evaluate')
  assert os.path.getsize(png) > 0
  saved = np.load(str(tmp_path / 'grid.npz'))
  np.testing.assert_array_equal(saved['labels'], [3, 1, 3, 1])
  np.testing.assert_allclose(saved['images'], _by_hand(run, 4, 5, [3, 1], 1.0, 2), atol=1e-5)
  # The evaluation, recomputed from its definitions with the run's classifier: frequencies
  # of its labels, TV to uniform over {1, 3}, FID of its features against held-out 1s and 3s.
  exp = train.load_run(run)[0]
  clf = evaluation.classifier_for(exp.config)
  predicted = clf.predict(saved['images'])
  np.testing.assert_array_equal(saved['predicted'], predicted)
  freqs = np.bincount(predicted, minlength=10) / 4
  target = np.isin(np.arange(10), [1, 3]) / 2
  test = sources.load_dataset(exp.config.data, 'test')
  held_out = sources.to_float(test.images[np.isin(test.labels, [1, 3])])
  fid = evaluation.frechet_distance(clf.features(saved['images']), clf.features(held_out))
  result = json.load(open(tmp_path / 'grid.json'))
  np.testing.assert_allclose(result['class_frequencies'], freqs)
  assert result['uniform_over'] == [1, 3]
  assert result['tv_to_uniform'] == pytest.approx(0.5 * np.abs(freqs - target).sum())
  assert result['classifier_fid'] == pytest.approx(fid, rel=1e-4)
  assert result['num_reference'] == len(held_out)
  assert result['agreement_with_labels'] == pytest.approx(np.mean(predicted == [3, 1, 3, 1]))
  printed = re.search(r'^  (0:.*)$', done.stdout, re.M).group(1)
  assert printed == ' '.join(f'{c}:{f:.3f}' for c, f in enumerate(freqs))
  assert f'TV to uniform over the classes 1,3: {result["tv_to_uniform"]:.3f}' in done.stdout
  # Other samples to the same grid without --evaluate: no evaluation of the old ones beside them
  _command_line(f'--workdir={run}', '--classes=0', '--num_samples=2', '--num_steps=2',
                f'--out={png}')
  np.testing.assert_array_equal(np.load(str(tmp_path / 'grid.npz'))['labels'], [0, 0])
  assert not (tmp_path / 'grid.json').exists()


@pytest.fixture(scope='module')
def energy_run(tmp_path_factory):
  """An unconditional energy-parameterized run (MALA and HMC need its energies)."""
  c = run_files.tiny_digits_config(log_every=4, checkpoint_every=4)
  c.model.parameterization = 'energy'
  workdir = str(tmp_path_factory.mktemp('energy_run'))
  train.train_and_evaluate(c, workdir, progress=False)
  return workdir


def _mcmc_by_hand(workdir, n, seed, labels, **settings):
  """``mcmc.AnnealedMCMC`` over the checkpoint's potential, keyed as ``draw`` keys it, with
  the run's ``sample.clip``."""
  exp, state = train.load_run(workdir)
  sampler = mcmc.AnnealedMCMC(mcmc.potential_from_model(exp.model), exp.model.schedule,
                              exp.image_shape, mesh=exp.mesh, clip=exp.config.sample.clip or None,
                              **settings)
  n_pad = -(-n // 2) * 2
  y = None if labels is None else np.resize(np.asarray(labels, np.int32), n_pad)
  x, info = sampler(state.ema_params, jax.random.fold_in(jax.random.key(seed), 0), n_pad, y)
  return np.asarray(x)[:n], info


def test_mcmc_is_the_annealed_sampler_of_the_checkpoint(run):
  settings = dict(steps_per_level=1, step_size=0.05)
  out = sample.draw(run, num_samples=3, seed=2, classes=[5], num_steps=3,
                    mcmc=dict(kind='ula', **settings))
  ref, _ = _mcmc_by_hand(run, 3, 2, [5], kind='ula', num_steps=3, **settings)
  np.testing.assert_allclose(out['images'], ref, atol=1e-5)
  np.testing.assert_array_equal(out['labels'], [5, 5, 5])
  plain = sample.draw(run, num_samples=3, seed=2, classes=[5], num_steps=3)['images']
  assert np.abs(plain - out['images']).max() > 1e-3  # the MCMC steps moved the samples


def test_hmc_on_an_energy_run_reports_its_acceptance(energy_run, tmp_path):
  settings = dict(steps_per_level=1, num_leapfrog=2)
  out = sample.draw(energy_run, num_samples=4, seed=1, num_steps=3,
                    mcmc=dict(kind='hmc', **settings))
  ref, info = _mcmc_by_hand(energy_run, 4, 1, None, kind='hmc', num_steps=3, **settings)
  np.testing.assert_allclose(out['images'], ref, atol=1e-5)
  np.testing.assert_allclose(out['info']['accept_rate'], info['accept_rate'], atol=1e-6)
  assert out['info']['accept_rate'].shape == (3,)
  assert np.all((0 <= out['info']['accept_rate']) & (out['info']['accept_rate'] <= 1))
  done = _command_line(f'--workdir={energy_run}', '--mcmc=hmc', '--steps_per_level=1',
                       '--num_leapfrog=2', '--num_steps=3', '--num_samples=4', '--seed=1',
                       f'--out={tmp_path / "hmc.png"}')
  np.testing.assert_allclose(np.load(str(tmp_path / 'hmc.npz'))['images'], ref, atol=1e-5)
  rate = out['info']['accept_rate']
  assert (f'HMC acceptance rate: mean {rate.mean():.3f} over 3 levels (first {rate[0]:.3f}, '
          f'last {rate[-1]:.3f})') in done.stdout


@pytest.fixture(scope='module')
def bf16_energy_run(tmp_path_factory):
  """The energy run's config trained with ``model.dtype='bfloat16'``."""
  c = run_files.tiny_digits_config(log_every=4, checkpoint_every=4)
  c.model.parameterization, c.model.dtype = 'energy', 'bfloat16'
  workdir = str(tmp_path_factory.mktemp('bf16_energy_run'))
  train.train_and_evaluate(c, workdir, progress=False)
  return workdir


@pytest.mark.parametrize('kind', [pytest.param('mala', marks=pytest.mark.slow), 'hmc'])
def test_metropolis_kinds_run_a_bfloat16_run_in_float32(bf16_energy_run, kind):
  """The Metropolis test compares energies of many nats to within a fraction of one, so MALA
  and HMC evaluate a bfloat16 run's network in float32 (its parameters are float32): the
  annealed sampler of the checkpoint's float32 potential, acceptance included. ULA keeps
  the run's bfloat16 (its samples are not the float32 ones)."""
  settings = dict(steps_per_level=2, num_leapfrog=2, step_size=5.0)
  out = {k: sample.draw(bf16_energy_run, num_samples=4, seed=3, num_steps=3,
                        mcmc=dict(kind=k, **settings)) for k in (kind, 'ula')}
  exp, state = train.load_run(bf16_energy_run)
  model = dataclasses.replace(exp.model, net=exp.model.net.clone(dtype=jnp.float32))
  for k in (kind, 'ula'):
    sampler = mcmc.AnnealedMCMC(mcmc.potential_from_model(model), model.schedule,
                                exp.image_shape, mesh=exp.mesh, kind=k, num_steps=3,
                                clip=exp.config.sample.clip or None, **settings)
    x, info = sampler(state.ema_params, jax.random.fold_in(jax.random.key(3), 0), 4, None)
    if k == kind:
      np.testing.assert_allclose(out[k]['images'], x, atol=1e-5)
      np.testing.assert_allclose(out[k]['info']['accept_rate'], info['accept_rate'],
                                 atol=1e-6)
    else:
      assert np.abs(out[k]['images'] - np.asarray(x)).max() > 1e-3


@pytest.mark.slow  # 1 min; HMC's acceptance per run: test_hmc_on_an_energy_run_reports_its_acceptance
def test_hmc_acceptance_is_averaged_over_batches(energy_run, monkeypatch):
  """A request larger than a batch (batches of 4 here; 1,000 in use): the images are the
  batches' samples, each keyed as ``evaluation.generate`` keys its batches, and the rate per
  level is the batches' rates weighted by their sizes (4, 4, 2)."""
  import functools
  monkeypatch.setattr(evaluation, 'generate',
                      functools.partial(evaluation.generate, batch_size=4))
  # a step large enough to be rejected at some levels, not all (the tiny model's energy is
  # nearly flat; rates 0.25 / 0.5 / 0 in the three batches at the first level)
  settings = dict(kind='hmc', steps_per_level=1, num_leapfrog=2, step_size=3.0)
  out = sample.draw(energy_run, num_samples=10, seed=5, num_steps=3, mcmc=settings)
  exp, state = train.load_run(energy_run)
  sampler = mcmc.AnnealedMCMC(mcmc.potential_from_model(exp.model), exp.model.schedule,
                              exp.image_shape, mesh=exp.mesh, num_steps=3,
                              clip=exp.config.sample.clip or None, **settings)
  images, rates = [], []
  for i, n in enumerate((4, 4, 2)):
    x, info = sampler(state.ema_params, jax.random.fold_in(jax.random.key(5), i), n, None)
    images.append(np.asarray(x))
    rates.append(np.asarray(info['accept_rate']))
  np.testing.assert_allclose(out['images'], np.concatenate(images), atol=1e-5)
  expected = (4 * rates[0] + 4 * rates[1] + 2 * rates[2]) / 10
  np.testing.assert_allclose(out['info']['accept_rate'], expected, atol=1e-6)
  assert not np.allclose(expected, np.mean(rates, 0))  # the weights matter here


def test_command_line_compose_and_its_evaluation(run, tmp_path):
  """--compose=any:1,3:-2: the composed samples, no labels, and an evaluation against the
  classes the composition asks for (all but 3)."""
  png = str(tmp_path / 'not3.png')
  _command_line(f'--workdir={run}', '--compose=any:1,3:-2', '--num_samples=4', '--num_steps=3',
                '--seed=3', f'--out={png}', '--evaluate')
  saved = np.load(str(tmp_path / 'not3.npz'))
  assert 'labels' not in saved
  np.testing.assert_allclose(saved['images'], _composed_by_hand(run, 4, 3, NOT3, 3), atol=1e-5)
  result = json.load(open(tmp_path / 'not3.json'))
  assert result['compose'] == 'any:1,3:-2'
  assert result['uniform_over'] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
  assert 'agreement_with_labels' not in result
  exp = train.load_run(run)[0]
  again = evaluation.evaluate_images(exp, saved['images'], [0, 1, 2, 4, 5, 6, 7, 8, 9])
  for key in ('class_frequencies', 'tv_to_uniform', 'classifier_fid', 'num_reference'):
    np.testing.assert_allclose(result[key], again[key], rtol=1e-5, err_msg=key)


def test_a_stop_while_the_samples_are_written_leaves_no_evaluation_of_other_samples(
    run, tmp_path):
  """A .json beside the .npz describes the samples in it: a stop (SIGTERM, Ctrl-C) inside
  the .npz's write of a second draw to the same path leaves the first draw's .npz whole and
  no .json (not one of the second draw's samples beside the first draw's .npz)."""
  png = str(tmp_path / 'drawn.png')
  flags = [f'--workdir={run}', '--num_samples=4', '--num_steps=3', f'--out={png}', '--evaluate']
  _command_line(*flags, '--seed=3')
  first = dict(np.load(str(tmp_path / 'drawn.npz')))
  stop_in_savez = ('import runpy, sys, numpy as np\n'
                   'def savez(file, *a, **k):\n'
                   '  (open(file, "wb") if isinstance(file, str) else file).write(b"PK half")\n'
                   '  raise KeyboardInterrupt\n'
                   'np.savez = savez\n'
                   'sys.argv = ["cdiff_jax.sample"] + sys.argv[1:]\n'
                   'runpy.run_module("cdiff_jax.sample", run_name="__main__")\n')
  done = subprocess.run([sys.executable, '-c', stop_in_savez, *flags, '--seed=4',
                         '--no_progress'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 130 and 'interrupted' in done.stderr, done.stderr[-2000:]
  assert not (tmp_path / 'drawn.json').exists()
  saved = np.load(str(tmp_path / 'drawn.npz'))
  assert saved.keys() == first.keys()
  for key, value in first.items():
    np.testing.assert_array_equal(saved[key], value, err_msg=key)


def test_eval_seed_redraws_the_runs_evaluation(run):
  """The run's eval.json (written by the launcher) again, from samples drawn afresh."""
  saved = json.load(open(os.path.join(run, 'eval.json')))
  out = sample.draw(run, num_samples=saved['num_samples'], seed=evaluation.EVAL_SEED)
  again = evaluation.evaluate_images(out['exp'], out['images'])
  for key in ('class_frequencies', 'tv_to_uniform', 'classifier_fid', 'num_reference'):
    np.testing.assert_allclose(again[key], saved[key], rtol=1e-5, err_msg=key)


def _unconditional_copy(run, tmp_path, **model_fields):
  """A workdir with the run's config.json made unconditional, or with ``model_fields``
  (checked before loading)."""
  wd = tmp_path / 'uncond'
  wd.mkdir()
  cfg = json.load(open(os.path.join(run, 'config.json')))
  cfg['model'].update(model_fields or dict(conditional=False))
  json.dump(cfg, open(wd / 'config.json', 'w'))
  return str(wd)


def _dead_pid() -> int:
  """The pid of a process that has ended."""
  p = subprocess.Popen([sys.executable, '-c', 'pass'])
  p.wait()
  return p.pid


@pytest.mark.parametrize('case, kwargs, expected', [
    ('missing', {}, r'--workdir=\S+: no such folder'),
    ('parent', {}, r'holds no config.json.*it holds the runs arm .*--workdir=\S+arm\.'),
    ('no checkpoint', {}, r'holds no checkpoint yet: wait for its run\'s first checkpoint '
                          r'\(train.checkpoint_every\), or run it again if it has stopped'),
    ('stopped before a checkpoint', {}, r'holds no checkpoint: its run stopped before its '
                                        r'first one; run its training command again'),
    ('training', {}, r'holds no checkpoint yet; its run \(pid \d+ on \S+, since T\) is '
                     r'training: wait for its first checkpoint'),
    ('nested', {}, r'it holds the runs ref0.1/arm .*--workdir=\S+ref0.1/arm\.'),
    ('toy', {}, r"holds experiments/toy_composition.py's 2-D components, not a run of images: "
                r'load them with toy_composition.train_components'),
    ('run', dict(classes=[4, 12]), r'--classes: .* not trained on class\(es\) 12; it knows '
                                   r'0,1,2,3,4,5,6,7,8,9\.'),
    # -1 (a composition's "any class") is not a class: it drew the null class's samples.
    ('run', dict(classes=[-1]), r'--classes: .* not trained on class\(es\) -1; it knows'),
    ('run', dict(sampler='leapfrog'), r"^--sampler=leapfrog: must be one of \("),
    ('run', dict(num_samples=0), r'^--num_samples=0: give a positive number'),
    ('run', dict(eta=2.0), r'^--eta=2.0: must lie in \[0, 1\]'),
    # Read by DDIM only: another sampler ignored it silently.
    ('run', dict(eta=0.5, sampler='heun'), r"^--eta=0.5: read only by the DDIM sampler, and "
                                           r"this draw uses 'heun'; add --sampler=ddim"),
    # NaN passed the checks and drew all-NaN images.
    ('run', dict(guidance_scale=float('nan')), r'^--guidance_scale=nan: must be a finite'),
    ('unconditional', dict(classes=[1]), r'^--classes=1: .* unconditional model; drop'),
    ('unconditional', dict(guidance_scale=3.0), r'^--guidance_scale=3.0: .* unconditional'),
    ('run', dict(mcmc=dict(kind='mala')), r'^--mcmc=mala: its Metropolis test needs energies'
                                          r'.* score-only'),
    ('run', dict(mcmc=dict(kind='ula'), guidance_scale=2.0), r'^--mcmc=ula .* drop '
                                                              r'--guidance_scale'),
    ('run', dict(mcmc=dict(kind='uhmc', damping=0.0)), r'^--damping=0.0: give a number in'),
    ('unconditional', dict(compose=NOT3), r'^--compose=any:1,3:-2: .* unconditional model; '
                                          r'drop --compose'),
    ('no null class', dict(compose=NOT3), r'^--compose=any:1,3:-2: .* never trained the null '
                                          r'class'),
    ('run', dict(compose=NOT3, classes=[1]), r'^--compose=any:1,3:-2 and --classes: .* drop '
                                             r'--classes'),
    ('run', dict(compose=NOT3, guidance_scale=2.0), r'^--compose=any:1,3:-2 and '
                                                    r'--guidance_scale: .* drop'),
    ('run', dict(compose=dict(concepts=[3], weights=[-1.0])), r'^--compose=3:-1: NOT needs at '
                                                              r'least one positive'),
    ('run', dict(compose=dict(concepts=[guidance.ANY, 12], weights=[1.0, -1.0])),
     r'^--compose: .* not trained on class\(es\) 12'),
])
def test_bad_input_is_one_line_naming_the_flag(run, tmp_path, case, kwargs, expected):
  if case == 'missing':
    workdir = str(tmp_path / 'nothing')
  elif case == 'parent':
    os.makedirs(tmp_path / 'arm')
    shutil.copy(os.path.join(run, 'config.json'), tmp_path / 'arm')
    workdir = str(tmp_path)
  elif case in ('no checkpoint', 'stopped before a checkpoint', 'training'):
    shutil.copy(os.path.join(run, 'config.json'), tmp_path)
    workdir = str(tmp_path)
    # what the last run in the workdir left in its .lock: a pid that is gone, or this one
    pid = {'training': os.getpid(), 'stopped before a checkpoint': _dead_pid()}.get(case)
    if pid is not None:
      (tmp_path / '.lock').write_text(f'pid {pid} on {socket.gethostname()}, since T\n')
  elif case == 'nested':
    os.makedirs(tmp_path / 'ref0.1' / 'arm')
    shutil.copy(os.path.join(run, 'config.json'), tmp_path / 'ref0.1' / 'arm')
    workdir = str(tmp_path)
  elif case == 'toy':
    cfg = json.load(open(os.path.join(run, 'config.json')))
    cfg['data']['name'] = 'toy'
    json.dump(cfg, open(tmp_path / 'config.json', 'w'))
    workdir = str(tmp_path)
  elif case == 'unconditional':
    workdir = _unconditional_copy(run, tmp_path)
  elif case == 'no null class':
    workdir = _unconditional_copy(run, tmp_path, conditional=True, class_dropout=0.0)
  else:
    workdir = run
  with pytest.raises(config_lib.ConfigError, match=expected):
    sample.draw(workdir, **kwargs)


@pytest.mark.parametrize('flag, message', [
    ('--classes=4,x', '--classes=4,x: give class indices separated by commas, e.g. '
                      '--classes=4,5,7.'),
    ('--compose=any-1', '--compose=any-1: give CLASS:WEIGHT pairs separated by commas, CLASS a '
                        'class index or "any" (the unconditional model), e.g. '
                        '--compose=any:1,1:-3 (any digit but 1) or --compose=4:1,7:1 (4 AND 7).'),
    # Checked before anything is drawn (the grid's writer would fail after the sampling).
    ('--out=drawn/seed0', '--out=drawn/seed0: give a path ending in .png (the .npz and .json go '
                          'beside it), e.g. --out=drawn/seed0.png.'),
    ('--out=setup.py/x.png', f'--out=setup.py/x.png: cannot write files in '
                             f'{os.path.join(ROOT, "setup.py")} (File exists); give another '
                             'path.'),
    ('--num_samples=1 --evaluate'.split(), "--num_samples=1 with --evaluate: the classifier FID "
                                           "needs at least 2 samples (1,000 give figures "
                                           "comparable with a run's eval.json)."),
    # Settings the command would not read (a forgotten --mcmc drew plain samples silently).
    ('--step_size=0.1', '--step_size: an MCMC setting, read only with --mcmc; add '
                        '--mcmc=ula|mala|uhmc|hmc, or drop it.'),
    ('--mcmc=ula --eta=0.5'.split(), "--eta with --mcmc=ula: annealed MCMC replaces the run's "
                                     "sampler (its levels: --num_steps); drop --eta."),
])
def test_command_line_error_exit_status(tmp_path, flag, message):
  flags = flag if isinstance(flag, list) else [flag]
  done = subprocess.run([sys.executable, '-m', 'cdiff_jax.sample', f'--workdir={tmp_path}',
                         *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [f'error: {message}']


@pytest.mark.parametrize('n, k', [(300, 3), (64, 10), (1000, 10), (5, 2), (30, 3), (2, 9)])
def test_grid_columns_hold_one_class_each(n, k):
  ncols = sample.grid_columns(n, k)
  assert ncols % k == 0
  labels = np.arange(n) % k  # what sample_labels gives, as class indices
  rows = np.resize(np.pad(labels, (0, -n % ncols), constant_values=-1), (-(-n // ncols), ncols))
  for column in rows.T:
    assert len(set(column[column >= 0])) <= 1
  if n >= 4 * k * k:  # room for a near-square grid
    assert 0.5 <= ncols / np.ceil(n / ncols) <= 2
