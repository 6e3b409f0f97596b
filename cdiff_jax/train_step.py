"""Step factory: a method's loss -> one jitted, data-parallel, donated train step.

A *method* (``cdiff_jax.methods``) supplies

* ``loss(params, extras, batch, rng) -> (scalar, aux)`` where ``aux['metrics']`` is a dict
  of scalars to log and the rest of ``aux`` is passed on to
* ``update_extras(extras, aux, step, rng) -> (extras, metrics)``, the method's own update
  of its state leaves (dual ascent, discriminator step), run after the primal update in
  the same XLA program.

``make_train_step`` wraps them into ``step(state, batch) -> (state, metrics)``. With
``steps_per_call = k > 1`` the batch carries a leading axis of size k and a ``lax.scan``
runs k steps per host call (fewer dispatches; metrics come back stacked). On CPU the scanned
step is traced with ``unet.loop_friendly_conv`` for the 3x3 convolutions: XLA:CPU runs
convolution gradients inside a loop body 20-50x slower than outside one
(``benchmarks/loop_grad.py``), and the loop-friendly form (same values) avoids that.

Non-finite guard: if the loss, the gradient norm, the update's norm or the method's state
(e.g. the multipliers) is not finite, the step keeps the old state (parameters, optimizer,
EMA and extras) and reports ``nonfinite = 1``; the training loop then stops or skips, by
config, without a bad state ever reaching a checkpoint.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import optax

from cdiff_jax import parallel
from cdiff_jax.models import unet
from cdiff_jax.state import TrainState


class Method(Protocol):

  def loss(self, params, extras, batch, rng) -> tuple[jax.Array, dict]:
    ...

  def update_extras(self, extras, aux, step, rng) -> tuple[Any, dict]:
    ...


def ema_update(ema, params, step, decay: float):
  """EMA with a warm-up: the effective decay min(decay, (1+s)/(10+s)) lets short runs'
  EMA follow the parameters instead of staying near the random initialization."""
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


def schedule_step(opt_state, step):
  """The step the optimizer's learning-rate schedule is at: its own count, which a skipped
  non-finite step does not advance, so the logged lr is the one applied; ``step`` when the
  optimizer has no schedule state (a constant learning rate)."""
  is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
  states = [s for s in jax.tree.leaves(opt_state, is_leaf=is_schedule) if is_schedule(s)]
  return states[0].count if states else step


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def _select(pred, on_true, on_false):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def make_step_fn(method: Method, tx: optax.GradientTransformation,
                 lr_fn: Callable, ema_decay: float, debug_nan_step: int = -1) -> Callable:
  """The pure, unjitted single step (exposed for tests and custom loops).

  ``debug_nan_step >= 0`` is fault injection for tests of the non-finite guard: the loss
  (and so every gradient) of that step is NaN. With the default -1 the program is unchanged.
  """

  def loss_fn(params, extras, batch, rng, step):
    loss, aux = method.loss(params, extras, batch, rng)
    if debug_nan_step >= 0:
      loss = loss + jnp.where(step == debug_nan_step, jnp.nan, 0.0).astype(loss.dtype)
    return loss, aux

  def step_fn(state: TrainState, batch) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    rng_loss, rng_extras = jax.random.split(rng)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.extras, batch, rng_loss, state.step)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # The EMA's warm-up, like the learning rate, counts applied steps (not skipped ones).
    applied = schedule_step(state.opt_state, state.step)
    ema = ema_update(state.ema_params, params, applied, ema_decay)
    extras, extra_metrics = method.update_extras(state.extras, aux, state.step, rng_extras)
    grad_norm = optax.global_norm(grads)
    # A finite loss and gradient can still give a non-finite update (Adam's 0/0 at eps=0)
    # or method state (the dual variables, a jointly trained discriminator): all are checked.
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
              & jnp.isfinite(optax.global_norm(updates)) & _all_finite(extras))
    new = state.replace(step=state.step + 1, params=params, ema_params=ema,
                        opt_state=opt_state, extras=extras)
    # On a non-finite step keep everything but the step counter (so a 'skip' run moves on).
    new = _select(finite, new, state.replace(step=state.step + 1))
    lr = lr_fn(applied)
    metrics = dict(loss=loss, grad_norm=grad_norm, lr=lr,
                   nonfinite=(~finite).astype(jnp.int32))
    metrics.update(aux.get('metrics', {}))
    metrics.update(extra_metrics)
    return new, metrics

  return step_fn


class CompiledStep:
  """``step(state, batch)``: jitted with the state donated and sharded over ``mesh``.

  ``num_traces`` counts Python traces of the step, so tests can assert it compiles once.

  ``loop_friendly_conv`` (k > 1 only): trace the scanned step's 3x3 convolutions with
  ``unet.loop_friendly_conv``; None (default) does so when the mesh is on CPU.
  """

  def __init__(self, step_fn: Callable, mesh, steps_per_call: int = 1,
               loop_friendly_conv: bool | None = None):
    self.num_traces = 0
    self.step_fn = step_fn
    self.steps_per_call = steps_per_call
    self.mesh = mesh
    if loop_friendly_conv is None:
      loop_friendly_conv = unet.loop_friendly_default(mesh)
    self.loop_friendly_conv = steps_per_call > 1 and loop_friendly_conv

    def scan_body(state, batch):
      # A function of this step's own: lax.scan caches the traced body by function, so
      # two steps sharing ``step_fn`` with different ``loop_friendly_conv`` would otherwise
      # share one trace.
      return step_fn(state, batch)

    def traced(state, batch):
      self.num_traces += 1
      if steps_per_call == 1:
        return step_fn(state, batch)
      with unet.loop_friendly_conv_grads(self.loop_friendly_conv):
        return jax.lax.scan(scan_body, state, batch)

    leading = 0 if steps_per_call == 1 else 1
    self._jitted = jax.jit(
        traced, donate_argnums=(0,),
        in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh, leading)),
        out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)))

  def _check_batch(self, batch) -> None:
    """A batch of one step (``group``: one id per example) for ``steps_per_call=1``, and k
    of them stacked on a leading axis for ``steps_per_call=k``; named here, not by a shape
    error inside the model."""
    group = batch.get('group') if isinstance(batch, dict) else None
    if group is None:
      return
    k = self.steps_per_call
    shape = tuple(group.shape)
    if k == 1 and len(shape) != 1:
      raise ValueError(f"this step takes one step's batch (steps_per_call=1), but its 'group' "
                       f'has shape {shape}: give batcher.batch(step), or build the step with '
                       f'train.steps_per_call={shape[0]} for batcher.stacked(step, {shape[0]}).')
    if k > 1 and (len(shape) != 2 or shape[0] != k):
      raise ValueError(f'this step runs {k} steps per call and takes {k} batches stacked on a '
                       f"leading axis (batcher.stacked(step, {k})), but its 'group' has shape "
                       f'{shape}.')

  def __call__(self, state, batch):
    self._check_batch(batch)
    return self._jitted(state, batch)

  def lower(self, state, batch):
    self._check_batch(batch)
    return self._jitted.lower(state, batch)


def make_train_step(method: Method, tx, lr_fn, ema_decay: float, mesh,
                    steps_per_call: int = 1, debug_nan_step: int = -1,
                    loop_friendly_conv: bool | None = None) -> CompiledStep:
  return CompiledStep(make_step_fn(method, tx, lr_fn, ema_decay, debug_nan_step), mesh,
                      steps_per_call, loop_friendly_conv)
