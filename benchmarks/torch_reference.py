"""PyTorch reference of the benchmarks: the UNet, DSM train step and DDIM sampler of cdiff_jax.

This file needs only ``torch`` and ``numpy`` (no JAX), so it runs in a separate Python
whose torch is a CPU build (see ``make bench``), or on a GPU (``device='cuda'``, the
benchmarks' ``--torch-device cuda``: float32 in TF32 as XLA does there, and bfloat16
autocast for ``model.dtype='bfloat16'``). It is a faithful port, not a lookalike:

* the same layers in the same order (GroupNorm with eps 1e-6, SiLU, 3x3 convs with XLA's
  SAME padding, zero-initialized output convs, multi-head attention with q/k/v/out
  projections, nearest resize to the skip's exact shape), and submodules named after the
  Flax modules (``Conv_0``, ``ResBlock_3``...), so the Flax parameters load one to one and
  the benchmark can check that both networks compute the same function;
* the same loss (eps-prediction DSM, DDPM linear betas, stratified grid times), optimizer
  (gradient clipping by global norm, then AdamW) and EMA update.

It runs in two ways: imported (``Reference``), or as a worker process that answers one JSON
request per line on stdin (``python torch_reference.py --serve``), which is how the
benchmarks time PyTorch interleaved with JAX in one run.
"""

from __future__ import annotations

import json
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

GN_EPS = 1e-6  # flax.linen.GroupNorm's default epsilon


def timestep_embedding(t, dim: int, scale: float = 1000.0, max_period: float = 10000.0):
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                            device=t.device) / half)
  args = (scale * t.float())[:, None] * freqs[None]
  emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
  if dim % 2:
    emb = F.pad(emb, (0, 1))
  return emb


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """(low, high) padding of XLA's 'SAME' convolution along one axis."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


class Conv(nn.Conv2d):
  """3x3 (or 1x1) convolution with XLA 'SAME' padding; asymmetric padding done explicitly."""

  def __init__(self, cin, cout, kernel=3, stride=1):
    super().__init__(cin, cout, kernel, stride=stride, padding=0)
    self.k, self.s = kernel, stride

  def forward(self, x):
    ph, pw = same_padding(x.shape[-2], self.k, self.s), same_padding(x.shape[-1], self.k, self.s)
    if ph[0] == ph[1] and pw[0] == pw[1]:
      return F.conv2d(x, self.weight, self.bias, self.s, (ph[0], pw[0]))
    return F.conv2d(F.pad(x, (pw[0], pw[1], ph[0], ph[1])), self.weight, self.bias, self.s)


class Named(nn.Module):
  """Creates submodules named like Flax's auto-names (``Conv_0``, ``Conv_1``, ...)."""

  def __init__(self):
    super().__init__()
    self._counts = {}

  def add(self, kind: str, module: nn.Module | None, alias: str = '') -> nn.Module | None:
    """Registers ``module`` under its Flax name only; ``alias`` is a plain reference."""
    if module is not None:
      i = self._counts.get(kind, 0)
      self._counts[kind] = i + 1
      self.add_module(f'{kind}_{i}', module)
    if alias:
      self.__dict__[alias] = module
    return module


class ResBlock(Named):

  def __init__(self, cin, cout, emb_dim, num_groups, dropout):
    super().__init__()
    self.add('GroupNorm', nn.GroupNorm(num_groups, cin, eps=GN_EPS), 'norm1')
    self.add('Conv', Conv(cin, cout), 'conv1')
    self.add('Dense', nn.Linear(emb_dim, cout), 'temb')
    self.add('GroupNorm', nn.GroupNorm(num_groups, cout, eps=GN_EPS), 'norm2')
    self.drop = nn.Dropout(dropout)
    self.add('Conv', Conv(cout, cout), 'conv2')
    nn.init.zeros_(self.conv2.weight)
    self.add('Conv', Conv(cin, cout, 1) if cin != cout else None, 'skip')

  def forward(self, x, emb):
    h = self.conv1(F.silu(self.norm1(x)))
    h = h + self.temb(F.silu(emb))[:, :, None, None]
    h = self.conv2(self.drop(F.silu(self.norm2(h))))
    return (x if self.skip is None else self.skip(x)) + h


class Attention(nn.Module):
  """flax.linen.MultiHeadDotProductAttention(num_heads) on (B, L, C)."""

  def __init__(self, c, num_heads):
    super().__init__()
    self.heads = num_heads
    self.query, self.key, self.value, self.out = (nn.Linear(c, c) for _ in range(4))
    nn.init.zeros_(self.out.weight)

  def forward(self, x):
    b, l, c = x.shape
    split = lambda y: y.view(b, l, self.heads, c // self.heads).transpose(1, 2)
    y = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)),
                                       split(self.value(x)))
    return self.out(y.transpose(1, 2).reshape(b, l, c))


class AttnBlock(Named):

  def __init__(self, c, num_heads, num_groups):
    super().__init__()
    self.add('GroupNorm', nn.GroupNorm(num_groups, c, eps=GN_EPS), 'norm')
    self.add('MultiHeadDotProductAttention', Attention(c, num_heads), 'attn')

  def forward(self, x):
    b, c, h, w = x.shape
    y = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
    y = self.attn(y)
    return x + y.transpose(1, 2).reshape(b, c, h, w)


class UNet(Named):
  """cdiff_jax.models.UNet in PyTorch (NCHW tensors; same fields and defaults)."""

  def __init__(self, in_ch, ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_levels=(2,),
               num_heads=1, num_groups=8, dropout=0.1, num_classes=0):
    super().__init__()
    self.ch, self.ch_mult, self.nrb = ch, tuple(ch_mult), num_res_blocks
    self.attn_levels, self.num_classes = tuple(attn_levels), num_classes
    emb = 4 * ch
    self.add('Dense', nn.Linear(ch, emb), 'temb0')
    self.add('Dense', nn.Linear(emb, emb), 'temb1')
    self.add('Embed', nn.Embedding(num_classes + 1, emb) if num_classes else None, 'cemb')
    block = lambda cin, cout: self.add('ResBlock', ResBlock(cin, cout, emb, num_groups, dropout))
    attn = lambda c: self.add('AttnBlock', AttnBlock(c, num_heads, num_groups))
    # Plain lists of references in forward order (the modules are registered by add).
    self.add('Conv', Conv(in_ch, ch), 'conv_in')
    self.down, self.up, skip_ch, c = [], [], [ch], ch
    for level, mult in enumerate(ch_mult):
      for _ in range(num_res_blocks):
        mods = [block(c, ch * mult)]
        c = ch * mult
        if level in attn_levels:
          mods.append(attn(c))
        self.down.append(mods)
        skip_ch.append(c)
      if level != len(ch_mult) - 1:
        self.down.append([self.add('Conv', Conv(c, c, 3, 2))])
        skip_ch.append(c)
    self.mid = [block(c, c), attn(c), block(c, c)]
    for level in reversed(range(len(ch_mult))):
      for _ in range(num_res_blocks + 1):
        mods = [block(c + skip_ch.pop(), ch * ch_mult[level])]
        c = ch * ch_mult[level]
        if level in attn_levels:
          mods.append(attn(c))
        self.up.append(mods)
      if level != 0:
        self.up.append([self.add('Conv', Conv(c, c))])
    self.add('GroupNorm', nn.GroupNorm(num_groups, c, eps=GN_EPS), 'norm_out')
    self.add('Conv', Conv(c, in_ch), 'conv_out')
    nn.init.zeros_(self.conv_out.weight)

  def forward(self, x, t, y=None):
    emb = self.temb1(F.silu(self.temb0(timestep_embedding(t, self.ch))))
    if self.cemb is not None:
      if y is None:
        y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
      emb = emb + self.cemb(y)
    h = self.conv_in(x)
    skips = [h]
    for mods in self.down:
      if isinstance(mods[0], ResBlock):
        h = mods[0](h, emb)
        for m in mods[1:]:
          h = m(h)
      else:  # stride-2 downsampling conv
        h = mods[0](h)
      skips.append(h)
    h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
    for mods in self.up:
      if isinstance(mods[0], ResBlock):
        h = mods[0](torch.cat([h, skips.pop()], dim=1), emb)
        for m in mods[1:]:
          h = m(h)
      else:  # upsample to the next skip's exact size, then conv
        h = F.interpolate(h, size=skips[-1].shape[-2:], mode='nearest-exact')
        h = mods[0](h)
    return self.conv_out(F.silu(self.norm_out(h)))


def load_flax_params(model: nn.Module, flat: dict[str, np.ndarray]) -> None:
  """Copies Flax parameters ({'ResBlock_0/Conv_0/kernel': array, ...}) into ``model``."""
  by_flax = {}  # 'ResBlock_0/Conv_1' -> module

  def walk(mod, prefix):
    for name, child in mod.named_children():
      if '_' in name and name.rsplit('_', 1)[1].isdigit():
        path = f'{prefix}/{name}' if prefix else name
        by_flax[path] = child
        walk(child, path)
  walk(model, '')
  seen = set()
  with torch.no_grad():
    for key, value in flat.items():
      path, leaf = key.rsplit('/', 1)
      if path.endswith(('/query', '/key', '/value', '/out')):
        mha_path, proj = path.rsplit('/', 1)
        lin = getattr(by_flax[mha_path], proj)
        c = lin.weight.shape[0]
        if leaf == 'kernel':
          w = value.reshape(-1, c) if proj == 'out' else value.reshape(c, -1)
          lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
        else:
          lin.bias.copy_(torch.from_numpy(value.reshape(-1)))
        seen.add(id(lin.weight) if leaf == 'kernel' else id(lin.bias))
        continue
      mod = by_flax[path]
      if isinstance(mod, nn.Conv2d):
        target = mod.weight if leaf == 'kernel' else mod.bias
        v = value.transpose(3, 2, 0, 1) if leaf == 'kernel' else value  # HWIO -> OIHW
      elif isinstance(mod, nn.Linear):
        target = mod.weight if leaf == 'kernel' else mod.bias
        v = value.T if leaf == 'kernel' else value
      elif isinstance(mod, nn.GroupNorm):
        target = mod.weight if leaf == 'scale' else mod.bias
        v = value
      elif isinstance(mod, nn.Embedding):
        target, v = mod.weight, value
      else:
        raise KeyError(f'no PyTorch parameter for Flax parameter {key}')
      if tuple(target.shape) != v.shape:
        raise ValueError(f'{key}: Flax shape {value.shape} vs PyTorch {tuple(target.shape)}')
      target.copy_(torch.from_numpy(np.ascontiguousarray(v)))
      seen.add(id(target))
  missing = [n for n, p in model.named_parameters() if id(p) not in seen]
  if missing:
    raise ValueError(f'PyTorch parameters without a Flax value: {missing}')


class DDPM:
  """Discrete DDPM schedule at grid times t_i = i / T (linear betas)."""

  def __init__(self, num_steps=1000, beta_start=1e-4, beta_end=0.02, device='cpu'):
    self.T = num_steps
    self.device = device
    betas = np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    log_ab = np.concatenate([[0.0], np.cumsum(np.log1p(-betas))]).astype(np.float32)
    alpha, sigma = np.exp(0.5 * log_ab), np.sqrt(-np.expm1(log_ab)).astype(np.float32)
    self.alpha = torch.from_numpy(alpha).to(device)                   # index i = 0..T
    self.sigma = torch.from_numpy(sigma).to(device)
    # The sampler's Python floats (no device sync per step).
    self.alpha_host, self.sigma_host = alpha.tolist(), sigma.tolist()

  def sample_t(self, n):
    """Stratified (golden-ratio) grid times, as cdiff_jax.schedules.Schedule.sample_t."""
    u = torch.remainder(torch.rand((), device=self.device)
                        + torch.arange(n, dtype=torch.float32, device=self.device)
                        * 0.6180339887498949, 1.0)
    return torch.clamp(torch.floor(u * self.T).long(), max=self.T - 1) + 1

  def time_grid(self, num_steps):
    return np.linspace(self.T, 1, num_steps + 1).round().astype(np.int64)


def learning_rate(step: int, lr: float, warmup_steps: int = 0, total_steps: int = 1,
                  lr_schedule: str = 'constant', final_lr_fraction: float = 0.0) -> float:
  """cdiff_jax.optim.learning_rate_schedule at ``step``: a linear warm-up from 0, then
  constant or a cosine decay to ``final_lr_fraction * lr`` at ``total_steps``."""
  warmup = min(warmup_steps, max(total_steps - 1, 0))
  if step < warmup:
    return lr * step / warmup
  if lr_schedule == 'constant':
    return lr
  decay_steps = max(total_steps - warmup, 1)
  cosine = 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, decay_steps) / decay_steps))
  return lr * ((1.0 - final_lr_fraction) * cosine + final_lr_fraction)


class Reference:
  """One model with its optimizer, train step and DDIM sampler."""

  def __init__(self, model: dict, image_shape, batch_size: int, optim: dict,
               ema_decay: float = 0.999, diffusion: dict | None = None, seed: int = 0,
               channels_last: bool = False, threads: int = 0, params_npz: str = '',
               device: str = 'cpu', autocast: str = ''):
    if threads:
      torch.set_num_threads(threads)
    torch.manual_seed(seed)
    self.device = torch.device(device)
    if self.device.type == 'cuda':
      # float32 matmuls and convolutions in TF32, as XLA computes them on GPUs by default.
      torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    # autocast='bfloat16': mixed precision as cdiff_jax's model.dtype='bfloat16' (float32
    # parameters and optimizer, bfloat16 matmuls and convolutions).
    self.autocast = getattr(torch, autocast) if autocast else None
    h, w, c = image_shape
    self.net = UNet(c, **model)
    if params_npz:
      with np.load(params_npz) as f:
        load_flax_params(self.net, dict(f))
    self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
    self.net = self.net.to(self.device, memory_format=self.memory_format)
    self.sched = DDPM(**(diffusion or {}), device=self.device)
    self.params = [p for p in self.net.parameters()]
    self.ema = [p.detach().clone() for p in self.params]
    self.ema_decay = ema_decay
    self.grad_clip = optim.get('grad_clip', 1.0)
    # The learning rate of each step, as cdiff_jax's schedule (warm-up, cosine decay).
    self.lr_schedule = {k: optim[k] for k in ('warmup_steps', 'total_steps', 'lr_schedule',
                                              'final_lr_fraction') if k in optim}
    self.lr = optim.get('lr', 2e-3)
    self.opt = torch.optim.AdamW(self.params, lr=self.lr,
                                 betas=(optim.get('b1', 0.9), optim.get('b2', 0.999)),
                                 eps=optim.get('eps', 1e-8),
                                 weight_decay=optim.get('weight_decay', 0.0),
                                 foreach=True)
    self.x0 = torch.rand(batch_size, c, h, w, device=self.device).mul(2).sub(1).contiguous(
        memory_format=self.memory_format)
    self.step_count = 0

  def num_params(self) -> int:
    return sum(p.numel() for p in self.params)

  def train_step(self):
    x0, n = self.x0, self.x0.shape[0]
    i = self.sched.sample_t(n)
    eps = torch.randn_like(x0)
    a, s = self.sched.alpha[i].view(-1, 1, 1, 1), self.sched.sigma[i].view(-1, 1, 1, 1)
    with self._autocast():
      eps_hat = self.net(a * x0 + s * eps, i.float() / self.sched.T)
    loss = torch.square(eps_hat.float() - eps).mean()
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    if self.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
    for group in self.opt.param_groups:
      group['lr'] = learning_rate(self.step_count, self.lr, **self.lr_schedule)
    self.opt.step()
    with torch.no_grad():
      d = min(self.ema_decay, (1.0 + self.step_count) / (10.0 + self.step_count))
      torch._foreach_lerp_(self.ema, self.params, 1.0 - d)
    self.step_count += 1
    return loss

  def _autocast(self):
    return torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None)

  def train(self, steps: int) -> float:
    self.net.train()
    start = time.perf_counter()
    for _ in range(steps):
      loss = self.train_step()
    loss.item()
    return time.perf_counter() - start

  @torch.inference_mode()
  def ddim(self, n: int, num_steps: int = 100, clip: float = 1.0) -> torch.Tensor:
    """DDIM (eta=0) with x0 clipping and the final denoising step, as cdiff_jax's Sampler."""
    self.net.eval()
    c, h, w = self.x0.shape[1:]
    x = torch.randn(n, c, h, w, device=self.device).contiguous(memory_format=self.memory_format)
    grid = self.sched.time_grid(num_steps)
    al, sg, T = self.sched.alpha_host, self.sched.sigma_host, self.sched.T

    def net(x, i):
      with self._autocast():
        return self.net(x, torch.full((n,), i / T, device=self.device)).float()
    for k in range(num_steps):
      i, j = int(grid[k]), int(grid[k + 1])
      eps = net(x, i)
      x0 = torch.clamp((x - sg[i] * eps) / al[i], -clip, clip)
      eps = (x - al[i] * x0) / sg[i]
      x = al[j] * x0 + sg[j] * eps
    i = int(grid[-1])
    eps = net(x, i)
    return torch.clamp((x - sg[i] * eps) / al[i], -clip, clip).cpu()  # .cpu(): waits

  @torch.inference_mode()
  def forward(self, x_nhwc: np.ndarray, t: np.ndarray) -> np.ndarray:
    self.net.eval()
    x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))).to(self.device)
    with self._autocast():
      out = self.net(x.contiguous(memory_format=self.memory_format),
                     torch.from_numpy(t).to(self.device))
    return out.float().permute(0, 2, 3, 1).contiguous().cpu().numpy()


def matmul_flops_per_sec(n: int = 2048, repeats: int = 10, device: str = 'cpu',
                         warmup: int = 3) -> float:
  """As ``common.jax_matmul_flops_per_sec``: the fastest of ``repeats`` products after
  ``warmup`` untimed ones."""
  a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
  cuda = torch.device(device).type == 'cuda'
  if cuda:  # TF32, as XLA's float32 dot on GPUs and the Reference's model (its __init__)
    torch.backends.cuda.matmul.allow_tf32 = True
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  for _ in range(warmup):
    a @ b
  sync()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    a @ b
    sync()
    times.append(time.perf_counter() - start)
  return 2 * n ** 3 / min(times)


def conv_times(spec: dict, calls: int = 5, repeats: int = 5) -> dict:
  """Median seconds of a 3x3 convolution (``spec`` as in benchmarks/conv_layers.py: NHWC
  input shape, HWIO kernel shape, stride, (lo, hi) padding per spatial dim) in channels-last
  PyTorch: forward, input gradient and kernel(+bias) gradient."""
  n, h, w, c_in = spec['x']
  c_out, stride = spec['w'][-1], spec['stride']
  (top, bottom), (left, right) = spec['padding']
  x = torch.randn(n, c_in, h, w)
  pad = [top, left]
  if top != bottom or left != right:  # asymmetric: pad the input beforehand (untimed)
    x, pad = F.pad(x, (left, right, top, bottom)), [0, 0]
  x = x.contiguous(memory_format=torch.channels_last)
  k = torch.randn(c_out, c_in, 3, 3).contiguous(memory_format=torch.channels_last)
  g = torch.randn_like(F.conv2d(x, k, stride=stride, padding=pad))

  def backward(mask):
    return torch.ops.aten.convolution_backward(g, x, k, [c_out], [stride] * 2, pad, [1, 1],
                                               False, [0, 0], 1, mask)
  fns = dict(fwd=lambda: F.conv2d(x, k, stride=stride, padding=pad),
             dx=lambda: backward([True, False, False]),
             dw=lambda: backward([False, True, True]))
  out = {}
  with torch.no_grad():
    for kind, fn in fns.items():
      fn()
      times = []
      for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
          fn()
        times.append((time.perf_counter() - start) / calls)
      out[kind] = float(np.median(times))
  return out


class Worker:
  """Dispatches the JSON requests of the benchmarks (in this process or a ``--serve`` one)."""

  def __init__(self):
    self.ref = None

  def handle(self, req: dict) -> dict:
    op = req['op']
    if op == 'steady_malloc':
      import steady_malloc  # benchmarks/, on the path as this script's folder
      return dict(applied=steady_malloc.apply())
    if op == 'info':
      return dict(torch=torch.__version__, threads=torch.get_num_threads(),
                  cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else '')
    if op == 'build':
      start = time.perf_counter()
      self.ref = Reference(**req['args'])
      return dict(num_params=self.ref.num_params(), build_s=time.perf_counter() - start)
    if op == 'train':
      return dict(seconds=self.ref.train(req['steps']))
    if op == 'sample':
      start = time.perf_counter()
      self.ref.ddim(req['n'], req['num_steps'], req.get('clip', 1.0))
      return dict(seconds=time.perf_counter() - start)
    if op == 'forward':
      with np.load(req['inputs']) as f:
        out = self.ref.forward(f['x'], f['t'])
      np.save(req['output'], out)
      return dict(ok=True)
    if op == 'conv_times':
      return dict(seconds=conv_times(req['spec'], req.get('calls', 5), req.get('repeats', 5)))
    if op == 'matmul':
      return dict(flops_per_sec=matmul_flops_per_sec(req.get('n', 2048),
                                                     device=req.get('device', 'cpu')))
    raise ValueError(f'unknown request {op!r}')


def serve():
  worker = Worker()
  for line in sys.stdin:
    if not line.strip():
      continue
    try:
      reply = worker.handle(json.loads(line))
    except Exception as e:  # Reported to the parent, which raises it.
      reply = dict(error=f'{type(e).__name__}: {e}')
    sys.stdout.write(json.dumps(reply) + '\n')
    sys.stdout.flush()


if __name__ == '__main__':
  if sys.argv[1:] == ['--serve']:
    serve()
  else:
    sys.exit('usage: python torch_reference.py --serve  (used by benchmarks/train_step.py)')
