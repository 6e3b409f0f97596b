"""The training state: one pytree, checkpointed as a whole."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training.

  ``extras`` holds method-specific leaves (dual variables of constrained training, the
  discriminator's parameters and optimizer state of TIW-DSM, ...). ``rng`` is a typed key
  that is never split in place: step s uses ``fold_in(rng, s)``, so a resumed run draws
  exactly the random numbers an uninterrupted run would.
  """

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array
  extras: Any = flax.struct.field(default_factory=dict)


def create_train_state(params, tx: optax.GradientTransformation, rng, extras=None):
  """The training state around ``params`` (EMA a copy, Adam's state from ``tx``). The state
  holds ``params`` themselves: the jitted step donates the state's buffers, so after its
  first call ``params`` are deleted; keep a copy (``jax.tree.map(jnp.copy, params)``) to
  use them again."""
  # EMA starts as a copy; jnp.array(copy=True) keeps it from aliasing params, which
  # would break buffer donation.
  ema = jax.tree.map(lambda p: jnp.array(p, copy=True), params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema,
                    opt_state=tx.init(params), rng=rng, extras=extras or {})


def num_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
