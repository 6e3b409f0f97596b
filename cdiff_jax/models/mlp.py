"""Small MLP eps-networks and classifiers for low-dimensional toy problems (1-D, 2-D)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cdiff_jax.models.unet import timestep_embedding


class MLPScore(nn.Module):
  """eps_theta(x_t, t, y) for vectors x of shape (batch, dim).

  The time embedding enters every hidden layer (additively), which a plain concatenation
  at the input does not do; small toy models fit the t-dependence much better this way.
  """

  hidden: int = 128
  depth: int = 3
  num_classes: int = 0
  time_dim: int = 64
  num_outputs: int = 0  # 0: same as the input dimension (an eps-network)
  dtype: Any = jnp.float32  # computation dtype (model.dtype); parameters stay float32

  @nn.compact
  def __call__(self, x, t, y=None, train: bool = False):
    del train
    dense = lambda n: nn.Dense(n, dtype=self.dtype)
    emb = timestep_embedding(t, self.time_dim)
    emb = nn.silu(dense(self.hidden)(emb))
    if self.num_classes:
      if y is None:
        y = jnp.full((x.shape[0],), self.num_classes, jnp.int32)
      emb = emb + nn.Embed(self.num_classes + 1, self.hidden, dtype=self.dtype)(y)
    h = dense(self.hidden)(x.astype(self.dtype))
    for _ in range(self.depth):
      h = nn.silu(h + dense(self.hidden)(emb))
      h = dense(self.hidden)(h)
    h = nn.silu(h)
    return dense(self.num_outputs or x.shape[-1])(h).astype(jnp.float32)
