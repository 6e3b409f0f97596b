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
import pytest

from cdiff_jax import checkpoint, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Constrained training on digits with three minority classes and one constraint each, so
# each process's slice of the global batch mixes groups: 8 objective + 3 x 4 constraint
# examples = 20, 10 per process. Absolute thresholds below the reachable losses keep the
# multipliers moving.
CONFIG = """
from cdiff_jax.config import base_config
from cdiff_jax.methods import constrained


def get_config():
  c = base_config()
  c.data.minority_classes, c.data.minority_fraction = (4, 5, 7), 0.1
  c.model.ch, c.model.attn_levels = 16, ()
  c.method = constrained.default_method_config()
  c.method.constraint_classes = (4, 5, 7)
  c.method.objective_batch, c.method.constraint_batch = 8, 4
  c.method.thresholds, c.method.dual_lr = (0.01,), 0.5
  c.train.steps, c.train.log_every, c.train.checkpoint_every = 6, 2, 0
  c.optim.warmup_steps = 2
  c.sample.num_steps, c.sample.num_samples = 2, 4
  return c
"""


def _config(path):
  spec = importlib.util.spec_from_file_location('multihost_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _run_two(command, timeout: int = 300, **env) -> list[str]:
  """``command(pid)`` run as processes 0 and 1 at once, one CPU device each; their stdout,
  once both have exited with status 0."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', **env)
  procs = [subprocess.Popen(command(pid), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for pid in range(2)]
  try:
    outs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return [out for out, _ in outs]


def _launch_two(config_path, workdir, cache):
  port = _free_port()
  outs = _run_two(lambda pid: [
      sys.executable, '-m', 'cdiff_jax.main', f'--config={config_path}',
      f'--workdir={workdir}', '--no_progress', '--config.parallel.distributed=True',
      f'--config.parallel.coordinator_address=localhost:{port}',
      '--config.parallel.num_processes=2', f'--config.parallel.process_id={pid}',
      '--config.parallel.cpu_collectives=gloo', '--config.parallel.initialization_timeout=120'],
      CDIFF_JAX_CACHE=str(cache))
  assert 'done: step 6' in outs[0] and 'done: step 6' in outs[1]


@pytest.mark.slow  # 2 min (two launches of two processes); the fast suite keeps the others
def test_two_processes_match_one(tmp_path):
  workdir = tmp_path / 'run'
  config_path = tmp_path / 'multihost_config.py'
  config_path.write_text(CONFIG)
  _launch_two(config_path, workdir, tmp_path / 'cache')
  # The same command again in another workdir, beside the first one's caches: it ran on
  # programs the first run had left in the persistent compilation cache, and hung in the
  # first cross-process collective (so multi-process CPU runs do without that cache).
  _launch_two(config_path, tmp_path / 'again', tmp_path / 'cache')

  # One process, two devices, the same global batch of 20.
  exp = train.build(_config(config_path))
  assert exp.mesh.devices.size == 2
  state, _ = train.fit(exp, exp.init_state())
  single = jax.tree.leaves(jax.device_get(state.params))
  multi = jax.tree.leaves(checkpoint.load_params(str(workdir), 'params'))
  lam_single = np.asarray(state.extras['lam'])
  assert len(single) == len(multi)
  # Bit-identical: the same global batch and program, only the all-reduce crosses processes.
  for a, b in zip(single, multi):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.abs(lam_single).sum() > 0  # the dual variables moved, so the groups mattered

  # Only process 0 wrote: one record per logging step, one config, the final samples.
  steps = [json.loads(l)['step'] for l in open(workdir / 'metrics.jsonl')]
  assert steps == [2, 4, 6]
  assert (workdir / 'samples' / 'final.png').exists()
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['6']


def test_put_batch_shards_the_example_axis_after_leading_axes():
  """put_batch splits the example axis (after ``leading_axes`` stacked-step axes) over the
  mesh: device i holds examples [i B/n, (i+1) B/n) of every step, the values unchanged."""
  from cdiff_jax import parallel
  mesh = parallel.make_mesh()
  n = mesh.devices.size
  for leading_axes, shape in [(0, (4 * n, 3)), (1, (3, 2 * n, 5)), (1, (2, 2 * n))]:
    host = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    out = parallel.put_batch({'x': host}, mesh, leading_axes)['x']
    np.testing.assert_array_equal(np.asarray(out), host)
    per = shape[leading_axes] // n
    for shard in out.addressable_shards:
      i = list(mesh.devices.flat).index(shard.device)
      want = host[(slice(None),) * leading_axes + (slice(i * per, (i + 1) * per),)]
      np.testing.assert_array_equal(np.asarray(shard.data), want)


PREEMPTED = """
import os, signal, sys, time
sys.path.insert(0, {tests!r})
import run_files
from cdiff_jax import parallel, train
pid = int(sys.argv[1])
c = run_files.tiny_digits_config(log_every=4, checkpoint_every=0, steps_per_call=4)
c.train.steps = 80
c.parallel.distributed, c.parallel.coordinator_address = True, 'localhost:{port}'
c.parallel.num_processes, c.parallel.process_id = 2, pid
c.parallel.cpu_collectives, c.parallel.initialization_timeout = 'gloo', 120
put_batch, calls = parallel.put_batch, []


def notice_at_the_fifth_call(*args, **kwargs):
  calls.append(1)
  if pid == 0 and len(calls) == 5:
    os.kill(os.getpid(), signal.SIGTERM)   # the notice reaches process 0 only
  time.sleep(0.2)   # time for the processes to agree on a step
  return put_batch(*args, **kwargs)


parallel.put_batch = notice_at_the_fifth_call
try:
  train.train_and_evaluate(c, {workdir!r}, progress=False)
  print('ran to the end')
except train.Preempted as e:
  print(f'preempted at step {{e.step}}')
"""


def test_a_preemption_notice_stops_both_processes_at_one_step_with_scanned_steps(tmp_path):
  """4 steps per call: process 0 alone gets SIGTERM at its fifth call; JAX's preemption
  service makes both processes save the same step and stop (its sync point counts calls)."""
  workdir = tmp_path / 'run'
  script = tmp_path / 'preempted.py'
  script.write_text(PREEMPTED.format(tests=os.path.join(ROOT, 'tests'), port=_free_port(),
                                     workdir=str(workdir)))
  outs = _run_two(lambda pid: [sys.executable, str(script), str(pid)], timeout=600)
  ends = [out.strip().splitlines()[-1] for out in outs]
  assert ends[0] == ends[1] and ends[0].startswith('preempted at step '), ends
  step = int(ends[0].split()[-1])
  assert 16 < step < 80 and step % 4 == 0   # after the notice, before the end
  assert os.listdir(workdir / 'checkpoints') == [str(step)]


UNEQUAL_COPIES = """
import jax, jax.numpy as jnp, numpy as np, sys
pid = int(sys.argv[1])
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize('localhost:{port}', 2, pid, initialization_timeout=120)
from cdiff_jax import parallel
mesh = parallel.make_mesh()
# A replicated state whose copies differ between the processes (a discriminator one process
# trained and the other loaded from its cache, say), with a typed key among its leaves.
tree = parallel.put_replicated({{'w': np.float32(1.0 + 1e-3 * pid),
                                'key': jax.random.key(pid)}}, mesh)
x = parallel.put_batch(np.ones((2,), np.float32), mesh)   # two examples per process
f = jax.jit(lambda w, x: w * x, out_shardings=parallel.batch_sharding(mesh))
print('per-example', parallel.to_host(f(tree['w'], x)).tolist(),
      'key', np.asarray(jax.random.key_data(tree['key'])).tolist(), flush=True)
"""


def test_replicated_state_takes_process_0s_copy(tmp_path):
  """put_replicated gives every process process 0's values: unequal copies made a
  'replicated' array whose shards differed, so each process computed with its own."""
  script = tmp_path / 'unequal.py'
  script.write_text(UNEQUAL_COPIES.format(port=_free_port()))
  outs = _run_two(lambda pid: [sys.executable, str(script), str(pid)])
  want = np.asarray(jax.random.key_data(jax.random.key(0))).tolist()
  for out in outs:
    line = [l for l in out.splitlines() if l.startswith('per-example')][0]
    assert line == f'per-example [1.0, 1.0, 1.0, 1.0] key {want}', line
