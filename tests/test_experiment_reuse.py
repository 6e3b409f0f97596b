"""An experiment reuses a finished stage only for the config and inputs that made it."""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np

from cdiff_jax import config as config_lib
from cdiff_jax import writers
from configs import digits_dsm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, *args) -> None:
  """Each experiment module defines --config/--workdir flags: one module per process."""
  out = subprocess.run([sys.executable, '-c', textwrap.dedent(code), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and out.stdout.strip().endswith('ok'), out.stderr[-3000:]


def test_computing_fields_leave_out_bookkeeping_only(tmp_path):
  c = digits_dsm.get_config()
  fields = config_lib.computing_fields(c)
  assert {'optim.lr', 'train.ema_decay', 'sample.num_steps', 'seed'} <= set(fields)
  assert not {'train.log_every', 'data.data_dir', 'sample.num_samples'} & set(fields)
  (tmp_path / 'config.json').write_text(c.to_json_best_effort())
  c.train.log_every, c.data.data_dir = 7, '/elsewhere'
  assert config_lib.saved_config_mismatch(str(tmp_path / 'config.json'), c) == []
  c.optim.lr *= 2
  diffs = config_lib.saved_config_mismatch(str(tmp_path / 'config.json'), c)
  assert len(diffs) == 1 and diffs[0].startswith('optim.lr')
  # A run saved before a field existed is not refused for lacking it; a saved field the
  # config no longer has is a difference.
  c.optim.lr /= 2
  saved = json.loads(c.to_json_best_effort())
  del saved['data']['minority_fraction']
  saved['train']['retired_field'] = 1
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  diffs = config_lib.saved_config_mismatch(str(tmp_path / 'config.json'), c)
  assert [d.split(':')[0] for d in diffs] == ['train.retired_field']


def test_toy_components_are_retrained_when_a_training_field_changes():
  _run('''
    import experiments.toy_composition as t
    from configs import toy_composition
    base = t.components_fingerprint(toy_composition.get_config())
    for field, value, same in [('optim.lr', 1e-4, False), ('train.ema_decay', 0.9, False),
                               ('optim.warmup_steps', 0, False), ('toy.num_train', 10, False),
                               ('mcmc.mala_step', 0.1, True), ('toy.num_samples', 10, True),
                               ('sample.num_steps', 50, True), ('train.log_every', 7, True)]:
      c = toy_composition.get_config()
      c.update_from_flattened_dict({field: value})
      assert (t.components_fingerprint(c) == base) == same, field
    print('ok')
  ''')


def test_guidance_experiment_refuses_a_model_finished_with_another_config(tmp_path):
  _run('''
    import json, os, re, sys
    import pytest
    import experiments.digits_guidance as g
    from configs import digits_cfg
    from cdiff_jax.config import ConfigError
    c = digits_cfg.get_config()
    model_dir = os.path.join(sys.argv[1], 'model')
    os.makedirs(model_dir)
    json.dump({'final_step': c.train.steps}, open(os.path.join(model_dir, 'summary.json'), 'w'))
    open(os.path.join(model_dir, 'config.json'), 'w').write(c.to_json_best_effort())
    # the guidance weights are read only after training: another sweep reuses the model
    import cdiff_jax.train
    cdiff_jax.train.load_run = lambda workdir, config=None: ('exp', workdir)
    c.guidance.cfg_scales = (1.0, 5.0)
    assert g.train_model(c, sys.argv[1], False)[:2] == ('exp', model_dir)
    c.optim.lr *= 2
    with pytest.raises(ConfigError, match=re.escape('optim.lr')):  # another learning rate
      g.train_model(c, sys.argv[1], False)
    print('ok')
  ''', str(tmp_path))


def test_finetune_pretraining_is_reused_whatever_the_later_steps_ask(tmp_path):
  """q_pre's size and the new data's size and seed are read after pre-training: other values
  reuse the finished pre-trained run; a field it copies (pretrain_steps) does not."""
  _run('''
    import json, os, re, sys
    import numpy as np
    import pytest
    import experiments.finetune as f
    from configs import digits_finetune
    from cdiff_jax.config import ConfigError
    c = digits_finetune.get_config()
    pre_dir = os.path.join(sys.argv[1], 'pretrained')
    os.makedirs(pre_dir)
    open(os.path.join(pre_dir, 'config.json'), 'w').write(f.pretrain_config(c).to_json_best_effort())
    json.dump({'tv_to_uniform': 0.1}, open(os.path.join(pre_dir, 'eval.json'), 'w'))
    np.save(os.path.join(pre_dir, 'eval_samples.npy'), np.zeros((2, 8, 8, 1), np.float16))
    json.dump({'final_step': c.finetune.pretrain_steps, 'seconds': 3.0},
              open(os.path.join(pre_dir, 'summary.json'), 'w'))
    c.finetune.num_generated, c.finetune.new_data_size = 200, 50
    c.finetune.new_data_seed += 1
    _, wd, pre = f.pretrain(c, sys.argv[1], False)
    assert wd == pre_dir and pre['eval'] == {'tv_to_uniform': 0.1}, pre
    c.finetune.pretrain_steps += 100
    with pytest.raises(ConfigError, match=re.escape('train.steps')):  # other steps
      f.pretrain(c, sys.argv[1], False)
    print('ok')
  ''', str(tmp_path))


def test_finetune_q_pre_samples_are_keyed_by_the_model_and_sampler():
  _run('''
    import numpy as np
    import experiments.finetune as f
    from configs import digits_finetune
    c = digits_finetune.get_config()
    pre = f.pretrain_config(c)
    params = {'w': np.ones((3, 2), np.float32)}
    key = f.samples_key(params, pre, c.finetune)
    assert key == f.samples_key({'w': np.ones((3, 2), np.float32)}, pre, c.finetune)
    assert key != f.samples_key({'w': np.full((3, 2), 2.0, np.float32)}, pre, c.finetune)
    pre.sample.num_steps += 1
    assert key != f.samples_key(params, pre, c.finetune)
    print('ok')
  ''')


def test_metrics_file_is_strict_json_with_non_finite_entries(tmp_path):
  w = writers.MetricWriter(str(tmp_path), tensorboard=False)
  w.write(3, dict(loss=np.float32('nan'), lam=np.array([0.1, np.inf]), gap=[-np.inf, 1.0]))
  def refuse(constant):
    raise ValueError(f'{constant} is not JSON')
  with open(tmp_path / 'metrics.jsonl') as f:
    record = json.loads(f.readline(), parse_constant=refuse)
  assert record['loss'] == 'nan' and record['lam'][1] == 'inf' and record['gap'][0] == '-inf'
  values = np.asarray(record['lam'], np.float64)   # what plot_curves reads back
  assert values[0] == 0.1 and math.isinf(values[1])
