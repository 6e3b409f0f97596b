"""benchmarks/mfu.py runs end to end (on CPU here; its figures are meant for accelerators)."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def mfu():
  spec = importlib.util.spec_from_file_location('mfu', os.path.join(ROOT, 'benchmarks', 'mfu.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_peak_table(mfu):
  assert mfu.peak_tflops('NVIDIA H100 80GB HBM3', 'bfloat16') == 989.0
  assert mfu.peak_tflops('NVIDIA H100 PCIe', 'float32') == 378.0
  assert mfu.peak_tflops('TPU v5 lite', 'float32') == 197.0
  assert mfu.peak_tflops('cpu', 'float32') is None
  # Whole names: an L40S is not an L4, an H200 NVL is not an H200 SXM.
  assert mfu.peak_tflops('NVIDIA L4', 'bfloat16') == 121.0
  assert mfu.peak_tflops('NVIDIA L40S', 'bfloat16') is None
  assert mfu.peak_tflops('NVIDIA H200 NVL', 'bfloat16') == 835.0
  assert mfu.peak_tflops('NVIDIA H200', 'bfloat16') == 989.0


def test_program_flops_closed_form(mfu):
  # A dense layer: 2*m*k*n multiply-adds, counted from shapes alone (no data moved).
  import jax
  import numpy as np
  from benchmarks import common
  a, b = np.ones((64, 32), np.float32), jax.ShapeDtypeStruct((32, 16), np.float32)
  assert common.program_flops(lambda a, b: a @ b, a, b) == 2 * 64 * 32 * 16


def test_step_flops_match_the_compiled_count(mfu, tiny_config):
  # On CPU the compiled program counts its convolutions too: the lowered, platform-free
  # count (what mfu.py reports, since GPU backends drop cuDNN convolutions from theirs)
  # must agree with it.
  from cdiff_jax import parallel, train
  exp = train.build(mfu.speed_config(tiny_config))
  state = exp.init_state()
  host = exp.batcher.batch(0)
  lowered_count = mfu.step_flops(exp, state, host)
  compiled = exp.step.lower(state, parallel.put_batch(host, exp.mesh)).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  per_device = cost['flops']  # the partitioned program: one device's share
  assert lowered_count / exp.mesh.devices.size == pytest.approx(per_device, rel=0.1)


def test_measure_tiny(mfu, tiny_config):
  r = mfu.measure(tiny_config, calls=2, rounds=1, warmup=1, num_samples=4, peak=1.0)
  assert r['num_devices'] == 2 and r['global_batch'] == 16
  # A 2-device step does half the work per device: well above the forward pass alone.
  assert r['flops_per_step_per_device'] > 1e7
  assert r['step_time_ms'] > 0 and r['sample_images_per_sec'] > 0
  assert r['mfu'] == pytest.approx(r['tflops_per_device'] / 1.0)
  assert '| MFU |' in mfu.table(r)


def test_reference_thresholds_without_a_run(mfu):
  # The shipped minority configs take thresholds from a reference run; timed on their own
  # they get absolute ones, and then pass the method's validation.
  from cdiff_jax import methods
  from cdiff_jax.config import ConfigError
  from configs import digits_minority
  config = digits_minority.get_config()
  with pytest.raises(ConfigError, match='reference_workdir'):
    methods.validate(config)
  config = mfu.speed_config(config)
  assert config.method.threshold_mode == 'absolute' and config.method.target_frequency == 0.0
  methods.validate(config)
  config.method.threshold_mode, config.method.reference_workdir = 'reference', 'runs/ref'
  assert mfu.speed_config(config).method.threshold_mode == 'reference'  # a given run is kept
