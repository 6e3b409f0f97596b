"""Optimizer and learning-rate schedule from ``config.optim``."""

from __future__ import annotations

import optax

# The end of the cosine schedule as a fraction of optim.lr: base_config's value, and the one an
# optim section without the field gets.
FINAL_LR_FRACTION = 0.05


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
  oc = optim_config
  warmup = min(oc.warmup_steps, max(total_steps - 1, 0))
  if oc.lr_schedule == 'constant':
    decay = optax.constant_schedule(oc.lr)
  elif oc.lr_schedule == 'cosine':
    decay = optax.cosine_decay_schedule(oc.lr, max(total_steps - warmup, 1),
                                        alpha=oc.get('final_lr_fraction', FINAL_LR_FRACTION))
  else:
    raise ValueError(f"optim.lr_schedule={oc.lr_schedule!r} is unknown; use 'constant' or 'cosine'.")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, oc.lr, warmup), decay], [warmup])


def make_optimizer(optim_config, total_steps: int):
  """Returns (optax transformation, learning-rate schedule)."""
  oc = optim_config
  lr = learning_rate_schedule(oc, total_steps)
  if oc.name == 'adam':
    opt = optax.adam(lr, b1=oc.b1, b2=oc.b2, eps=oc.eps)
  elif oc.name == 'adamw':
    opt = optax.adamw(lr, b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay)
  else:
    raise ValueError(f"optim.name={oc.name!r} is unknown; use 'adam' or 'adamw'.")
  chain = [optax.clip_by_global_norm(oc.grad_clip)] if oc.grad_clip > 0 else []
  return optax.chain(*chain, opt), lr
