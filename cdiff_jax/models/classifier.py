"""Time-dependent classifiers d(x_t, t): the TIW-DSM discriminator, the guidance classifier
and (at t = 0) the evaluation classifier share this network.

``ConvClassifier`` is the encoder half of the UNet (residual blocks with a time embedding,
stride-2 downsampling), global average pooling and a linear head. ``features`` returns the
pooled penultimate features (the space of the "classifier FID").
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cdiff_jax.models.unet import ResBlock, conv3x3, norm_act, timestep_embedding


class ConvClassifier(nn.Module):
  ch: int = 32
  ch_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 1
  num_groups: int = 8
  dropout: float = 0.0
  num_outputs: int = 10
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, t, train: bool = False, return_features: bool = False):
    emb = timestep_embedding(t, self.ch)
    emb = nn.Dense(4 * self.ch, dtype=self.dtype)(emb)
    emb = nn.Dense(4 * self.ch, dtype=self.dtype)(nn.silu(emb))
    h = conv3x3(self.ch, self.dtype)(x.astype(self.dtype))
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = ResBlock(self.ch * mult, self.num_groups, self.dropout, self.dtype)(h, emb, train)
      if level != len(self.ch_mult) - 1:
        h = conv3x3(h.shape[-1], self.dtype, strides=2)(h)
    h = norm_act(self.num_groups, self.dtype)(h)  # GroupNorm + SiLU, as in the blocks
    features = h.mean(axis=(1, 2)).astype(jnp.float32)
    logits = nn.Dense(self.num_outputs)(features)
    if return_features:
      return logits, features
    return logits
