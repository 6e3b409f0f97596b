"""Every shipped config loads, passes the launcher's validation, and documents how to run
it (its docstring names the command and what to expect); validation refuses a bad value
with the field's name and accepts the limits themselves."""

import glob
import importlib.util
import os
import re

import pytest

from cdiff_jax import config as config_lib
from cdiff_jax import methods as methods_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                 if not os.path.basename(p).startswith('_'))


def _module(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_shipped_configs_are_found():
  assert {'digits_dsm', 'digits_minority', 'digits_tiw_minority', 'mnist_minority'} <= set(CONFIGS)


@pytest.mark.parametrize('name', CONFIGS)
def test_shipped_config_validates_and_documents_its_command(name, tmp_path):
  module = _module(name)
  config = module.get_config()
  if config.method.get('threshold_mode') == 'reference':  # the experiment script sets it
    assert not config.method.reference_workdir
    (tmp_path / 'checkpoints').mkdir()
    config.method.reference_workdir = str(tmp_path)
  config_lib.validate(config)
  methods_lib.validate(config)
  doc = module.__doc__ or ''
  assert 'python -m' in doc, f'configs/{name}.py: the docstring gives no command'
  assert f'{name}.py' in doc or 'experiments.' in doc, f'configs/{name}.py: command of another config?'


def _with(overrides):
  c = config_lib.base_config()
  for field, value in overrides.items():
    section, name = field.split('.')
    c[section][name] = value
  return c


@pytest.mark.parametrize('overrides,needle', [
    ({'data.minority_fraction': 0.0}, 'config.data.minority_fraction=0.0'),
    ({'data.minority_fraction': 1.5}, 'config.data.minority_fraction=1.5'),
    ({'data.data_dir': '/nonexistent/data'}, 'config.data.data_dir'),
    ({'data.subsample_seed': -1}, 'config.data.subsample_seed=-1'),
    ({'model.class_dropout': 1.0}, 'config.model.class_dropout=1.0'),
    ({'model.attn_levels': (2,)}, 'config.model.attn_levels=(2,)'),   # ch_mult (1, 2): levels 0, 1
    ({'data.image_size': 4, 'model.ch_mult': (1, 2, 2, 2)}, 'config.model.ch_mult'),
    ({'train.ema_decay': 1.0}, 'config.train.ema_decay=1.0'),
    ({'optim.warmup_steps': -1}, 'config.optim.warmup_steps=-1'),
    ({'data.source': 'hdf5'}, "config.data.source='hdf5'"),
    ({'train.steps_per_call': 2, 'train.checkpoint_every': 3}, 'config.train.checkpoint_every=3'),
    ({'parallel.num_processes': 2, 'parallel.process_id': 2}, 'config.parallel.process_id=2'),
    ({'sample.eta': -1.0}, 'config.sample.eta=-1.0: must lie in [0, 1]'),
    # UNet sizes that crashed in validate (0 groups), in JAX (negative) or trained a net of
    # zero-width layers (ch 0); dropout that zeroes (1.5) or scales (-0.5) every branch.
    ({'model.num_groups': 0}, 'config.model.num_groups=0: must be positive'),
    ({'model.ch': 0}, 'config.model.ch=0: must be positive'),
    ({'model.num_res_blocks': -1}, 'config.model.num_res_blocks=-1: must be positive'),
    ({'model.dropout': 1.5}, 'config.model.dropout=1.5: must lie in [0, 1)'),
    ({'model.dropout': -0.5}, 'config.model.dropout=-0.5: must lie in [0, 1)'),
    # The MLP's sizes (a width of 0 trained and sampled a constant).
    ({'model.name': 'mlp', 'model.hidden': 0}, 'config.model.hidden=0: must be positive'),
    ({'model.name': 'mlp', 'model.depth': -1}, 'config.model.depth=-1: must be >= 0'),
    # One sample has no covariance for the FID: it failed after training.
    ({'eval.num_samples': 1}, 'config.eval.num_samples=1: must be at least 2'),
    # Adam settings that give NaN or no updates, and a weight decay adam would ignore.
    ({'optim.b2': 1.0}, 'config.optim.b2=1.0: must lie in [0, 1)'),
    ({'optim.eps': 0.0}, 'config.optim.eps=0.0: must be positive'),
    ({'optim.weight_decay': -0.1}, 'config.optim.weight_decay=-0.1'),
    ({'optim.name': 'adam', 'optim.weight_decay': 0.5},
     "config.optim.weight_decay=0.5: optim.name='adam' has no weight decay"),
    # Fewer DDPM steps with the per-step betas of 1,000 end far from noise (alpha(1) 0.60).
    ({'diffusion.schedule': 'ddpm', 'diffusion.num_steps': 100, 'sample.num_steps': 50},
     'config.diffusion.num_steps=100: with betas 0.0001..0.02 the forward process ends at '
     'alpha(1) = 0.603'),
])
def test_validate_refuses_and_names_the_field(overrides, needle):
  c = _with(overrides)
  with pytest.raises(config_lib.ConfigError, match=re.escape(needle)):
    config_lib.validate(c)


def test_a_field_no_section_has_is_refused_with_the_nearest_name():
  """A misspelled field set in a config file (which, unlike a command-line override, adds
  it) was ignored while the code read the default; the core's sections and each method's
  refuse it, the nearest field named, and a method's missing field names its defaults."""
  with pytest.raises(config_lib.ConfigError, match=re.escape(
      'config.train.stepz: no such field; did you mean config.train.steps?')):
    config_lib.validate(_with({'train.stepz': 4}))
  with pytest.raises(config_lib.ConfigError, match=r'config\.optim\.learning_rate: no such '
                     r'field \(the fields of config\.optim: b1, .*\blr\b'):
    config_lib.validate(_with({'optim.learning_rate': 1e-4}))
  c = _module('digits_minority').get_config()
  c.method.dual_lrr = 2.0
  with pytest.raises(config_lib.ConfigError, match=re.escape(
      'config.method.dual_lrr: no such field; did you mean config.method.dual_lr?')):
    methods_lib.validate(c)
  c = _module('digits_dsm').get_config()
  c.method.dual_lr = 2.0                # plain DSM reads no method field but its name
  with pytest.raises(config_lib.ConfigError, match=re.escape('config.method.dual_lr: no such')):
    methods_lib.validate(c)
  c.method = {'name': 'constrained', 'constraint_classes': (4,)}
  with pytest.raises(config_lib.ConfigError, match='is missing; start the config from '
                     r'cdiff_jax\.methods\.constrained\.default_method_config\(\)'):
    methods_lib.validate(c)


@pytest.mark.parametrize('section', ['data', 'model', 'diffusion', 'optim', 'train', 'sample',
                                     'eval', 'parallel'])
def test_every_core_section_refuses_a_field_it_lacks(section):
  """Each of base_config's sections is checked, not only train and optim."""
  field = sorted(config_lib.base_config()[section].keys())[0]
  with pytest.raises(config_lib.ConfigError, match=re.escape(
      f'config.{section}.{field}_x: no such field; did you mean config.{section}.')):
    config_lib.validate(_with({f'{section}.{field}_x': 1}))


def test_the_experiments_run_keys_are_known_fields():
  """The keys an experiment adds to an arm's config (not the user's fields) pass the
  field checks of the launcher and the methods."""
  c = _module('digits_minority').get_config()
  c.method.reference_workdir, c.method.reference_key = 'reference', 'abc'
  methods_lib.validate(c, check_paths=False)
  config_lib.validate(c, check_paths=False)
  c = _module('digits_finetune').get_config()
  c.data.finetune_data_key = 'abc'
  config_lib.validate(c)


@pytest.mark.parametrize('field', ['optim.lr', 'optim.eps', 'optim.grad_clip', 'sample.clip'])
def test_values_that_are_not_finite_are_refused(field):
  """NaN passed every `< 0` check: a NaN learning rate was first noticed as a non-finite
  update at step 0."""
  c = _with({field: float('nan')})
  with pytest.raises(config_lib.ConfigError, match=re.escape(f'config.{field}=nan')):
    config_lib.validate(c)


def test_validate_accepts_the_boundary_values():
  """The limits themselves are allowed: minority_fraction 1, class_dropout and ema_decay
  0, 8x8 images through 4 UNet levels (3 halvings), the last process id."""
  config_lib.validate(_with({'data.minority_fraction': 1.0, 'model.class_dropout': 0.0,
                             'train.ema_decay': 0.0, 'data.image_size': 8,
                             'model.ch_mult': (1, 2, 2, 2), 'model.attn_levels': (3,),
                             'parallel.num_processes': 2, 'parallel.process_id': 1}))
  # 100 DDPM steps with betas scaled to the noise of 1,000 (the hint of the refusal above).
  config_lib.validate(_with({'diffusion.schedule': 'ddpm', 'diffusion.num_steps': 100,
                             'diffusion.beta_start': 1e-3, 'diffusion.beta_end': 0.2,
                             'sample.num_steps': 50}))
  mc = _with({'model.ch_mult': (1, 2, 2, 2)}).model
  config_lib.check_image_shape(mc, (8, 8, 1))
  mc.ch_mult = (1, 2, 2, 2, 2)
  with pytest.raises(config_lib.ConfigError, match='use at most 4 levels'):
    config_lib.check_image_shape(mc, (8, 8, 1))


def test_more_devices_than_visible_names_the_fix():
  from cdiff_jax import parallel
  import jax
  n = len(jax.devices())
  with pytest.raises(ValueError, match=rf'train.num_devices={n + 1}, but {n} device\(s\) are '
                                       rf'visible; set train.num_devices=0 \(all of them\)'):
    parallel.make_mesh(n + 1)
