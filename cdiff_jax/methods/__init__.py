"""Training methods: each is a loss over a grouped batch plus optional extra state updates.

``build(config, model, num_classes)`` returns the method named by ``config.method.name``.
A method object provides ``data_groups``, ``init_extras``, ``loss`` and ``update_extras``
(see ``cdiff_jax.train_step``); optionally ``host_metrics(summary, step)`` (the logged
means of an interval -> warning lines).
"""

from __future__ import annotations

from cdiff_jax.config import ConfigError, check_fields
from cdiff_jax.methods import constrained
from cdiff_jax.methods import tiw
from cdiff_jax.methods.dsm import DSM

METHODS = ('dsm', 'constrained', 'tiw')


def build(config, model, num_classes: int, lr_fn=None):
  """``lr_fn``: the primal learning-rate schedule (methods may tie their own steps to it)."""
  name = config.method.name
  common = dict(weighting=config.diffusion.loss_weighting,
                num_classes=num_classes if config.model.conditional else 0,
                class_dropout=config.model.class_dropout,
                stratified_t=config.diffusion.time_sampling == 'stratified')
  if name == 'dsm':
    return DSM(model, batch_size=config.train.batch_size, **common)
  if name == 'constrained':
    base = (constrained.tiw_objective(config, model, num_classes, common)
            if config.method.objective == 'tiw' else DSM(model, **common))
    return constrained.build(config, base, lr_fn)
  if name == 'tiw':
    return tiw.build(config, model, num_classes, common)
  raise ConfigError(f'config.method.name={name!r}: must be one of {METHODS}.')


def validate(config, check_paths: bool = True) -> None:
  """Method-specific config checks (each method adds its own). ``check_paths=False``:
  not that a reference run holds checkpoints (a run loaded from its own checkpoint)."""
  if config.method.name not in METHODS:
    raise ConfigError(f'config.method.name={config.method.name!r}: must be one of {METHODS}.')
  if config.method.name == 'dsm':
    check_fields('method', config.method, ('name',))
  if config.method.name == 'constrained':
    constrained.validate(config, check_paths)
  if config.method.name == 'tiw':
    tiw.validate(config)
