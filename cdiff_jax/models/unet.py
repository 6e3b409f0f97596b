"""UNet eps-prediction network (DDPM / score_sde layout), NHWC, any image size.

Levels are built from ``ch_mult``; each level has ``num_res_blocks`` residual blocks
(GroupNorm, SiLU, 3x3 convs, time/class embedding added between the convs, dropout) and
optional self-attention. Downsampling is a stride-2 conv and upsampling resizes to the
exact shape of the matching skip connection, so odd sizes (28 -> 14 -> 7 -> 4) work.

Class conditioning: ``num_classes > 0`` adds an embedding of ``y`` in
``[0, num_classes]``, where ``num_classes`` itself is the null class of classifier-free
guidance (``y=None`` means the null class).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def timestep_embedding(t, dim: int, scale: float = 1000.0, max_period: float = 10000.0):
  """Sinusoidal embedding of t in [0, 1] (scaled to DDPM's step range), shape (B, dim)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (scale * jnp.asarray(t, jnp.float32))[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class ResBlock(nn.Module):
  out_ch: int
  num_groups: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, emb, train: bool):
    h = nn.silu(nn.GroupNorm(self.num_groups, dtype=self.dtype)(x))
    h = nn.Conv(self.out_ch, (3, 3), dtype=self.dtype)(h)
    h = h + nn.Dense(self.out_ch, dtype=self.dtype)(nn.silu(emb))[:, None, None, :]
    h = nn.silu(nn.GroupNorm(self.num_groups, dtype=self.dtype)(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    # Zero-initialized last conv: every block starts as the identity (as in DDPM).
    h = nn.Conv(self.out_ch, (3, 3), dtype=self.dtype, kernel_init=nn.initializers.zeros)(h)
    if x.shape[-1] != self.out_ch:
      x = nn.Conv(self.out_ch, (1, 1), dtype=self.dtype)(x)
    return x + h


class AttnBlock(nn.Module):
  num_heads: int
  num_groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = nn.GroupNorm(self.num_groups, dtype=self.dtype)(x).reshape(b, h * w, c)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        out_kernel_init=nn.initializers.zeros)(y, y)
    return x + y.reshape(b, h, w, c)


class UNet(nn.Module):
  """eps_theta(x_t, t, y). See the module docstring for the layout."""

  ch: int = 64
  ch_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 2
  attn_levels: Sequence[int] = (2,)
  num_heads: int = 1
  num_groups: int = 8
  dropout: float = 0.1
  num_classes: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, t, y=None, train: bool = False):
    out_channels = x.shape[-1]
    emb = timestep_embedding(t, self.ch)
    emb = nn.Dense(4 * self.ch, dtype=self.dtype)(emb)
    emb = nn.Dense(4 * self.ch, dtype=self.dtype)(nn.silu(emb))
    if self.num_classes:
      if y is None:
        y = jnp.full((x.shape[0],), self.num_classes, jnp.int32)
      emb = emb + nn.Embed(self.num_classes + 1, 4 * self.ch, dtype=self.dtype)(y)

    block = lambda c: ResBlock(c, self.num_groups, self.dropout, self.dtype)
    attn = lambda: AttnBlock(self.num_heads, self.num_groups, self.dtype)

    h = nn.Conv(self.ch, (3, 3), dtype=self.dtype)(x.astype(self.dtype))
    skips = [h]
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = block(self.ch * mult)(h, emb, train)
        if level in self.attn_levels:
          h = attn()(h)
        skips.append(h)
      if level != len(self.ch_mult) - 1:
        h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), dtype=self.dtype)(h)
        skips.append(h)

    h = block(h.shape[-1])(h, emb, train)
    h = attn()(h)
    h = block(h.shape[-1])(h, emb, train)

    for level in reversed(range(len(self.ch_mult))):
      for _ in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = block(self.ch * self.ch_mult[level])(h, emb, train)
        if level in self.attn_levels:
          h = attn()(h)
      if level != 0:
        target = skips[-1].shape
        h = jax.image.resize(h, (h.shape[0], target[1], target[2], h.shape[-1]), 'nearest')
        h = nn.Conv(h.shape[-1], (3, 3), dtype=self.dtype)(h)
    assert not skips

    h = nn.silu(nn.GroupNorm(self.num_groups, dtype=self.dtype)(h))
    h = nn.Conv(out_channels, (3, 3), dtype=self.dtype, kernel_init=nn.initializers.zeros)(h)
    return h.astype(jnp.float32)
