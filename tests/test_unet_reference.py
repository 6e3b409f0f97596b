"""The whole UNet against a second implementation of its architecture.

``reference_unet`` is written from the architecture (the module docstring of
cdiff_jax/models/unet.py and its PyTorch port in benchmarks/torch_reference.py) with plain
jax.numpy / lax primitives in float64: explicit GroupNorm, softmax attention, nearest
upsampling by index, 'SAME' paddings worked out by hand. It reads the Flax parameter tree
by name only (submodules in creation order, as the PyTorch port loads them), so every
wiring choice -- where the time and class embeddings enter, the residuals and shortcuts,
which skip meets which up block, upsample-then-conv, the final norm -- is checked against
an independent statement of it. Parameters are redrawn at random scales first: the
zero-initialized output and residual convolutions would otherwise hide most of the network.
The network under test runs with float32 matmul precision pinned (``_f32_matmuls``): on
GPUs and TPUs XLA's default is TF32 / bfloat16 passes, ~1e-3 relative, which the 1e-4
tolerance here would flag; on CPU the pin changes nothing.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cdiff_jax import config as config_lib
from cdiff_jax import schedules
from cdiff_jax.models import ScoreModel, UNet, build_net, unet

_HI = lax.Precision.HIGHEST
EPS_GN = 1e-6   # flax GroupNorm's epsilon, kept by the model's GroupNorm


class _Scope:
  """A module's parameter sub-tree, handing out its children in creation order per kind
  (``Conv_0``, ``Conv_1``, ...), and checking at the end that every child was used."""

  def __init__(self, tree):
    self.tree, self.counts, self.used = tree, {}, set()

  def next(self, kind):
    i = self.counts.get(kind, 0)
    self.counts[kind] = i + 1
    name = f'{kind}_{i}'
    self.used.add(name)
    return self.tree[name]

  def child(self, kind):
    return _Scope(self.next(kind))

  def check_all_used(self):
    assert self.used == set(self.tree), sorted(set(self.tree) - self.used)


@pytest.fixture(autouse=True)
def _f32_matmuls():
  with jax.default_matmul_precision('float32'):
    yield


def _silu(x):
  return x / (1.0 + jnp.exp(-x))


def _dense(p, x):
  return jnp.dot(x, p['kernel'], precision=_HI) + p['bias']


def _same_pads(n, k, s):
  out = -(-n // s)
  total = max((out - 1) * s + k - n, 0)
  return total // 2, total - total // 2


def _conv(p, x, stride=1):
  w = p['kernel']
  pads = [_same_pads(n, k, stride) for n, k in zip(x.shape[1:3], w.shape[:2])]
  y = lax.conv_general_dilated(x, w, (stride, stride), pads,
                               dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=_HI)
  return y + p['bias']


def _group_norm(p, x, groups):
  b, h, w, c = x.shape
  xg = x.reshape(b, h, w, groups, c // groups)
  mean = xg.mean((1, 2, 4), keepdims=True)
  var = ((xg - mean) ** 2).mean((1, 2, 4), keepdims=True)
  return ((xg - mean) / jnp.sqrt(var + EPS_GN)).reshape(x.shape) * p['scale'] + p['bias']


def _upsample_nearest(x, hw):
  """Nearest resize to ``hw``: output pixel i reads input pixel floor((i + 1/2) in / out)
  (pixel centers, PyTorch's 'nearest-exact'); a whole factor is plain repetition."""
  for axis, out in zip((1, 2), hw):
    n = x.shape[axis]
    if out % n == 0:
      x = jnp.repeat(x, out // n, axis=axis)
    else:
      x = jnp.take(x, np.floor((np.arange(out) + 0.5) * n / out).astype(int), axis=axis)
  return x


def _res_block(scope, x, emb, out_ch, groups):
  p = scope.child('ResBlock')
  h = _conv(p.next('Conv'), _silu(_group_norm(p.next('GroupNorm'), x, groups)))
  h = h + _dense(p.next('Dense'), _silu(emb))[:, None, None, :]
  h = _silu(_group_norm(p.next('GroupNorm'), h, groups))   # (dropout: identity in eval)
  h = _conv(p.next('Conv'), h)
  if x.shape[-1] != out_ch:
    x = _conv(p.next('Conv'), x)   # 1x1 shortcut
  p.check_all_used()
  return x + h


def _attn_block(scope, x, heads, groups):
  p = scope.child('AttnBlock')
  b, hh, ww, c = x.shape
  y = _group_norm(p.next('GroupNorm'), x, groups).reshape(b, hh * ww, c)
  m = p.next('MultiHeadDotProductAttention')
  q, k, v = (jnp.einsum('blc,chd->blhd', y, m[n]['kernel'], precision=_HI) + m[n]['bias']
             for n in ('query', 'key', 'value'))
  assert q.shape[2] == heads
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, precision=_HI) / math.sqrt(q.shape[-1])
  weights = jnp.exp(logits - logits.max(-1, keepdims=True))
  weights = weights / weights.sum(-1, keepdims=True)
  o = jnp.einsum('bhqk,bkhd->bqhd', weights, v, precision=_HI)
  out = jnp.einsum('bqhd,hdc->bqc', o, m['out']['kernel'], precision=_HI) + m['out']['bias']
  p.check_all_used()
  return x + out.reshape(b, hh, ww, c)


def reference_unet(params, x, t, y, *, ch, ch_mult, num_res_blocks, attn_levels,
                   num_heads, num_groups, num_classes):
  """eps(x, t, y) of the documented architecture, from the Flax parameter tree; ``y``: the
  labels of a class-conditional network (``num_classes`` is the null class), else None."""
  top = _Scope(params)
  half = ch // 2
  freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
  args = 1000.0 * t[:, None] * freqs[None]
  temb = jnp.concatenate([jnp.sin(args), jnp.cos(args)] +
                         ([jnp.zeros((t.shape[0], 1))] if ch % 2 else []), axis=-1)
  emb = _dense(top.next('Dense'), temb)
  emb = _dense(top.next('Dense'), _silu(emb))
  if num_classes:
    emb = emb + top.next('Embed')['embedding'][y]

  block = lambda h, c: _res_block(top, h, emb, c, num_groups)
  attn = lambda h: _attn_block(top, h, num_heads, num_groups)
  h = _conv(top.next('Conv'), x)
  skips = [h]
  for level, mult in enumerate(ch_mult):
    for _ in range(num_res_blocks):
      h = block(h, ch * mult)
      if level in attn_levels:
        h = attn(h)
      skips.append(h)
    if level < len(ch_mult) - 1:
      h = _conv(top.next('Conv'), h, stride=2)
      skips.append(h)
  c_mid = h.shape[-1]
  h = block(attn(block(h, c_mid)), c_mid)
  for level in reversed(range(len(ch_mult))):
    for _ in range(num_res_blocks + 1):
      h = block(jnp.concatenate([h, skips.pop()], axis=-1), ch * ch_mult[level])
      if level in attn_levels:
        h = attn(h)
    if level > 0:
      h = _conv(top.next('Conv'), _upsample_nearest(h, skips[-1].shape[1:3]))
  assert not skips
  out = _conv(top.next('Conv'), _silu(_group_norm(top.next('GroupNorm'), h, num_groups)))
  top.check_all_used()
  return out


ARCH_FIELDS = ('ch', 'ch_mult', 'num_res_blocks', 'attn_levels', 'num_heads', 'num_groups',
               'num_classes')
# Every program here runs once on tiny inputs: compiled without XLA:CPU's backend
# optimizations (as parallel.run_once does for initializers), well under half the compile
# time; same values up to float rounding.
_FAST = ({'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
         if jax.default_backend() == 'cpu' else None)


def _reference_vjp(params, x, t, y, cotangent, **arch):
  """(d params, d x) of <cotangent, reference_unet(params, x, t, y)>."""
  _, pull = jax.vjp(lambda p, x: reference_unet(p, x, t, y, **arch), params, x)
  return pull(cotangent)


_REFERENCE = jax.jit(reference_unet, static_argnames=ARCH_FIELDS, compiler_options=_FAST)
_REFERENCE_VJP = jax.jit(_reference_vjp, static_argnames=ARCH_FIELDS, compiler_options=_FAST)


def _in_float64(fn, *args, **arch):
  """fn(*args) with 64-bit floats enabled and every float argument cast to float64."""
  cast = lambda a: np.asarray(a, np.float64 if jnp.issubdtype(a.dtype, jnp.floating) else None)
  with jax.enable_x64(True):
    return jax.tree.map(np.asarray, fn(*jax.tree.map(cast, args), **arch))


def _fast_jit(fn):
  return jax.jit(fn, compiler_options=_FAST)


def _random_params(net, seed, *args):
  """The network's parameter tree (shapes by abstract evaluation: no initializer runs) with
  every leaf drawn at random: kernels N(0, 1/fan_in), biases N(0, 0.3^2), norm scales
  1 + N(0, 0.3^2), class embeddings N(0, 1). Activations stay O(1) and no branch is zero
  (the zero-initialized output and residual convolutions would hide most of the network)."""
  shapes = jax.eval_shape(net.init, jax.random.key(0), *args)['params']
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    names = [p.key for p in path]
    z = rng.standard_normal(leaf.shape).astype(np.float32)
    if names[-1] == 'kernel':
      qkv = names[-2] in ('query', 'key', 'value')   # (in, heads, head_dim)
      fan_in = leaf.shape[0] if qkv else math.prod(leaf.shape[:-1])
      return z / np.float32(math.sqrt(fan_in))
    if names[-1] == 'scale':
      return 1 + np.float32(0.3) * z
    if names[-1] == 'bias':
      return np.float32(0.3) * z
    assert names[-1] == 'embedding', names
    return z
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _inputs(size, channels, num_classes, seed=0):
  kx, ky = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (2, size, size, channels))
  t = jnp.array([0.27, 0.81])
  y = jax.random.randint(ky, (2,), 0, num_classes) if num_classes else None
  return x, t, y


def _assert_close(got, want, rel=1e-4):
  """float32 network against the float64 reference, to ``rel`` of the output's largest
  entry: float32 rounding (~1e-7) grows to ~1e-6 of it through the ~40 layers here; a wiring
  difference is O(1) of it."""
  got, want = np.asarray(got, np.float64), np.asarray(want)
  scale = np.abs(want).max()
  assert scale > 0.1, scale   # a comparison with an all-zero output would check nothing
  np.testing.assert_allclose(got, want, rtol=0, atol=rel * scale)


# (image size, channels, architecture): the digits default (8x8, two levels, attention at
# the lower one, one block per level); MNIST's (28x28, three levels, two blocks per level,
# asymmetric stride-2 'SAME' padding 28 -> 14); an odd size (7 -> 4, upsampled back by a
# non-integer factor) with attention at both levels and two heads; and, with flax's plain
# layers, a single level (no resampling) without attention outside the middle block.
CONFIGS = {
    'digits': (8, 1, dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(1,),
                          num_heads=1, num_groups=4)),
    'mnist': (28, 1, dict(ch=8, ch_mult=(1, 2, 2), num_res_blocks=2, attn_levels=(2,),
                          num_heads=1, num_groups=4)),
    'odd_size_two_heads': (7, 3, dict(ch=8, ch_mult=(1, 2), num_res_blocks=1,
                                      attn_levels=(0, 1), num_heads=2, num_groups=2)),
    'one_level_no_attn': (16, 2, dict(ch=8, ch_mult=(2,), num_res_blocks=2, attn_levels=(),
                                      num_heads=1, num_groups=8)),
}
DIGITS_CLASSES = 10


@pytest.mark.parametrize('name,num_classes,plain_layers', [
    ('digits', DIGITS_CLASSES, False), ('mnist', 0, False), ('odd_size_two_heads', 3, False),
    ('one_level_no_attn', 0, True)])
def test_unet_matches_the_reference(name, num_classes, plain_layers, monkeypatch):
  """The network in eval mode (its dropout 0.1 off) equals the reference for random
  parameters; a class-conditional one also for y=None, the null class ``num_classes``.
  ``plain_layers``: flax's nn.GroupNorm, 1x1 nn.Conv and jax.image.resize in the same wiring."""
  if plain_layers:
    for flag in ('FUSED_GN', 'POINTWISE_DOT', 'REPEAT_UPSAMPLE'):
      monkeypatch.setattr(unet, flag, False)
  size, channels, arch = CONFIGS[name]
  arch = dict(arch, num_classes=num_classes)
  net = UNet(**arch, dropout=0.1)
  x, t, y = _inputs(size, channels, num_classes)
  params = _random_params(net, 2, x, t, y)
  apply = _fast_jit(lambda p, x, t, y: net.apply({'params': p}, x, t, y))
  want = _in_float64(_REFERENCE, params, x, t, y, **arch)
  _assert_close(apply(params, x, t, y), want)
  if name == 'digits':
    null = jnp.full((2,), num_classes)
    want_null = _in_float64(_REFERENCE, params, x, t, null, **arch)
    _assert_close(apply(params, x, t, None), want_null)
    assert not np.allclose(want, want_null, atol=1e-2)   # the labels matter here


def test_unet_gradients_match_the_reference():
  """Input and parameter gradients of <w, net(x)>, through the hand-written GroupNorm and
  (under loop_friendly_conv_grads) convolution VJPs, equal those of the reference."""
  size, channels, arch = CONFIGS['digits']
  arch = dict(arch, num_classes=DIGITS_CLASSES)
  net = UNet(**arch, dropout=0.1)
  x, t, y = _inputs(size, channels, DIGITS_CLASSES)
  params = _random_params(net, 4, x, t, y)
  w = jax.random.normal(jax.random.key(5), x.shape)
  with unet.loop_friendly_conv_grads():
    gp, gx = _fast_jit(jax.grad(lambda p, x: jnp.sum(w * net.apply({'params': p}, x, t, y)),
                                (0, 1)))(params, x)
  want_p, want_x = _in_float64(_REFERENCE_VJP, params, x, t, y, w, **arch)
  _assert_close(gx, want_x)
  # Each parameter's gradient to 2e-4 of its own largest entry (floored at 1e-3 of the
  # largest of all, for the few nearly-zero ones).
  flat = jax.tree_util.tree_flatten_with_path(want_p)[0]
  top = max(np.abs(v).max() for _, v in flat)
  assert jax.tree.structure(gp) == jax.tree.structure(want_p)
  for (path, want), got in zip(flat, jax.tree.leaves(gp)):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0,
                               atol=2e-4 * max(np.abs(want).max(), 1e-3 * top),
                               err_msg=jax.tree_util.keystr(path))


def test_energy_parameterization_eps_matches_the_reference():
  """The energy model from a model config (build_net): eps = sigma grad_x E with
  E = ||f||^2 / (2 sigma), f the reference network -- at its own initialization (which must
  not start at f = 0, where every gradient vanishes) and at random parameters."""
  size, channels, arch = CONFIGS['digits']
  c = config_lib.base_config().model
  c.update(parameterization='energy', dropout=0.1, **arch)
  sched = schedules.VPSchedule()
  model = ScoreModel(build_net(c, num_classes=DIGITS_CLASSES), sched, 'energy')
  arch = dict(arch, num_classes=DIGITS_CLASSES)
  x, t, y = _inputs(size, channels, DIGITS_CLASSES)
  sigma = np.asarray(sched.sigma(t), np.float64)[:, None, None, None]
  eps = _fast_jit(model.eps)
  for params in (_fast_jit(model.init)(jax.random.key(1), x, t, y),
                 _random_params(model.net, 6, x, t, y)):
    f = _in_float64(_REFERENCE, params, x, t, y, **arch)
    assert np.abs(f).max() > 0.1
    _, grad_x = _in_float64(_REFERENCE_VJP, params, x, t, y, f / sigma, **arch)
    _assert_close(eps(params, x, t, y), sigma * grad_x)


@pytest.mark.parametrize('name,num_classes', [('digits', DIGITS_CLASSES), ('mnist', 0)])
def test_bfloat16_unet_matches_the_reference_to_bfloat16_rounding(name, num_classes):
  """``dtype=bfloat16`` (``model.dtype``): the same parameters (float32) give the float64
  reference's output to bfloat16 accuracy, returned in float32. bfloat16 keeps 8 bits
  (relative rounding 2^-9 = 2e-3); through the ~40 layers here the error observed is ~1% of
  the largest output entry (max) and ~0.6-1.2% (root mean square), against ~1e-6 in
  float32. The bounds, 3% and 2%, sit at about 2-3x that: the time embedding computed from
  a bfloat16 t (4-18% here) or GroupNorm's statistics summed in bfloat16 (25% at 28x28)
  exceed them, as would any wiring difference (O(1)). (flax's softmax runs in the compute
  dtype; forcing it to float32 changed these errors by under 0.2% of the output.)"""
  size, channels, arch = CONFIGS[name]
  arch = dict(arch, num_classes=num_classes)
  x, t, y = _inputs(size, channels, num_classes)
  net = UNet(**arch, dropout=0.1, dtype=jnp.bfloat16)
  params = _random_params(net, 2, x, t, y)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  got = _fast_jit(lambda p, x, t, y: net.apply({'params': p}, x, t, y))(params, x, t, y)
  assert got.dtype == jnp.float32
  want = _in_float64(_REFERENCE, params, x, t, y, **arch)
  err = np.asarray(got, np.float64) - want
  max_err = np.abs(err).max() / np.abs(want).max()
  rms_err = np.sqrt(np.mean(err ** 2) / np.mean(want ** 2))
  assert max_err < 3e-2 and rms_err < 2e-2, (max_err, rms_err)
  # It does compute in bfloat16: float32 rounding alone is ~1e-6.
  assert rms_err > 1e-3, rms_err
