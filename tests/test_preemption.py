"""Preemption through the launcher: SIGTERM saves at the next step boundary and exits with
status 3 (Ctrl-C the same, with 130); SIGKILL at any moment loses at most the steps since
the last checkpoint. Either way, rerunning the command ends with exactly the parameters of
an uninterrupted run."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from cdiff_jax import checkpoint, config as config_lib, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
OVERRIDES = {
    'model.ch': 16, 'model.attn_levels': (), 'train.steps': STEPS, 'train.batch_size': 16,
    'train.log_every': 2, 'train.checkpoint_every': 2, 'optim.warmup_steps': 2,
    'sample.num_steps': 2, 'sample.num_samples': 4,
}
ARGS = [f'--config.{f}={"()" if v == () else v}' for f, v in OVERRIDES.items()]


def _command(workdir):
  return [sys.executable, '-m', 'cdiff_jax.main', '--config=configs/digits_dsm.py',
          f'--workdir={workdir}', '--no_progress', *ARGS]


def _env():
  # The same two CPU devices as this test session, so the runs are comparable bit for bit.
  return dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')


def _run(workdir):
  return subprocess.run(_command(workdir), cwd=ROOT, env=_env(), capture_output=True,
                        text=True, timeout=600)


def _start(workdir):
  return subprocess.Popen(_command(workdir), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc, timeout=300):
  end = time.time() + timeout
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f'the run ended early: {proc.communicate()[1][-2000:]}')
    if time.time() > end:
      proc.kill()
      raise AssertionError('timed out')
    time.sleep(0.05)


def _committed_steps(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


@pytest.fixture(scope='module')
def uninterrupted():
  """Parameters after STEPS steps of the same config in this process (no I/O)."""
  c = config_lib.base_config()
  for field, value in OVERRIDES.items():
    section, name = field.split('.')
    c[section][name] = value
  exp = train.build(c)
  state, _ = train.fit(exp, exp.init_state())
  return jax.device_get(state.params), jax.device_get(state.ema_params)


def _assert_same_as(uninterrupted, workdir):
  for which, expected in zip(('params', 'ema_params'), uninterrupted):
    got = checkpoint.load_params(str(workdir), which)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _metric_steps(workdir):
  return [json.loads(l)['step'] for l in open(os.path.join(workdir, 'metrics.jsonl'))]


def test_sigterm_saves_and_resumes_exactly(tmp_path, uninterrupted):
  proc = _start(tmp_path)
  # config.json is written once the run has checked its config and data and holds its
  # SIGTERM handler; the signal then lands before or during the first steps.
  _wait_for(lambda: os.path.exists(tmp_path / 'config.json'), proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 3, err[-2000:]
  assert 'Traceback' not in err
  saved = _committed_steps(tmp_path)
  assert saved and 0 < saved[-1] < STEPS, saved
  assert f'preempted: saved a checkpoint at step {saved[-1]}' in err
  assert 'rerun the same command to resume' in err
  first = json.load(open(tmp_path / 'run_time.json'))
  assert first['invocations'] == 1 and first['seconds'] > 0, first

  resumed = _run(tmp_path)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f'Resumed from step {saved[-1]}' in resumed.stdout
  _assert_same_as(uninterrupted, tmp_path)
  # The run's time is both invocations', not the last one's.
  total = json.load(open(tmp_path / 'run_time.json'))
  assert total['invocations'] == 2 and total['seconds'] > first['seconds'], (first, total)
  assert json.load(open(tmp_path / 'summary.json'))['seconds'] == total['seconds']


def test_ctrl_c_saves_and_resumes_exactly(tmp_path, uninterrupted):
  """The first Ctrl-C (SIGINT) saves at the next step boundary like SIGTERM, but exits with
  130, not 3, so a restart loop on status 3 stops."""
  proc = _start(tmp_path)
  _wait_for(lambda: os.path.exists(tmp_path / 'config.json'), proc)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 130, err[-2000:]
  assert 'Traceback' not in err and 'KeyboardInterrupt' not in err, err[-2000:]
  assert 'press Ctrl-C again to stop at once' in err
  saved = _committed_steps(tmp_path)
  assert saved and 0 < saved[-1] < STEPS, saved
  assert f'interrupted: saved a checkpoint at step {saved[-1]}' in err

  resumed = _run(tmp_path)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f'Resumed from step {saved[-1]}' in resumed.stdout
  _assert_same_as(uninterrupted, tmp_path)


def test_a_second_ctrl_c_stops_at_once():
  """In the training loop the first Ctrl-C only asks for the save; the second raises
  KeyboardInterrupt at once (the previous handler is back); leaving the run puts every
  handler back. Before the loop (set-up) the first Ctrl-C already stops at once: there is
  nothing new to save (an earlier version finished the set-up, ran a step and saved it).
  After the last step SIGTERM ends the run as a preemption (``Preempted``: status 3, which
  a restart loop reruns; it was the signal's own exit status, which such a loop stops on)."""
  if threading.current_thread() is not threading.main_thread():
    pytest.skip('signal handlers need the main thread')
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  with train._PreemptionWatch() as watch:
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1.0)
    assert not watch.requested
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
  with train._PreemptionWatch() as watch:
    watch.training = True
    assert signal.getsignal(signal.SIGINT) != before[0]
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)  # the handler runs at the main thread's next bytecode
    assert watch.requested and watch.interrupted
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1.0)
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
  with train._PreemptionWatch() as watch:
    watch.training = True
    assert not watch.finishing(12, '/ckpt')
    with pytest.raises(train.Preempted, match='preempted: saved a checkpoint at step 12 in /ckpt'):
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(1.0)
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_sigterm_during_set_up_goes_to_the_callers_handler():
  """SIGTERM in set-up (a discriminator's pre-training of minutes) was only noted, and the
  run saved at its first step, past a preemption's grace period: it goes to the handler
  the watch replaced (the command line's stops the program at once, exit status 3); in the
  loop it asks for the save as before."""
  if threading.current_thread() is not threading.main_thread():
    pytest.skip('signal handlers need the main thread')

  class AtOnce(Exception):
    pass

  def callers(signum, frame):
    raise AtOnce()

  before = signal.signal(signal.SIGTERM, callers)
  try:
    with train._PreemptionWatch() as watch:
      with pytest.raises(AtOnce):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1.0)
      watch.training = True
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.05)
      assert watch.requested
    assert signal.getsignal(signal.SIGTERM) is callers
  finally:
    signal.signal(signal.SIGTERM, before)


def test_sigkill_resumes_from_last_complete_checkpoint(tmp_path, uninterrupted):
  proc = _start(tmp_path)
  _wait_for(lambda: _committed_steps(tmp_path), proc)
  time.sleep(random.uniform(0.0, 0.3))  # anywhere: mid-step, mid-save, mid-log
  proc.kill()
  proc.communicate(timeout=60)
  killed_at = _committed_steps(tmp_path)
  assert killed_at and killed_at[-1] < STEPS, killed_at
  # The run time is recorded at each checkpoint (the kill may land between the two).
  clock = tmp_path / 'run_time.json'
  before = json.load(open(clock)) if clock.exists() else dict(seconds=0.0, invocations=0)
  assert before['invocations'] in (0, 1), before

  resumed = _run(tmp_path)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  _assert_same_as(uninterrupted, tmp_path)
  total = json.load(open(clock))
  assert total['invocations'] == before['invocations'] + 1, (before, total)
  assert total['seconds'] > before['seconds'], (before, total)
  # Steps the killed run logged after its last checkpoint are not duplicated.
  assert _metric_steps(tmp_path) == list(range(2, STEPS + 1, 2))


_HOLD_LOCK = '''
import sys, time
from cdiff_jax import train
lock = train._WorkdirLock(sys.argv[1])   # held while the object lives
lock.acquire()
print('held', flush=True)
time.sleep(600)
'''


def test_a_workdir_in_use_is_refused_and_a_dead_holder_does_not_block(tmp_path, tiny_config):
  """A second run in a workdir that a live run holds stops before writing anything, with
  one line naming the holder; once the holder dies (SIGKILL: no clean-up of its own) the
  workdir is free again and the run trains."""
  workdir = str(tmp_path / 'run')
  holder = subprocess.Popen([sys.executable, '-c', _HOLD_LOCK, workdir], stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(config_lib.ConfigError) as e:
      train.train_and_evaluate(tiny_config, workdir, progress=False)
    assert str(e.value).startswith(f'workdir {workdir} is in use by another run (pid '
                                   f'{holder.pid} on ')
    assert os.listdir(workdir) == ['.lock']          # nothing of the run written
  finally:
    holder.kill()
    holder.wait()
  tiny_config.eval.enabled = False
  result = train.train_and_evaluate(tiny_config, workdir, progress=False)
  assert int(result['state'].step) == tiny_config.train.steps
  with open(os.path.join(workdir, '.lock')) as f:    # the lock was this process's
    assert f.read().startswith(f'pid {os.getpid()} on ')
  again = train._WorkdirLock(workdir)                # and it let go at the end
  again.acquire()
  again.release()


def test_a_failed_run_keeps_its_error_and_frees_the_workdir_when_the_clock_cannot_write(
    tmp_path, tiny_config, monkeypatch, capsys):
  """The run-time record at the end of a failed invocation must not hide the failure nor
  keep the workdir locked (a notebook's retry in the same process would be refused)."""
  tiny_config.eval.enabled = False
  tiny_config.train.steps = 4
  workdir = str(tmp_path / 'run')
  real_write = train.writers.write_atomic

  def write(path, *args, **kwargs):
    if path.endswith('run_time.json') and failing[0]:
      raise OSError(28, 'No space left on device')
    return real_write(path, *args, **kwargs)

  failing = [False]
  monkeypatch.setattr(train.writers, 'write_atomic', write)

  def hook(*_):
    failing[0] = True
    raise RuntimeError('the hook failed')

  with pytest.raises(RuntimeError, match='the hook failed'):
    train.train_and_evaluate(tiny_config, workdir, progress=False, hooks=dict(bad=hook))
  assert 'could not record the run time' in capsys.readouterr().err
  again = train._WorkdirLock(workdir)  # free: acquire would raise ConfigError otherwise
  again.acquire()
  again.release()
