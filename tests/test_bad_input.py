"""Catalogue of bad input through the launcher: each case stops with exit status 2 and ONE
`error:` line naming the problem, no traceback, and leaves the workdir as it was (an
existing run's checkpoints, config and metrics untouched; a new workdir not created)."""

import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import run_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {'model.ch': 16, 'model.attn_levels': (), 'train.steps': 4, 'train.batch_size': 16,
        'sample.num_steps': 2, 'sample.num_samples': 4}
TINY_ARGS = [f'--config.{f}={"()" if v == () else v}' for f, v in TINY.items()]
MISSING = '/nonexistent/mnist_idx'
# The constrained demo takes its thresholds from a reference run's workdir.
REFERENCE = '--config.method.reference_workdir={existing}'

# (config file, overrides, text the error line must contain)
CASES = {
    'wrong field name': ('digits_dsm', ['--config.train.stepz=3'],
                         "error: --config.train.stepz=3: no such config field 'stepz'; did you "
                         "mean 'steps'?"),
    'wrong section': ('digits_dsm', ['--config.optimizer.lr=0.1'],
                      '--config.optimizer.lr=0.1: no such config section: optimizer'),
    'wrong type, named among other overrides': (
        'digits_dsm', ['--config.train.log_every=4', '--config.sample.num_steps=abc'],
        "error: --config.sample.num_steps=abc: must be an integer, not 'abc'."),
    'wrong type (int)': ('digits_dsm', ['--config.train.batch_size=abc'], 'batch_size'),
    'wrong type (float)': ('digits_dsm', ['--config.optim.lr=fast'],
                           "error: --config.optim.lr=fast: must be a number, not 'fast'."),
    'tuple that does not parse': ('digits_dsm', ['--config.model.ch_mult=abc'],
                                  "config.model.ch_mult=('abc',): must be a tuple of integers"),
    'unknown choice': ('digits_dsm', ['--config.sample.sampler=euler'], 'sample.sampler'),
    'negative dual step': ('digits_minority', ['--config.method.dual_lr=-0.5', REFERENCE],
                           'config.method.dual_lr=-0.5'),
    'reference fraction above 1': ('digits_tiw', ['--config.method.ref_fraction=1.5'],
                                   'ref_fraction'),
    'unknown dataset': ('digits_dsm', ['--config.data.name=imagenet'], "data.name='imagenet'"),
    'image size of the data': ('digits_dsm', ['--config.data.image_size=16'],
                               'data.image_size=16'),
    'image size the model cannot take': ('digits_dsm', ['--config.model.ch_mult=(1,2,2,2,2)'],
                                         'model.ch_mult'),
    'negative seed': ('digits_dsm', ['--config.seed=-1'], 'config.seed=-1: must be >= 0'),
    'feature extractor that does not import': (
        'digits_dsm', ['--config.eval.feature_fn=my_inception:features',
                       '--config.eval.enabled=True'],
        "config.eval.feature_fn='my_inception:features': module 'my_inception' does not "
        'import'),
    'feature extractor without its function': (
        'digits_dsm', ['--config.eval.feature_fn=run_files', '--config.eval.enabled=True'],
        "config.eval.feature_fn='run_files': give 'package.module:function'"),
    'feature extractor module without that function': (
        'digits_dsm', ['--config.eval.feature_fn=json:featurez',
                       '--config.eval.enabled=True'],
        "config.eval.feature_fn='json:featurez': json has no function 'featurez'."),
    'no final samples': ('digits_dsm', ['--config.sample.num_samples=0'],
                         'config.sample.num_samples=0: must be positive'),
    'learning rate that ends negative': ('digits_dsm', ['--config.optim.final_lr_fraction=-1.0'],
                                         'config.optim.final_lr_fraction=-1.0'),
    'groups that do not divide the stem width': ('digits_dsm', ['--config.model.ch=12',
                                                                '--config.model.ch_mult=(2,4)'],
                                                 'config.model.num_groups=8'),
    'heads that do not divide the width': ('digits_dsm', ['--config.model.num_heads=3'],
                                           'model.num_heads=3'),
    'missing data directory': ('digits_dsm', ['--config.data.name=mnist', '--config.data.source=idx',
                                              f'--config.data.data_dir={MISSING}'],
                               'data.data_dir'),
    'data directory without the data': ('digits_dsm', ['--config.data.name=mnist',
                                                       '--config.data.source=idx',
                                                       '--config.data.data_dir={empty}'],
                                        'not found in data.data_dir'),
    'constraint on a class that does not exist': (
        'digits_minority', ['--config.method.constraint_classes=(4,12)', REFERENCE],
        'config.method.constraint_classes=[4, 12] names classes [12]'),
    'reference run that has not finished': (
        'digits_minority', ['--config.method.reference_workdir={unfinished}'],
        'that run has not finished (newest checkpoint: step 4 of its train.steps=4); finish it '
        'first by rerunning its command'),
    'steps that a call of several steps would overshoot': (
        'digits_dsm', ['--config.train.steps_per_call=3'],
        'config.train.steps=4: must be a multiple of train.steps_per_call=3'),
    'more sampling steps than the discrete schedule has times': (
        'digits_dsm', ['--config.sample.num_steps=1000'],
        'config.sample.num_steps=1000: must be below diffusion.num_steps=1000'),
    'batch the devices cannot split': ('digits_dsm', ['--config.train.batch_size=15'],
                                       'config.train.batch_size'),
    'XLA:CPU option this jaxlib does not know': (
        'digits_dsm', ['--config.train.xla_cpu_flags=--xla_cpu_no_such_option=1'],
        "config.train.xla_cpu_flags='--xla_cpu_no_such_option=1': XLA (jaxlib "),
    'checkpoint of another model': ('digits_dsm', ['--config.model.ch=24'],
                                    'model.ch: checkpoint 16 vs now 24'),
    'checkpoint past train.steps': ('digits_dsm', ['--config.train.steps=2'],
                                    'config.train.steps=2: the checkpoint in '),
    'negative smallest time': ('digits_dsm', ['--config.diffusion.schedule=vp',
                                              '--config.diffusion.t_min=-0.5'],
                               'config.diffusion.t_min=-0.5: must lie in (0, 1)'),
    'VP betas that end far from noise': (
        'digits_dsm', ['--config.diffusion.schedule=vp', '--config.diffusion.beta_max=2.0'],
        'config.diffusion.beta_max=2.0: with beta_min=0.1 the forward process ends at alpha(1) '
        '= 0.592'),
    'MLP on images': ('digits_dsm', ['--config.model.name=mlp'],
                      "config.model.name='mlp': the MLP takes vectors (D,); the data has "
                      "examples of shape (8, 8, 1); use model.name='unet'."),
    'negative classifier steps': ('digits_dsm', ['--config.eval.classifier_steps=-5'],
                                  'config.eval.classifier_steps=-5: must be >= 0'),
    # TIW-DSM as the primal objective of constrained training keeps its fields in
    # config.method.tiw: the messages name them there (they said config.method.<field>).
    'TIW objective field out of range': (
        'digits_tiw_minority', ['--config.method.tiw.imbalance_ratio=2.0', REFERENCE],
        'error: config.method.tiw.imbalance_ratio=2.0: must lie in (0, 1]'),
    'TIW objective class order naming a class that does not exist': (
        'digits_tiw_minority', ['--config.method.tiw.class_order=(0,1,2,3,4,5,6,7,8,12)',
                                REFERENCE],
        'config.method.tiw.class_order'),
    'negative sample clip': ('digits_dsm', ['--config.sample.clip=-1'],
                             'config.sample.clip=-1.0: must be >= 0'),
    'learning rate that is not a number': ('digits_dsm', ['--config.optim.lr=nan'],
                                           'config.optim.lr=nan: must be a finite number'),
    'negative split seed': ('digits_dsm', ['--config.data.split_seed=-1'],
                            'config.data.split_seed=-1: must be >= 0'),
    # A config made for plain DSM has none of constrained training's fields (they raised
    # an AttributeError deep in the method's checks).
    'constraint on a class named twice': (
        'digits_minority', ['--config.method.constraint_classes=(4,4)', REFERENCE],
        'config.method.constraint_classes=(4, 4): names a class twice'),
    # Another program's config: it said there is no TFDS loader for 'toy'.
    'toy benchmark config in the launcher': (
        'toy_composition', [], "data.name='toy': the 2-D benchmarks of "
        'experiments/toy_composition.py'),
    'method switched without its fields': (
        'digits_dsm', ['--config.method.name=constrained'],
        'config.method.constraint_batch is missing; start the config from '
        'cdiff_jax.methods.constrained.default_method_config()'),
}


def _load_config(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.fixture(scope='module')
def existing_run(tmp_path_factory):
  """A workdir holding what a finished run leaves (checkpoint with the tiny digits_dsm
  config's fingerprint, config.json, metrics.jsonl, summary.json)."""
  from cdiff_jax import checkpoint
  workdir = tmp_path_factory.mktemp('existing')
  c = _load_config('digits_dsm')
  for field, value in TINY.items():
    section, name = field.split('.')
    c[section][name] = value
  ckpt = checkpoint.Checkpointer(str(workdir / 'checkpoints'))
  ckpt.save(4, {'params': {'w': np.arange(3.0)}}, c)
  ckpt.close()
  (workdir / 'config.json').write_text(c.to_json_best_effort())
  (workdir / 'metrics.jsonl').write_text('{"step": 4, "loss": 0.5}\n')
  (workdir / 'summary.json').write_text('{"final_step": 4}\n')
  return workdir


def _launch(config, workdir, extra):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  return subprocess.run([sys.executable, '-m', 'cdiff_jax.main', f'--config=configs/{config}.py',
                         f'--workdir={workdir}', '--no_progress', *TINY_ARGS, *extra],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _check_one_line(out, needle):
  assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
  assert 'Traceback' not in out.stderr, out.stderr[-2000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1, out.stderr[-2000:]
  assert needle in errors[0], errors[0]
  return errors[0]


SLOW = {'checkpoint of another model'}  # builds and initializes the model first


@pytest.mark.parametrize('case', [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c
                                  for c in CASES])
def test_bad_input_gets_one_line_and_no_damage(case, existing_run, tmp_path):
  config, extra, needle = CASES[case]
  if not os.path.exists(os.path.join(ROOT, 'configs', f'{config}.py')):
    pytest.skip(f'configs/{config}.py is not in this checkout')
  empty = tmp_path / 'empty_data'
  empty.mkdir()
  unfinished = tmp_path / 'unfinished'  # a run that stopped before its end: no summary.json
  shutil.copytree(existing_run, unfinished)
  (unfinished / 'summary.json').unlink()
  extra = [e.format(empty=empty, existing=existing_run, unfinished=unfinished) for e in extra]
  workdir = tmp_path / 'run'
  shutil.copytree(existing_run, workdir)
  before = run_files.snapshot(workdir)
  line = _check_one_line(_launch(config, workdir, extra), needle)
  assert run_files.snapshot(workdir) == before, line
  assert len(line) < 400, line


@pytest.mark.parametrize('case', ['wrong field name', 'constraint on a class that does not exist'])
def test_bad_input_does_not_create_the_workdir(case, existing_run, tmp_path):
  config, extra, needle = CASES[case]
  extra = [e.format(existing=existing_run) for e in extra]
  _check_one_line(_launch(config, tmp_path / 'new_run', extra), needle)
  assert not (tmp_path / 'new_run').exists()
