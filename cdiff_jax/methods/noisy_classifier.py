"""Time-dependent (noise-aware) classifiers: network, noised training losses, and the
per-example input-gradients of their log-probabilities.

Two methods need a classifier of noised inputs ``x_t``: TIW-DSM's discriminator
``d(x_t, t)`` (one logit: reference vs biased set) and classifier guidance's
``p(y | x_t, t)`` (one logit per class). Both train on examples noised by the score model's
own forward process, and both need ``grad_x log p`` for every example of a batch. This
module holds that shared part, so both use the same network and the same gradient code.

Per-example definition: ``example_logits(params, x, t)`` takes ONE example (no batch axis)
and is vmapped over the batch. The input-gradient of a per-example scalar is then
``vmap(grad(f))``, which XLA turns into a single backward pass over the batch; nothing
relies on examples being independent inside a batched forward (a network with batch
statistics would silently mix their gradients in the "grad of the sum" trick).

Frozen features: ``NoisyClassifier(feature_fn=...)`` makes the network a small head on
features ``feature_fn(frozen, x, t)`` of another, fixed network (e.g. the evaluation
classifier). Only the head's parameters are trained; ``frozen`` is passed separately so
optimizers never see it, but gradients with respect to ``x`` flow through it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cdiff_jax import parallel
from cdiff_jax import schedules as schedules_lib
from cdiff_jax.models.classifier import ConvClassifier
from cdiff_jax.models.mlp import MLPScore
from cdiff_jax.models.unet import timestep_embedding

TIME_WEIGHTINGS = ('uniform', 'sigma2')


class FeatureHead(nn.Module):
  """Logits from frozen features and the time: an MLP of ``depth`` hidden layers, the time
  embedding added in the first."""

  hidden: int = 128
  num_outputs: int = 1
  time_dim: int = 64
  depth: int = 2

  @nn.compact
  def __call__(self, features, t, train: bool = False):
    del train
    emb = nn.silu(nn.Dense(self.hidden)(timestep_embedding(t, self.time_dim)))
    h = nn.silu(nn.Dense(self.hidden)(features) + nn.Dense(self.hidden)(emb))
    for _ in range(self.depth - 1):
      h = nn.silu(nn.Dense(self.hidden)(h))
    return nn.Dense(self.num_outputs)(h)


NETS = ('conv', 'mlp', 'head')


def build_net(kind: str, num_outputs: int, *, ch: int = 16, ch_mult: Sequence[int] = (1, 2),
              num_res_blocks: int = 1, num_groups: int = 8, dropout: float = 0.0,
              hidden: int = 128, depth: int = 2) -> nn.Module:
  """'conv': ConvClassifier for images (B, H, W, C); 'mlp': MLP for vectors (B, D);
  'head': FeatureHead on frozen features (pass ``feature_fn`` to NoisyClassifier).
  ``ch``, ``ch_mult``, ``num_res_blocks``, ``num_groups`` and ``dropout`` shape the 'conv'
  network only; ``hidden`` and ``depth`` the other two."""
  if kind == 'conv':
    return ConvClassifier(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                          num_groups=num_groups, dropout=dropout, num_outputs=num_outputs)
  if kind == 'mlp':
    return MLPScore(hidden=hidden, depth=depth, num_outputs=num_outputs)
  if kind == 'head':
    return FeatureHead(hidden=hidden, num_outputs=num_outputs, depth=depth)
  raise ValueError(f'classifier network {kind!r} is unknown; use one of {NETS}.')


@dataclasses.dataclass(frozen=True, eq=False)
class NoisyClassifier:
  """A classifier of noised inputs, logits = f(x_t, t) of shape (batch, num_outputs)."""

  net: nn.Module
  num_outputs: int
  # (frozen params, x (B, ...), t (B,)) -> features (B, F); None: the net sees x itself.
  feature_fn: Callable | None = None

  def init(self, rng, example_shape, frozen=None):
    x = jnp.zeros((2,) + tuple(example_shape), jnp.float32)
    t = jnp.full((2,), 0.5)
    def init_params(rng, x, t, frozen):
      if self.feature_fn is not None:
        x = self.feature_fn(frozen, x, t)
      return self.net.init({'params': rng, 'dropout': rng}, x, t)['params']
    return parallel.run_once(init_params, rng, x, t, frozen)

  def logits(self, params, x, t, frozen=None, train: bool = False, rng=None):
    """Batched logits (B, num_outputs)."""
    if self.feature_fn is not None:
      x = self.feature_fn(frozen, x, t)
    rngs = {'dropout': rng} if (train and rng is not None) else None
    if isinstance(self.net, MLPScore):
      out = self.net.apply({'params': params}, x, t, None, train=train, rngs=rngs)
    else:
      out = self.net.apply({'params': params}, x, t, train=train, rngs=rngs)
    return out.astype(jnp.float32)

  def example_logits(self, params, x, t, frozen=None):
    """Logits (num_outputs,) of ONE example x (no batch axis) at scalar time t."""
    return self.logits(params, x[None], jnp.reshape(t, (1,)), frozen)[0]


def per_example_value_and_grad(fn: Callable, x, t, *args):
  """``fn(x_i, t_i, *args_i) -> scalar`` and its gradient in x_i, for every example i.

  ``args`` are batched along axis 0 like x and t (labels, for instance). Returns
  (values (B,), grads shaped like x).
  """
  values, grads = jax.vmap(jax.value_and_grad(fn))(x, t, *args)
  chex.assert_shape(values, (x.shape[0],))
  chex.assert_equal_shape([grads, x])
  return values, grads


def class_log_prob_and_grad(clf: NoisyClassifier, params, x, t, y, frozen=None):
  """log p(y_i | x_i, t_i) and its x-gradient per example: classifier guidance's term."""

  def log_prob(x1, t1, y1):
    return jax.nn.log_softmax(clf.example_logits(params, x1, t1, frozen))[y1]

  return per_example_value_and_grad(log_prob, x, t, y)


def noised_inputs(rng, x0, schedule: schedules_lib.Schedule, clean: bool = False):
  """(x_t, t) with t uniform on the schedule's range (``Schedule.sample_t``): the score
  model's times under the 'eps' weighting.

  Under 'elbo' the score loss draws t uniform in log-SNR, crowded at low noise. Trained at
  those times instead, the discriminator did worse even at those times: balanced BCE on
  held-out images (the biased side reweighted to the split's class profile) at the ELBO's
  times, trained at the ELBO's times against uniform t (chance 1.386), with ELBO weighting:
  configs/digits_tiw.py (500 steps, 60 reference images) 1.665 against 1.422, and
  configs/mnist_tiw.py (2,000 steps, 1,430 reference images) 1.297 against 1.239. So it
  trains at uniform t under either weighting.

  ``clean=True`` returns (x0, 0): the time-independent classifier of IW-DSM.
  """
  if clean:
    return x0, jnp.zeros((x0.shape[0],), jnp.float32)
  rng_t, rng_eps = jax.random.split(rng)
  t = schedule.sample_t(rng_t, (x0.shape[0],))
  eps = jax.random.normal(rng_eps, x0.shape, x0.dtype)
  return schedules_lib.q_sample(schedule, x0, t, eps), t


def time_weight(schedule: schedules_lib.Schedule, t, kind: str):
  """lambda(t) of the time-weighted losses. Each t's optimum is the same for any positive
  weighting (the classifier can fit every t); it only moves the capacity between times."""
  if kind == 'uniform':
    return jnp.ones_like(t)
  if kind == 'sigma2':  # emphasizes noisy times, where the ratio is close to 1
    return schedule.sigma(t) ** 2
  raise ValueError(f'time weighting {kind!r} is unknown; use one of {TIME_WEIGHTINGS}.')


# The balanced BCE of a constant logit 0 (time weights <= 1, as sigma2's, only lower it).
# A discriminator far above it (DIVERGED_BCE) is worse than any constant: it diverged.
CHANCE_BCE = 2 * float(np.log(2))
DIVERGED_BCE = 2 * CHANCE_BCE


def balanced_bce(logits, is_positive, is_negative, weights=None):
  """E_pos[-log sigmoid(l)] + E_neg[-log sigmoid(-l)], each a mean over its own examples.

  Means per side (not over the batch) make the optimum the *balanced* discriminator
  d* = p_pos / (p_pos + p_neg) whatever fraction of the batch each side is. Examples that
  are neither (other groups of a composed batch) are ignored. Returns (loss, accuracy).
  """
  chex.assert_rank(logits, 1)
  chex.assert_equal_shape([logits, is_positive, is_negative])
  w = jnp.ones_like(logits) if weights is None else weights
  pos = is_positive.astype(jnp.float32)
  neg = is_negative.astype(jnp.float32)
  loss_pos = jnp.sum(pos * w * -jax.nn.log_sigmoid(logits)) / jnp.maximum(pos.sum(), 1.0)
  loss_neg = jnp.sum(neg * w * -jax.nn.log_sigmoid(-logits)) / jnp.maximum(neg.sum(), 1.0)
  correct = pos * (logits > 0) + neg * (logits <= 0)
  accuracy = correct.sum() / jnp.maximum((pos + neg).sum(), 1.0)
  return loss_pos + loss_neg, accuracy


def noised_bce_loss(clf: NoisyClassifier, params, x0, is_positive, is_negative, rng,
                    schedule, time_weighting: str = 'uniform', clean: bool = False,
                    frozen=None, train: bool = True):
  """Time-weighted balanced BCE (T-BCE) of a one-logit classifier on noised x0.

  Returns (loss, metrics) with metrics bce, accuracy (logit > 0 means positive).
  ``clean=True`` (IW-DSM's classifier at t = 0) ignores ``time_weighting``: there is one
  time, and ``sigma2`` would weight it by sigma(0)^2 = 0, a loss without gradient.
  """
  rng_noise, rng_dropout = jax.random.split(rng)
  x_t, t = noised_inputs(rng_noise, x0, schedule, clean)
  logits = clf.logits(params, x_t, t, frozen, train=train, rng=rng_dropout)[:, 0]
  weights = None if clean else time_weight(schedule, t, time_weighting)
  loss, acc = balanced_bce(logits, is_positive, is_negative, weights)
  return loss, dict(bce=loss, accuracy=acc)


def noised_ce_loss(clf: NoisyClassifier, params, x0, labels, rng, schedule,
                   time_weighting: str = 'uniform', frozen=None, train: bool = True,
                   mask=None):
  """Time-weighted cross-entropy of a class classifier on noised x0 (guidance's classifier).

  Returns (loss, metrics) with metrics ce, accuracy.
  """
  rng_noise, rng_dropout = jax.random.split(rng)
  x_t, t = noised_inputs(rng_noise, x0, schedule)
  logits = clf.logits(params, x_t, t, frozen, train=train, rng=rng_dropout)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  m = jnp.ones_like(ce) if mask is None else mask.astype(jnp.float32)
  denom = jnp.maximum(m.sum(), 1.0)
  loss = jnp.sum(m * time_weight(schedule, t, time_weighting) * ce) / denom
  acc = jnp.sum(m * (logits.argmax(-1) == labels)) / denom
  return loss, dict(ce=loss, accuracy=acc)


def make_update(loss_fn: Callable, tx: optax.GradientTransformation) -> Callable:
  """``update(params, opt_state, *args) -> (params, opt_state, metrics)`` for
  ``loss_fn(params, *args) -> (loss, metrics)``; pure, so it can be jitted alone or run
  inside another jitted step (TIW-DSM's joint discriminator update)."""

  def update(params, opt_state, *args):
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *args)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  return update


def fit(update: Callable, params, opt_state, batches: Callable[[int], tuple], steps: int,
        rng, progress: bool = False, desc: str = 'classifier'):
  """Host loop: ``steps`` jitted updates on ``batches(i) -> args`` (numpy arrays).

  Returns (params, opt_state, metrics of the last 50 steps averaged).
  """
  from tqdm.auto import tqdm
  step = jax.jit(update, donate_argnums=(0, 1))
  # Own copies: donation must not invalidate buffers the caller still holds.
  params, opt_state = jax.tree.map(lambda a: jnp.array(a, copy=True), (params, opt_state))
  tail: list[Any] = []
  # disable=None: no bar when stdout is not a terminal (logs of batch jobs).
  for i in tqdm(range(steps), desc=desc, disable=None if progress else True, leave=False):
    params, opt_state, metrics = step(params, opt_state, *batches(i),
                                      jax.random.fold_in(rng, i))
    tail = (tail + [metrics])[-50:]
  summary = ({k: float(np.mean([np.asarray(m[k]) for m in jax.device_get(tail)]))
              for k in tail[0]} if tail else {})
  return params, opt_state, summary
