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


@pytest.mark.parametrize('override,needle', [
    ('--config.train.stepz=3', 'stepz'),
    ('--config.optim.name=sgd', "config.optim.name='sgd'"),
    ('--config.train.batch_size=abc', 'batch_size'),
    ('--config.data.minority_classes=(12,)', 'data.minority_classes'),
])
def test_bad_config_gets_one_line(tmp_path, override, needle):
  out = _launch(tmp_path / 'w', *TINY, override)
  assert out.returncode != 0
  err = [l for l in out.stderr.strip().splitlines() if l.startswith('error')]
  assert len(err) == 1 and needle in err[0], out.stderr[-1500:]
  assert 'Traceback' not in out.stderr
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')


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


def test_tiw_compare_set_overrides_any_field_and_refuses_typos():
  sys.path.insert(0, ROOT)
  from experiments import tiw_compare
  config = tiw_compare.load_config(os.path.join(ROOT, 'configs', 'mnist_tiw.py'))
  tiw_compare.set_field(config, 'train.batch_size=64')
  tiw_compare.set_field(config, 'method.disc_ch_mult=(1, 2)')
  tiw_compare.set_field(config, 'data.source=idx')          # a bare string
  assert (config.train.batch_size, config.method.disc_ch_mult, config.data.source) == (
      64, (1, 2), 'idx')
  with pytest.raises(SystemExit, match="no field 'train.batchsize'.*batch_size"):
    tiw_compare.set_field(config, 'train.batchsize=64')
  with pytest.raises(SystemExit, match='FIELD=VALUE'):
    tiw_compare.set_field(config, 'train.batch_size')
