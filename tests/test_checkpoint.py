"""Interrupted-and-resumed training equals uninterrupted training, bit for bit; an
incompatible checkpoint is refused."""

import jax
import numpy as np
import pytest

from cdiff_jax import checkpoint, train, train_step


def _params(result):
  state = result['state']
  state = state.replace(rng=jax.random.key_data(state.rng))
  return [np.asarray(x) for x in jax.tree.leaves(state)]


def test_resume_is_exact(tiny_config, tmp_path, monkeypatch):
  full = train.train_and_evaluate(tiny_config, str(tmp_path / 'full'), progress=False)

  calls = {'n': 0}
  original = train_step.CompiledStep.__call__

  def interrupted(self, state, batch):
    calls['n'] += 1
    if calls['n'] == 6:  # after the checkpoint at step 4, mid-way to the end
      raise KeyboardInterrupt
    return original(self, state, batch)

  monkeypatch.setattr(train_step.CompiledStep, '__call__', interrupted)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(tiny_config, str(tmp_path / 'resumed'), progress=False)
  monkeypatch.setattr(train_step.CompiledStep, '__call__', original)
  resumed = train.train_and_evaluate(tiny_config, str(tmp_path / 'resumed'), progress=False)

  assert resumed['final_step'] == full['final_step'] == 8
  for a, b in zip(_params(full), _params(resumed)):
    np.testing.assert_array_equal(a, b)
  # The resumed run appended to the metrics instead of losing the first half.
  from cdiff_jax import writers
  steps = [r['step'] for r in writers.read_metrics(str(tmp_path / 'resumed'))]
  assert steps == [4, 8]


def test_incompatible_checkpoint_is_refused(tiny_config, tmp_path):
  train.train_and_evaluate(tiny_config, str(tmp_path), progress=False)
  tiny_config.model.ch = 24
  with pytest.raises(checkpoint.IncompatibleCheckpoint, match='model.ch: checkpoint 16'):
    train.train_and_evaluate(tiny_config, str(tmp_path), progress=False)
  # A longer run of the same config resumes (steps is not structural).
  tiny_config.model.ch = 16
  tiny_config.train.steps = 12
  out = train.train_and_evaluate(tiny_config, str(tmp_path), progress=False)
  assert out['final_step'] == 12
