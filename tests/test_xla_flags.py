"""The default XLA:CPU options: applied before the backend starts, the user's own values
win, and with them gradients equal XLA's defaults up to float32 rounding."""

import json
import os
import subprocess
import sys

import pytest

from cdiff_jax import config as config_lib
from cdiff_jax import parallel
from cdiff_jax import train


def test_configure_adds_flags_and_keeps_the_users_value():
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  added = parallel.configure_xla_cpu('--xla_cpu_enable_fast_math=false '
                                     '--xla_cpu_experimental_ynn_fusion_type=dot', environ=env)
  assert added == ['--xla_cpu_enable_fast_math=false', '--xla_cpu_experimental_ynn_fusion_type=dot']
  assert env['XLA_FLAGS'].split() == ['--xla_force_host_platform_device_count=2'] + added
  env = {'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type=eltwise'}
  assert parallel.configure_xla_cpu('--xla_cpu_experimental_ynn_fusion_type=dot', environ=env) == []
  assert env['XLA_FLAGS'] == '--xla_cpu_experimental_ynn_fusion_type=eltwise'
  with pytest.raises(ValueError, match='XLA:CPU option'):
    parallel.configure_xla_cpu('--xla_gpu_autotune_level=0', environ={})


def test_config_rejects_non_cpu_flags():
  c = config_lib.base_config()
  c.train.xla_cpu_flags = '--xla_gpu_autotune_level=0'
  with pytest.raises(config_lib.ConfigError, match='train.xla_cpu_flags'):
    config_lib.validate(c)


def test_options_xla_refuses_are_one_config_error():
  """XLA ends the process on an option it does not know (or a value it cannot parse) when
  its backend starts, with a fatal log and for a bad value its whole usage; the options are
  tried in a child process first and refused in one line naming the config field."""
  with pytest.raises(ValueError, match=r'Unknown flag in XLA_FLAGS: --xla_cpu_no_such_option=1'):
    parallel.configure_xla_cpu('--xla_cpu_no_such_option=1', environ={})
  env = {}
  with pytest.raises(ValueError, match=r"Illegal value for --xla_cpu_experimental_ynn_fusion_type"):
    parallel.configure_xla_cpu('--xla_cpu_experimental_ynn_fusion_type=bogus', environ=env)
  with pytest.raises(ValueError, match=r'cannot parse --xla_cpu_scheduler_type=bogus\. '):
    parallel.configure_xla_cpu('--xla_cpu_scheduler_type=bogus', environ=env)  # no line of its own
  assert env == {}  # nothing applied
  c = config_lib.base_config()
  c.train.xla_cpu_flags = '--xla_cpu_no_such_option=1'
  with pytest.raises(config_lib.ConfigError) as e:
    train.setup_jax(c)
  assert str(e.value).startswith("config.train.xla_cpu_flags='--xla_cpu_no_such_option=1': ")
  assert len(str(e.value).splitlines()) == 1
  # A known option with a valid value passes the check (and is added).
  assert parallel.configure_xla_cpu('--xla_cpu_enable_fast_math=false', environ=env) == [
      '--xla_cpu_enable_fast_math=false']


_CHILD = r'''
import json, os, sys
import numpy as np
from cdiff_jax import parallel
if sys.argv[1] == '1':
  assert parallel.configure_xla_cpu() == parallel.DEFAULT_XLA_CPU_FLAGS.split(), os.environ
import jax, jax.numpy as jnp
from jax import lax
rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(8, 12, 12, 16)), jnp.float32)
w = jnp.asarray(rng.normal(size=(3, 3, 16, 16)) * 0.1, jnp.float32)
d = jnp.asarray(rng.normal(size=(16, 32)), jnp.float32)
def loss(w, d):
  y = lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return jnp.sum(jnp.tanh(y @ d) ** 2)
gw, gd = jax.jit(jax.grad(loss, argnums=(0, 1)))(w, d)
print(json.dumps(dict(flags=os.environ.get('XLA_FLAGS', ''), gw=np.asarray(gw).ravel().tolist(),
                      gd=np.asarray(gd).ravel().tolist())))
'''


def test_default_flags_start_and_give_identical_gradients():
  """A fresh process with the default options (XLA would abort on an unknown one) computes
  the same conv/dot gradients as one with XLA's defaults (to float32 rounding)."""
  if not parallel.jaxlib_tested():
    pytest.skip('default XLA:CPU options are off for this jaxlib version')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['JAX_PLATFORMS'] = 'cpu'
  out = []
  for apply in ('0', '1'):
    proc = subprocess.run([sys.executable, '-c', _CHILD, apply], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  assert out[0]['flags'] == ''
  assert parallel.DEFAULT_XLA_CPU_FLAGS in out[1]['flags']
  import numpy as np
  for key in ('gw', 'gd'):  # the library sums in another order: float32 rounding apart
    a, b = np.asarray(out[0][key]), np.asarray(out[1][key])
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
    assert np.abs(a).max() > 1.0
