"""Test session setup: two host CPU devices, so every test that builds a mesh runs
data-parallel, and the project's default XLA:CPU options (flags must be set before JAX
initializes its backend)."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
os.environ.setdefault('CDIFF_JAX_CACHE', os.path.join(os.path.dirname(__file__), '..', '.cache'))

import jax  # noqa: E402
import pytest  # noqa: E402

from cdiff_jax import parallel  # noqa: E402

# The launcher's default XLA:CPU options, in every test process from the start (train.run
# would add them only where no test has started the backend yet).
parallel.configure_xla_cpu()

jax.config.update('jax_compilation_cache_dir', os.path.join(os.environ['CDIFF_JAX_CACHE'], 'xla'))


@pytest.fixture
def tiny_config():
  """A digits config small enough for a few-second CPU run."""
  from cdiff_jax.config import base_config
  c = base_config()
  c.model.ch = 16
  c.model.num_res_blocks = 1
  c.model.attn_levels = ()
  c.train.steps = 8
  c.train.batch_size = 16
  c.train.log_every = 4
  c.train.checkpoint_every = 4
  c.train.compilation_cache = False
  c.sample.num_steps = 5
  c.sample.num_samples = 8
  c.optim.warmup_steps = 2
  return c
