"""The launcher end to end: a tiny config writes every promised file; bad input gets one line."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config.model.ch=16', '--config.model.attn_levels=()', '--config.train.steps=6',
        '--config.train.batch_size=16', '--config.train.log_every=2',
        '--config.train.checkpoint_every=4', '--config.train.sample_every=4',
        '--config.sample.num_steps=4', '--config.sample.num_samples=8', '--no_progress']


def _launch(workdir, *extra, config='configs/digits_dsm.py'):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  return subprocess.run([sys.executable, '-m', 'cdiff_jax.main', f'--config={config}',
                         f'--workdir={workdir}', *extra], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def _assert_one_error_line(out, needle):
  """Exit status 2, one ``error:`` line that contains ``needle``, no traceback."""
  err = [l for l in out.stderr.strip().splitlines() if l.startswith('error')]
  assert out.returncode == 2 and len(err) == 1 and needle in err[0], out.stderr[-1500:]
  assert 'Traceback' not in out.stderr


def test_launcher_writes_everything(tmp_path):
  out = _launch(tmp_path, *TINY)
  assert out.returncode == 0, out.stderr[-2000:]
  for f in ('config.json', 'metrics.jsonl', 'summary.json', 'loss.png', 'samples/final.png',
            'samples/step_0000004.png'):
    assert os.path.exists(tmp_path / f), f
  assert os.listdir(tmp_path / 'checkpoints') == ['6'] or sorted(os.listdir(tmp_path / 'checkpoints')) == ['4', '6']
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path / 'tensorboard'))
  records = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert [r['step'] for r in records] == [2, 4, 6]
  for key in ('loss', 'lr', 'grad_norm', 'images_per_sec'):
    assert all(key in r for r in records), key
  assert json.load(open(tmp_path / 'config.json'))['train']['steps'] == 6
  assert '%|' not in out.stderr, out.stderr[-2000:]   # --no_progress: no progress bars


@pytest.mark.parametrize('module', ['cdiff_jax.main', 'cdiff_jax.sample', 'experiments.minority',
                                    'experiments.finetune', 'experiments.tiw_compare',
                                    'experiments.digits_guidance', 'experiments.toy_composition'])
def test_every_command_takes_both_progress_spellings_and_lists_its_flags(module):
  """--noprogress and --no_progress on every command (the launcher and the sampler knew only
  the second, the experiments only the first), and --help lists the flags that the shared
  helpers define for the command (--config and the progress flags were missing)."""
  out = subprocess.run([sys.executable, '-m', module, '--helpshort'], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  listed = out.stdout + out.stderr  # (absl's --helpshort exits with status 1)
  for flag in ('--[no]progress', '--[no]no_progress') + (
      ('--config:',) if module != 'cdiff_jax.sample' else ()):
    assert flag in listed, (flag, listed[-1500:])


@pytest.mark.parametrize('args, shown', [([], 'True'), (['--noprogress'], 'False'),
                                         (['--no_progress'], 'False'), (['--progress'], 'True')])
def test_the_progress_flags_mean_what_they_say(args, shown):
  code = ('import sys; from absl import flags; from cdiff_jax import cli; '
          'p = cli.define_progress_flags(); flags.FLAGS(["x"] + sys.argv[1:]); print(p.value)')
  out = subprocess.run([sys.executable, '-c', code, *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
  assert out.stdout.strip() == shown, out.stderr[-1000:]


def test_stray_argument_is_refused_before_any_work(tmp_path):
  """A positional argument (say a mistyped flag without its dashes) stops the launcher
  with a usage message instead of training with the argument ignored."""
  out = _launch(tmp_path / 'w', *TINY, 'config.train.steps=2')
  assert out.returncode != 0 and 'unexpected arguments' in out.stderr, out.stderr[-2000:]
  assert not os.path.exists(tmp_path / 'w')


@pytest.mark.parametrize('override,needle', [
    ('--config.train.stepz=3', 'stepz'),
    ('--config.optim.name=sgd', "config.optim.name='sgd'"),
    ('--config.train.batch_size=abc', 'batch_size'),
    ('--config.data.minority_classes=(12,)', 'data.minority_classes'),
])
def test_bad_config_gets_one_line(tmp_path, override, needle):
  out = _launch(tmp_path / 'w', *TINY, override)
  _assert_one_error_line(out, needle)
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')


def test_a_workdir_that_is_a_file_gets_one_line(tmp_path):
  a_file = tmp_path / 'notes.txt'
  a_file.write_text('mine')
  for workdir in (a_file, a_file / 'run'):
    _assert_one_error_line(_launch(workdir, *TINY), f'workdir {workdir}: {a_file} is a file')
  for script in (['experiments/tiw_compare.py'], ['-m', 'experiments.toy_composition'],
                 ['-m', 'experiments.digits_guidance'], ['-m', 'experiments.minority']):
    out = subprocess.run([sys.executable, *script, f'--workdir={a_file / "run"}'], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    _assert_one_error_line(out, f'{a_file} is a file')
  assert a_file.read_text() == 'mine'


def test_a_config_file_that_does_not_load_gets_one_line(tmp_path):
  """ml_collections defers a config file's load error to the config's first use (a
  traceback there); the launcher and the scripts report it at parsing, in one line."""
  missing = tmp_path / 'no_such_config.py'
  _assert_one_error_line(_launch(tmp_path / 'w', config=str(missing)),
                         f'--config={missing}: no such file')
  no_get_config = tmp_path / 'no_get_config.py'
  no_get_config.write_text('steps = 5\n')
  _assert_one_error_line(_launch(tmp_path / 'w', config=str(no_get_config)),
                         f'--config={no_get_config}: the config file defines no get_config()')
  # A folder, an argument its get_config() does not take, an error inside get_config():
  # they printed errno's words alone, or a whole traceback in the error line.
  _assert_one_error_line(_launch(tmp_path / 'w', config=str(tmp_path)),
                         f'--config={tmp_path}: is a folder; pass one config file')
  dsm = os.path.join(ROOT, 'configs', 'digits_dsm.py')
  _assert_one_error_line(_launch(tmp_path / 'w', config=f'{dsm}:small'),
                         f'--config={dsm}:small: its get_config() raised TypeError: get_config() '
                         'takes 0 positional arguments but 1 was given (what follows ":"')
  raising = tmp_path / 'raising.py'
  raising.write_text('def get_config():\n  raise ValueError("no data here")\n')
  _assert_one_error_line(_launch(tmp_path / 'w', config=str(raising)),
                         f'--config={raising}: its get_config() raised ValueError: no data here.')
  # A script's default config (configs/...) from outside the repository root, with and
  # without an override (with one, ml_collections loads the default at the flag's definition).
  env = dict(os.environ, PYTHONPATH=ROOT)
  for extra in ([], ['--config.train.steps=5']):
    out = subprocess.run([sys.executable, '-m', 'experiments.finetune',
                          f'--workdir={tmp_path / "w"}', *extra], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    _assert_one_error_line(out, '--config=configs/digits_finetune.py: no such file. Pass the '
                                'path of a config file')
  assert not os.path.exists(tmp_path / 'w')


@pytest.mark.parametrize('module,override,needle', [
    # Their --config has a default file, so ml_collections applies overrides at definition.
    ('experiments.minority', '--config.train.stepz=3', 'stepz'),
    ('experiments.finetune', '--config.train.stepz=3', 'stepz'),
    ('experiments.digits_guidance', '--config.train.stepz=3', 'stepz'),
    # A ConfigError from the script's own checks, before any work.
    ('experiments.toy_composition', "--config.toy.benchmarks=('nope',)", 'config.toy.benchmarks'),
    ('experiments.toy_composition', '--config.toy.benchmarks=()',
     'config.toy.benchmarks=(): name at least one of'),
    ('experiments.toy_composition', '--config.toy.num_samples=-5',
     'config.toy.num_samples=-5: must be positive'),
    ('experiments.toy_composition', '--config.mcmc.damping=0', 'config.mcmc.damping=0'),
    ('experiments.toy_composition', '--config.mcmc.uhmc_step=0',
     'config.mcmc.uhmc_step=0.0: give a positive number'),
    # Checked before the unconstrained arm trains (its own reference, given explicitly).
    ('experiments.minority', '--config.method.reference_workdir=/nonexistent/ref',
     "config.method.reference_workdir='/nonexistent/ref' holds no checkpoints/"),
    ('experiments.minority', '--config.data.data_dir=/nonexistent/data', 'data.data_dir'),
    # The constrained arm's own checks (here: class constraints on a conditional model),
    # also with its default reference, the unconstrained arm it trains first.
    ('experiments.minority', ('--config.model.conditional=True',
                              '--config.model.class_dropout=0.1'),
     'config.model.conditional=True: class constraints'),
    ('experiments.digits_guidance', '--config.guidance.not_class=12', 'guidance.not_class'),
    # Named as set, not as the pre-training config's train.steps it becomes.
    ('experiments.finetune', '--config.train.steps_per_call=3', 'config.finetune.pretrain_steps'),
    ('experiments.finetune', '--config.finetune.pretrain_drop_classes=()',
     'config.finetune.pretrain_drop_classes'),
    ('experiments.finetune', '--config.finetune.new_data_size=100000',
     'config.finetune.new_data_size'),
    # Refused before the pre-training (a negative seed failed in numpy after it; a negative
    # pre-training rate was named as the optim.lr it becomes).
    ('experiments.finetune', '--config.finetune.new_data_seed=-1',
     'config.finetune.new_data_seed=-1: must be >= 0'),
    ('experiments.finetune', '--config.finetune.pretrain_lr=-0.1',
     'config.finetune.pretrain_lr=-0.1: must be positive'),
    # Failed in optax after the model and the evaluation classifier had trained.
    ('experiments.digits_guidance', '--config.guidance.classifier_steps=-5',
     'config.guidance.classifier_steps=-5: must be positive'),
    ('experiments.tiw_compare', '--config.method.split_seed=-1',
     'config.method.split_seed=-1: must be >= 0'),
])
def test_experiment_scripts_report_bad_input_in_one_line(module, override, needle, tmp_path):
  overrides = (override,) if isinstance(override, str) else override
  out = subprocess.run([sys.executable, '-m', module, f'--workdir={tmp_path / "run"}',
                        *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300)
  _assert_one_error_line(out, needle)
  assert not os.listdir(tmp_path)   # the workdir not even created


@pytest.mark.parametrize('workdir', ['', ' '])
def test_an_empty_workdir_is_refused_not_taken_as_the_current_folder(tmp_path, workdir):
  """--workdir= (an unset shell variable) crashed the launcher and made the guidance
  experiment write into the current folder (every program parses it in cli.py)."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, '-m', 'experiments.digits_guidance', f'--workdir={workdir}',
                        f'--config={ROOT}/configs/digits_cfg.py'], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
  _assert_one_error_line(out, '--workdir is empty; give the folder of the run')
  assert not os.listdir(tmp_path)


def test_finetune_also_runs_as_a_file(tmp_path):
  """python experiments/finetune.py (as tiw_compare.py is run) finds experiments.minority:
  it gets to its own config check, not a ModuleNotFoundError."""
  out = subprocess.run([sys.executable, 'experiments/finetune.py', f'--workdir={tmp_path / "w"}',
                        '--config.finetune.new_data_size=100000'], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  _assert_one_error_line(out, 'config.finetune.new_data_size')


def test_tiw_compare_as_a_file_loads_a_config_that_imports_the_configs(tmp_path):
  """A config built on a shipped one (from configs import digits_tiw) loads under
  python experiments/tiw_compare.py: the run gets to its own --arms check."""
  cfg = tmp_path / 'my_tiw.py'
  cfg.write_text('from configs import digits_tiw\n\n\ndef get_config():\n'
                 '  return digits_tiw.get_config()\n')
  out = subprocess.run([sys.executable, 'experiments/tiw_compare.py', f'--config={cfg}',
                        f'--workdir={tmp_path / "w"}', '--arms=nope'], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert "--arms: no arm ['nope']" in out.stderr, out.stderr[-2000:]
  assert 'ModuleNotFoundError' not in out.stderr


def test_experiment_scripts_import_each_other_without_flag_clash():
  """experiments.finetune (like the notebook) imports experiments.minority's helpers after
  defining its own --config/--workdir flags: the import must not define flags again."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = ('import experiments.finetune, experiments.minority as m; '
          'assert callable(m.run_arm) and callable(m.comparison_table); print("ok")')
  out = subprocess.run([sys.executable, '-c', code], cwd=root, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0 and 'ok' in out.stdout, out.stderr[-2000:]


def test_tiw_compare_refuses_an_unknown_field_or_arm_before_any_work(tmp_path):
  def run(*extra):
    return subprocess.run([sys.executable, 'experiments/tiw_compare.py',
                           f'--workdir={tmp_path}', *extra], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  _assert_one_error_line(run('--config.train.batchsize=64'), 'batchsize')
  # A missing dataset, met inside the run (the evaluation classifier loads it first): one line.
  _assert_one_error_line(run('--config=configs/mnist_tiw.py', '--config.data.source=idx',
                             f'--config.data.data_dir={tmp_path / "no_mnist"}'), 'no_mnist')
  out = run('--arms=DSM(obs),TIW', '--alphas=')
  assert out.returncode != 0
  assert "no arm ['TIW']" in out.stderr and "'TIW-DSM'" in out.stderr
  assert not os.listdir(tmp_path)   # nothing trained, nothing written


def test_a_finished_arm_is_reused_only_for_the_same_config(tiny_config, tmp_path):
  """experiments reuse finished arms; one finished with other settings must not be reported
  as this config's (it was: arm.json was read back whatever the config)."""
  sys.path.insert(0, ROOT)
  from cdiff_jax import config as config_lib
  from cdiff_jax import train
  from experiments import tiw_compare
  wd = str(tmp_path / 'arm')
  train.train_and_evaluate(tiny_config, wd, progress=False)
  assert tiw_compare.finished_arm(tiny_config, wd) is None    # trained, but no arm.json
  with open(os.path.join(wd, 'arm.json'), 'w') as f:
    json.dump(dict(eval=dict(fid=1.0), seconds=2.0), f)
  assert tiw_compare.finished_arm(tiny_config, wd)['eval'] == dict(fid=1.0)  # no spurious diff
  same = tiny_config.copy_and_resolve_references()
  same.train.checkpoint_every, same.train.log_every = 100, 1     # bookkeeping only
  same.data.data_dir = str(tmp_path / 'elsewhere')
  assert tiw_compare.finished_arm(same, wd)['seconds'] == 2.0
  for field, value in (('optim.lr', 1e-3), ('train.steps', 16), ('model.ch', 32)):
    other = tiny_config.copy_and_resolve_references()
    section, name = field.split('.')
    other[section][name] = value
    with pytest.raises(config_lib.ConfigError, match=rf'{field}: saved .* vs now {value!r}'):
      tiw_compare.finished_arm(other, wd)


def test_run_errors_are_reported_by_their_first_line(capsys):
  """reporting_errors: an expected error ends the program with status 2 and its first
  line (an empty message: the error's type)."""
  from cdiff_jax import cli
  from cdiff_jax.config import ConfigError

  def failing(message):
    def main(argv):
      raise ConfigError(message)
    return cli.reporting_errors(main)
  for message, line in (('config.x=1: bad.\nDetails that follow.', 'error: config.x=1: bad.'),
                        ('', 'error: ConfigError')):
    with pytest.raises(SystemExit) as e:
      failing(message)(['prog'])
    assert e.value.code == cli.EXIT_ERROR
    assert capsys.readouterr().err.strip().splitlines() == [line]


def test_ctrl_c_outside_training_stops_in_one_line(capsys):
  """Ctrl-C where no training loop saves first (set-up, sampling, evaluation, or a second
  Ctrl-C): exit status 130 and one line saying what is kept, no KeyboardInterrupt traceback."""
  from cdiff_jax import cli

  def main(argv):
    raise KeyboardInterrupt
  with pytest.raises(SystemExit) as e:
    cli.reporting_errors(main)(['prog'])
  assert e.value.code == cli.EXIT_INTERRUPTED == 130
  assert capsys.readouterr().err.strip().splitlines() == [cli.INTERRUPTED_AT_ONCE]


def test_sigterm_outside_training_is_a_preemption_in_one_line(capsys):
  """SIGTERM where no training loop saves first (set-up, between an experiment's arms, its
  sampling): exit status 3, so a restart loop reruns the command, and one line saying what
  is kept (it ended the program with -15, which stops such a loop). A training loop's own
  handler (it saves first) takes over inside it and gives this one back after."""
  import os
  import signal
  import time
  from cdiff_jax import cli, train

  def unhandled(signum, frame):   # stands for the default action: the process killed
    raise RuntimeError('SIGTERM reached the default handler')

  previous = signal.signal(signal.SIGTERM, unhandled)
  seen = {}

  def main(argv):
    with train._PreemptionWatch() as watch:   # a training loop: the notice is recorded
      watch.training = True                    # (in its set-up SIGTERM stops at once)
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.5)
      seen['in_training'] = watch.requested
    os.kill(os.getpid(), signal.SIGTERM)       # after it: a preemption at once
    time.sleep(5)
    seen['after'] = 'not stopped'

  try:
    with pytest.raises(SystemExit) as e:
      cli.reporting_errors(main)(['prog'])
    assert signal.getsignal(signal.SIGTERM) is unhandled
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert e.value.code == cli.EXIT_PREEMPTED == 3
  assert seen == {'in_training': True}
  assert capsys.readouterr().err.strip().splitlines() == [cli.PREEMPTED_AT_ONCE]


def test_flag_error_blames_the_override_whose_field_it_names(capsys):
  """A message naming ``num_steps`` blames --config.sample.num_steps, not an earlier
  --config.train.steps ('steps' inside 'num_steps' is not that field's name)."""
  from cdiff_jax import cli
  argv = ['prog', '--config.train.steps=4', '--config.sample.num_steps=0']
  with pytest.raises(SystemExit) as e:
    cli._flag_error(ValueError('num_steps must be positive'), argv)
  assert e.value.code == cli.EXIT_ERROR
  assert capsys.readouterr().err.strip() == ('error: --config.sample.num_steps=0: '
                                             'num_steps must be positive')


def test_tiw_compare_checks_its_lists_and_every_arm_before_writing(tmp_path):
  """--alphas / --ref_fractions that are not numbers, and an arm's config that fails its
  checks (a reference fraction given either way), stop with one line before the workdir
  exists (a traceback, and an empty workdir for a bad reference fraction, before)."""
  for flag, needle in (('--alphas=abc', '--alphas=abc: give numbers separated by commas'),
                       ('--ref_fractions=-0.5', 'config.method.ref_fraction=-0.5: must lie in'),
                       # without --ref_fractions, the config's own (it was set to 0.1)
                       ('--config.method.ref_fraction=-0.5',
                        'config.method.ref_fraction=-0.5: must lie in')):
    out = subprocess.run([sys.executable, 'experiments/tiw_compare.py',
                          f'--workdir={tmp_path / "w"}', '--noprogress', flag], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    _assert_one_error_line(out, needle)
    assert not os.path.exists(tmp_path / 'w')


def test_a_tilde_in_a_folder_flag_is_the_home_folder(tmp_path):
  """--workdir=~/x and the config's folders reach the program with the '~' (the shell
  expands it only at the start of a word): they are read as the home folder's."""
  env = dict(os.environ, HOME=str(tmp_path))
  out = subprocess.run([sys.executable, '-m', 'cdiff_jax.sample', '--workdir=~/nothing'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  _assert_one_error_line(out, f'--workdir={tmp_path / "nothing"}: no such folder')
  out = subprocess.run([sys.executable, '-m', 'cdiff_jax.main', '--config=configs/digits_dsm.py',
                        f'--workdir={tmp_path / "w"}', *TINY,
                        '--config.train.init_from=~/elsewhere'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  _assert_one_error_line(out, f"config.train.init_from='{tmp_path / 'elsewhere'}': holds no "
                              'checkpoints/')


@pytest.mark.parametrize('module,config,needle', [
    ('experiments.minority', 'digits_tiw',
     "experiments.minority runs a config of method.name='constrained'"),
    ('experiments.finetune', 'digits_minority', "needs a config with a 'finetune' section"),
    ('experiments.digits_guidance', 'digits_minority', "a 'guidance' section"),
    ('experiments.toy_composition', 'digits_dsm', "a 'toy' section"),
    ('experiments.tiw_compare', 'digits_minority', "method.name='tiw'"),
])
def test_an_experiment_given_a_config_of_another_kind_says_so_in_one_line(module, config,
                                                                          needle, tmp_path):
  """Each experiment reads its own section or method fields: a config of another kind is one
  error line naming a config that fits (it was an AttributeError traceback, or for
  tiw_compare a locked-config KeyError), and the workdir is not created."""
  out = subprocess.run([sys.executable, '-m', module, f'--config=configs/{config}.py',
                        f'--workdir={tmp_path / "run"}', '--noprogress'], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  _assert_one_error_line(out, needle)
  assert not (tmp_path / 'run').exists()


def test_tiw_compare_unknown_arm_is_one_line(tmp_path):
  out = subprocess.run([sys.executable, '-m', 'experiments.tiw_compare',
                        '--config=configs/digits_tiw.py', f'--workdir={tmp_path / "run"}',
                        '--arms=TIW', '--noprogress'], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  _assert_one_error_line(out, "--arms: no arm ['TIW']")
