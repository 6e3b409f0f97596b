"""Every shipped config loads, passes the launcher's validation, and documents how to run
it (its docstring names the command and what to expect)."""

import glob
import importlib.util
import os

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
