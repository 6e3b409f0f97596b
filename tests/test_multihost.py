"""Multi-host for real: two local CPU processes (gloo collectives) run the launcher on one
workdir and end with the parameters of a single process with the same two devices and
the same global batch; only process 0 writes metrics and samples."""

import importlib.util
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from cdiff_jax import checkpoint, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Constrained training (3 constraint groups), so each process's slice of the global batch
# mixes groups: 8 objective + 3 x 4 constraint examples = 20, 10 per process.
OVERRIDES = {
    'model.ch': 16, 'model.attn_levels': (), 'method.objective_batch': 8,
    'method.constraint_batch': 4, 'method.dual_start': 0, 'train.steps': 6,
    'train.log_every': 2, 'train.checkpoint_every': 0, 'optim.warmup_steps': 2,
    'sample.num_steps': 2, 'sample.num_samples': 4, 'eval.enabled': False,
}


def _config():
  spec = importlib.util.spec_from_file_location(
      'digits_minority', os.path.join(ROOT, 'configs', 'digits_minority.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  for field, value in OVERRIDES.items():
    section, name = field.split('.')
    c[section][name] = value
  return c


def _flag(field, value):
  text = '()' if value == () else str(value)
  return f'--config.{field}={text}'


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  workdir = tmp_path / 'run'
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  procs = []
  for pid in range(2):
    cmd = [sys.executable, '-m', 'cdiff_jax.main', '--config=configs/digits_minority.py',
           f'--workdir={workdir}', '--no_progress',
           *[_flag(f, v) for f, v in OVERRIDES.items()],
           '--config.parallel.distributed=True', f'--config.parallel.coordinator_address=localhost:{port}',
           '--config.parallel.num_processes=2', f'--config.parallel.process_id={pid}',
           '--config.parallel.cpu_collectives=gloo', '--config.parallel.initialization_timeout=120']
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=600))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert 'done: step 6' in outs[0][0] and 'done: step 6' in outs[1][0]

  # One process, two devices, the same global batch of 20.
  exp = train.build(_config())
  assert exp.mesh.devices.size == 2
  state, _ = train.fit(exp, exp.init_state())
  single = jax.tree.leaves(jax.device_get(state.params))
  multi = jax.tree.leaves(checkpoint.load_params(str(workdir), 'params'))
  lam_single = np.asarray(state.extras['lam'])
  assert len(single) == len(multi)
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(single, multi))
  assert diff <= 1e-6, f'max parameter difference {diff}'
  assert np.abs(lam_single).sum() > 0  # the dual variables moved, so the groups mattered

  # Only process 0 wrote: one record per logging step, one config, the final samples.
  steps = [json.loads(l)['step'] for l in open(workdir / 'metrics.jsonl')]
  assert steps == [2, 4, 6]
  assert (workdir / 'samples' / 'final.png').exists()
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['6']
