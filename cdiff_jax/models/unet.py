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

import contextlib
import math
from typing import Any, Sequence

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# Layer implementations: True uses the faster equivalents below (tested equal to flax's
# layers; the dropout has nn.Dropout's distribution, another random stream);
# benchmarks/train_step.py and compile_time.py --plain-layers set them False for a before/after.
FUSED_GN = True
POINTWISE_DOT = True
REPEAT_UPSAMPLE = True
RBG_DROPOUT = True
# Off by default: outside loops it gains nothing over lax's gradients (same speed on CPU,
# benchmarks/README.md); code that differentiates the network inside a compiled loop (MCMC
# samplers, classifier guidance, the scanned train step) traces under
# ``loop_friendly_conv_grads()`` on CPU (``loop_friendly_default``).
LOOP_FRIENDLY_CONV_GRAD = False


def loop_friendly_default(mesh=None) -> bool:
  """Whether code that differentiates the network inside a compiled loop (MCMC samplers,
  classifier guidance, the scanned train step) uses ``loop_friendly_conv`` when not told:
  on CPU only, where the slow loop-body convolution gradients are (XLA:CPU's; GPU and TPU
  keep their own convolution gradients). ``mesh``: the devices the program runs on
  (default: JAX's default backend)."""
  platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
  return platform == 'cpu'


@contextlib.contextmanager
def loop_friendly_conv_grads(enabled: bool = True):
  """Within this block, UNets traced use ``loop_friendly_conv`` for their 3x3 convolutions
  (same values and gradients; fast gradients inside ``fori_loop``/``scan`` on XLA:CPU)."""
  global LOOP_FRIENDLY_CONV_GRAD
  previous, LOOP_FRIENDLY_CONV_GRAD = LOOP_FRIENDLY_CONV_GRAD, enabled
  try:
    yield
  finally:
    LOOP_FRIENDLY_CONV_GRAD = previous


def timestep_embedding(t, dim: int, scale: float = 1000.0, max_period: float = 10000.0):
  """Sinusoidal embedding of t in [0, 1] (scaled to DDPM's step range), shape (B, dim)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (scale * jnp.asarray(t, jnp.float32))[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def pointwise_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, precision=None, **unused):
  """A 1x1, stride-1 ``lax.conv_general_dilated`` (NHWC, HWIO) computed as a matmul over
  channels. Same result; XLA's CPU backend runs the weight gradient of a 1x1 convolution
  as a windowed convolution over the whole image, ~10x slower than this matmul's."""
  del padding, lhs_dilation, rhs_dilation, unused
  assert rhs.shape[:-2] == (1,) * (rhs.ndim - 2) and set(window_strides) <= {1}
  assert feature_group_count == 1
  return lax.dot_general(lhs, rhs.reshape(rhs.shape[-2:]), (((lhs.ndim - 1,), (0,)), ((), ())),
                         precision=precision)


_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _conv(x, w, stride, pads):
  return lax.conv_general_dilated(x, w, (stride, stride), pads, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_vjp(x, w, stride, pads):
  return _conv(x, w, stride, pads)


def _conv_vjp_fwd(x, w, stride, pads):
  return _conv(x, w, stride, pads), (x, w)


def _conv_vjp_bwd(stride, pads, res, g):
  # Both gradients as forward convolutions in the canonical NHWC/HWIO layout, which XLA:CPU
  # runs on the same fast kernel inside a loop as outside one. With xp the padded input,
  # y[o] = sum_k xp[s o + k] w[k]:
  # * dx is a stride-1 convolution of g (zero-upsampled when s > 1) with the flipped,
  #   in/out-transposed kernel, padded so that it lands on x's pixels;
  # * dw[k, ci, co] = sum_{n, o} xp[n, s o + k, ci] g[n, o, co] is a convolution of x with
  #   its channels as the batch and its examples as the feature axis, by g as the kernel
  #   (dilated by s), transposed explicitly: lax's own transpose rule gives the same
  #   convolution in a non-canonical layout, which XLA:CPU runs 100x slower in a loop.
  x, w = res
  (kh, kw), (h, wd), (oh, ow) = w.shape[:2], x.shape[1:3], g.shape[1:3]
  (lo_h, _), (lo_w, _) = pads
  gu = g
  if stride > 1:
    gu = jnp.zeros((g.shape[0], stride * (oh - 1) + 1, stride * (ow - 1) + 1, g.shape[-1]),
                   g.dtype).at[:, ::stride, ::stride].set(g)
  dx_pads = ((kh - 1 - lo_h, h + lo_h - gu.shape[1]), (kw - 1 - lo_w, wd + lo_w - gu.shape[2]))
  dx = _conv(gu, jnp.flip(w, (0, 1)).swapaxes(2, 3), 1, dx_pads)
  dw = lax.conv_general_dilated(jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(g, (1, 2, 0, 3)),
                                (1, 1), pads, rhs_dilation=(stride, stride),
                                dimension_numbers=_NHWC)  # (ci, >= kh, >= kw, co)
  dw = jnp.transpose(dw[:, :kh, :kw, :], (1, 2, 0, 3))
  return dx.astype(x.dtype), dw.astype(w.dtype)


_conv_vjp.defvjp(_conv_vjp_fwd, _conv_vjp_bwd)


def loop_friendly_conv(lhs, rhs, window_strides, padding, lhs_dilation=None,
                       rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                       precision=None, **kwargs):
  """``lax.conv_general_dilated`` for flax's ``nn.Conv`` (NHWC) whose gradients XLA:CPU
  also runs fast inside a compiled loop: for an undilated, ungrouped convolution with equal
  strides both gradients are written as forward convolutions in the canonical NHWC/HWIO
  layout (explicit transposes around the kernel gradient's). XLA:CPU runs lax's own
  convolution gradients 20-50x slower inside ``fori_loop``/``scan``
  (benchmarks/loop_grad.py), where MCMC samplers, guidance and the scanned train step
  differentiate; these run as fast there as outside a loop, where they match lax's speed.
  Same values and gradients (tests/test_models.py); other convolutions go to lax
  unchanged."""
  stride = window_strides[0] if window_strides else 1
  supported = (rhs.ndim == 4 and set(window_strides) <= {stride} and
               set(lhs_dilation or ()) <= {1} and set(rhs_dilation or ()) <= {1} and
               feature_group_count == 1 and precision is None and
               (dimension_numbers is None or
                lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) ==
                lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)))
  if supported:
    pads = (lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (stride,) * 2, padding)
            if isinstance(padding, str) else padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    out = [(n + lo + hi - k) // stride + 1 for n, (lo, hi), k in
           zip(lhs.shape[1:3], pads, rhs.shape[:2])]
    # dx's padding must not crop: no more padding than the kernel can reach.
    supported = all(0 <= lo <= k - 1 and n + lo >= stride * (o - 1) + 1 for n, (lo, hi), k, o in
                    zip(lhs.shape[1:3], pads, rhs.shape[:2], out))
  if supported:
    return _conv_vjp(lhs, rhs, stride, pads)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                  rhs_dilation, dimension_numbers, feature_group_count,
                                  precision=precision, **kwargs)


def conv3x3(features, dtype, strides=1, **kwargs):
  """A 3x3 'SAME' ``nn.Conv``; under ``loop_friendly_conv_grads()`` with loop-friendly
  gradients (same parameters, values and gradients)."""
  if LOOP_FRIENDLY_CONV_GRAD:
    kwargs['conv_general_dilated'] = loop_friendly_conv
  return nn.Conv(features, (3, 3), strides=(strides, strides), dtype=dtype, **kwargs)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _sums(a, b, axes):
  """(sum of a, sum of b) over ``axes`` as one variadic reduce: XLA:CPU reads the operands
  in one pass (two separate sums over a (64, 28, 28, 72) array take 1.9x as long)."""
  zero = jnp.zeros((), a.dtype)
  return lax.reduce((a, b), (zero, zero), lambda u, v: (u[0] + v[0], u[1] + v[1]), axes)


@_sums.defjvp
def _sums_jvp(axes, primals, tangents):
  # Linear: the tangents are plain sums (lax's rule for a variadic reduce fails on a
  # symbolic-zero tangent, which the double gradient of GroupNorm without SiLU produces).
  return _sums(*primals, axes), tuple(jnp.sum(t, axes) for t in tangents)


def _to_groups(v, num_groups: int):
  """(B, C) per-channel sums -> (B, G) per-group sums."""
  return v.reshape(v.shape[0], num_groups, -1).sum(-1)


def _to_channels(v, c: int):
  """(B, G) -> (B, C), each group's value repeated over its channels."""
  return jnp.repeat(v, c // v.shape[-1], axis=-1)


def _bcast(v, x):
  """(B, C) -> broadcastable against x (B, ..., C)."""
  return v.reshape((v.shape[0],) + (1,) * (x.ndim - 2) + (v.shape[-1],))


# The per-(example, channel) coefficients are materialized before the elementwise passes:
# left to XLA they are re-derived for every element (an integer division by the group size
# each), which made those passes ~3x slower on CPU.
_materialize = lax.optimization_barrier


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def group_norm(x, scale, bias, num_groups: int, epsilon: float, silu: bool, dtype):
  """GroupNorm(x) * scale + bias, then SiLU if ``silu``; statistics in float32.

  Written as passes over the activations that XLA runs fast: the statistics are per-(example,
  channel) sums over the spatial axes (one variadic reduce) combined per group, and the
  output is ``x * a + b`` with per-(example, channel) ``a``, ``b``. The gradient reduces
  ``dz`` and ``dz * x`` the same way and is again affine in ``(dz, x)``: two passes."""
  return _group_norm_fwd(x, scale, bias, num_groups, epsilon, silu, dtype)[0]


def _gn_count(x, num_groups):
  return math.prod(x.shape[1:-1]) * (x.shape[-1] // num_groups)


def _gn_affine(scale, bias, mean, rstd):
  """y = x * a + b: a = rstd * scale, b = bias - mean * a, each (B, C)."""
  c = scale.shape[-1]
  a = _to_channels(rstd, c) * scale
  return _materialize((a, bias - _to_channels(mean, c) * a))


def _group_norm_fwd(x, scale, bias, num_groups, epsilon, silu, dtype):
  xf = x.astype(jnp.float32)
  n = _gn_count(x, num_groups)
  s1, s2 = _sums(xf, xf * xf, tuple(range(1, x.ndim - 1)))
  mean = _to_groups(s1, num_groups) / n
  # E[x^2] - E[x]^2 clipped at 0, as flax's GroupNorm computes the variance.
  var = jnp.maximum(0.0, _to_groups(s2, num_groups) / n - jnp.square(mean))
  rstd = lax.rsqrt(var + epsilon)
  a, b = _gn_affine(scale, bias, mean, rstd)
  y = xf * _bcast(a, x) + _bcast(b, x)
  if silu:
    y = nn.silu(y)
  return y.astype(dtype or jnp.result_type(x, scale)), (x, scale, bias, mean, rstd)


def _group_norm_bwd(num_groups, epsilon, silu, dtype, res, dy):
  # With xhat = (x - mean) rstd and dxhat = dz * scale, the GroupNorm gradient is
  # dx = rstd (dxhat - m1 - xhat m2), m1, m2 the group means of dxhat and dxhat * xhat.
  # Every group quantity follows from T0 = sum_hw dz and T1 = sum_hw dz x per (B, C):
  # sum_hw dz xhat = rstd (T1 - mean T0) =: U, dbias = sum_B T0, dscale = sum_B U, and dx is
  # dz * a + x * cx + c0 with per-(B, C) coefficients.
  del epsilon, dtype
  x, scale, bias, mean, rstd = res
  c, g = x.shape[-1], num_groups
  xf = x.astype(jnp.float32)
  a, b = _gn_affine(scale, bias, mean, rstd)
  dz = dy.astype(jnp.float32)
  if silu:
    z = xf * _bcast(a, x) + _bcast(b, x)
    s = jax.nn.sigmoid(z)
    dz = dz * (s * (1.0 + z * (1.0 - s)))
  t0, t1 = _sums(dz, dz * xf, tuple(range(1, x.ndim - 1)))
  u = _to_channels(rstd, c) * (t1 - _to_channels(mean, c) * t0)
  dbias, dscale = t0.sum(0), u.sum(0)
  n = _gn_count(x, g)
  m1 = _to_groups(t0 * scale, g) / n
  m2 = _to_groups(u * scale, g) / n
  cx = -jnp.square(rstd) * m2
  c0 = -rstd * m1 - mean * cx
  cx, c0 = _materialize((_to_channels(cx, c), _to_channels(c0, c)))
  dx = dz * _bcast(a, x) + xf * _bcast(cx, x) + _bcast(c0, x)
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
  """``flax.linen.GroupNorm`` (same parameters, epsilon and float32 statistics) with an
  optional fused SiLU and a hand-written gradient (fewer passes over the activations)."""

  num_groups: int
  silu: bool = False
  epsilon: float = 1e-6
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f'GroupNorm: {self.num_groups} groups do not divide {c} channels '
                       '(model.num_groups must divide every width of the network).')
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    return group_norm(x, scale, bias, self.num_groups, self.epsilon, self.silu, self.dtype)


def norm_act(num_groups, dtype, silu=True):
  if FUSED_GN:
    return GroupNorm(num_groups, silu=silu, dtype=dtype)
  gn = nn.GroupNorm(num_groups, dtype=dtype)
  return (lambda x: nn.silu(gn(x))) if silu else gn


def conv1x1(features, dtype):
  if POINTWISE_DOT:
    return nn.Conv(features, (1, 1), dtype=dtype, conv_general_dilated=pointwise_conv)
  return nn.Conv(features, (1, 1), dtype=dtype)


def upsample_nearest(h, hw):
  if REPEAT_UPSAMPLE and hw[0] % h.shape[1] == 0 and hw[1] % h.shape[2] == 0:
    fh, fw = hw[0] // h.shape[1], hw[1] // h.shape[2]
    b, hh, ww, c = h.shape
    h = jnp.broadcast_to(h[:, :, None, :, None, :], (b, hh, fh, ww, fw, c))
    return h.reshape(b, hh * fh, ww * fw, c)
  return jax.image.resize(h, (h.shape[0], hw[0], hw[1], h.shape[-1]), 'nearest')


class Dropout(nn.Module):
  """Inverted dropout whose mask bits come from XLA's RngBitGenerator.

  Same distribution as ``nn.Dropout`` (keep each unit with probability 1 - rate, scale by
  1 / (1 - rate)), another random stream: the key of the 'dropout' collection is rewrapped
  as an 'rbg' key, so the bits are one RngBitGenerator op instead of an unrolled threefry
  hash per block (``benchmarks/compile_time.py --plain-layers`` compares compile times with
  ``nn.Dropout``); the mask is the same under any data-parallel sharding (test).
  """
  rate: float
  deterministic: bool = False

  @nn.compact
  def __call__(self, x):
    if self.deterministic or self.rate == 0.0:
      return x
    if not RBG_DROPOUT:
      return nn.Dropout(self.rate, deterministic=False)(x)
    data = jax.random.key_data(self.make_rng('dropout')).reshape(-1).astype(jnp.uint32)
    if data.shape[0] < 4:  # threefry (2 words): spread to rbg's 4 words
      data = jnp.concatenate([data, data ^ jnp.uint32(0x9E3779B9)])
    key = jax.random.wrap_key_data(data[:4], impl='rbg')
    keep = jax.random.bernoulli(key, 1.0 - self.rate, x.shape)
    return jnp.where(keep, x / (1.0 - self.rate), 0.0).astype(x.dtype)


class ResBlock(nn.Module):
  out_ch: int
  num_groups: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, emb, train: bool):
    h = norm_act(self.num_groups, self.dtype)(x)
    h = conv3x3(self.out_ch, self.dtype)(h)
    h = h + nn.Dense(self.out_ch, dtype=self.dtype)(nn.silu(emb))[:, None, None, :]
    h = norm_act(self.num_groups, self.dtype)(h)
    h = Dropout(self.dropout, deterministic=not train)(h)
    # Zero-initialized last conv: every block starts as the identity (as in DDPM).
    h = conv3x3(self.out_ch, self.dtype, kernel_init=nn.initializers.zeros)(h)
    if x.shape[-1] != self.out_ch:
      x = conv1x1(self.out_ch, self.dtype)(x)
    return x + h


class AttnBlock(nn.Module):
  num_heads: int
  num_groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = norm_act(self.num_groups, self.dtype, silu=False)(x).reshape(b, h * w, c)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        out_kernel_init=nn.initializers.zeros)(y, y)
    return x + y.reshape(b, h, w, c)


class UNet(nn.Module):
  """eps_theta(x_t, t, y). See the module docstring for the layout.

  ``zero_init_out``: the output convolution starts at zero (an eps-network starts at
  eps = 0). An energy E = ||f||^2 / (2 sigma) must not: at f = 0 its input-Jacobian is 0
  too, so eps = sigma J^T f / sigma and every parameter gradient vanish, and training never
  leaves the start (``build_net`` turns it off for the energy parameterization).
  """

  ch: int = 64
  ch_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 2
  attn_levels: Sequence[int] = (2,)
  num_heads: int = 1
  num_groups: int = 8
  dropout: float = 0.1
  num_classes: int = 0
  dtype: Any = jnp.float32
  zero_init_out: bool = True

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

    h = conv3x3(self.ch, self.dtype)(x.astype(self.dtype))
    skips = [h]
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = block(self.ch * mult)(h, emb, train)
        if level in self.attn_levels:
          h = attn()(h)
        skips.append(h)
      if level != len(self.ch_mult) - 1:
        h = conv3x3(h.shape[-1], self.dtype, strides=2)(h)
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
        h = upsample_nearest(h, target[1:3])
        h = conv3x3(h.shape[-1], self.dtype)(h)
    assert not skips

    h = norm_act(self.num_groups, self.dtype)(h)
    out_init = {'kernel_init': nn.initializers.zeros} if self.zero_init_out else {}
    h = conv3x3(out_channels, self.dtype, **out_init)(h)
    return h.astype(jnp.float32)
