"""The base experiment config and its validation.

Every file under ``configs/`` starts from ``base_config()`` and changes what its
experiment needs; the launcher then applies ``--config.FIELD=VALUE`` overrides and calls
``validate`` before anything is built, so a wrong value stops the run with one line that
names the field and the fix (``ConfigError``).
"""

from __future__ import annotations

import difflib
import importlib
import json
import math
import os
from collections.abc import Sequence

import ml_collections
import numpy as np

from cdiff_jax import losses, optim, parallel


class ConfigError(ValueError):
  """A config field has a value the run cannot use. The message names the field."""


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict(dict(
      name='digits',          # digits | mnist | fashion_mnist | cifar10 | celeb_a | toy
      source='auto',          # auto | sklearn | tfds | idx | npz
      data_dir='',            # TFDS data_dir, folder of IDX files, or .npz path
      image_size=0,           # 0: take it from the data
      label_attribute='Male',  # celeb_a: the attribute used as the class label
      attributes=(),          # celeb_a: attributes kept per example (TIW-DSM's attribute bias)
      keep_classes=(),        # train only on these classes (empty: all)
      drop_classes=(),        # remove these classes (e.g. the 9s of fine-tuning)
      minority_classes=(),    # classes kept only at minority_fraction
      minority_fraction=1.0,
      subsample_seed=0,       # which examples of a minority class are kept
      split_seed=0,           # digits (source='sklearn'): its train / held-out split
  ))

  c.model = ml_collections.ConfigDict(dict(
      name='unet',            # unet | mlp
      ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), num_heads=1,
      num_groups=8, dropout=0.0,
      hidden=128, depth=3,    # mlp
      conditional=False,      # class-conditional (label num_classes = null class)
      class_dropout=0.1,      # P(label -> null) while training a conditional model
      parameterization='eps',  # eps | energy
      dtype='float32',        # compute dtype: float32 | bfloat16 (params stay float32)
  ))

  c.diffusion = ml_collections.ConfigDict(dict(
      schedule='ddpm',        # ddpm | vp | cosine
      num_steps=1000, beta_start=1e-4, beta_end=0.02,  # ddpm
      beta_min=0.1, beta_max=20.0,                      # vp
      t_min=1e-3,                                       # vp, cosine
      loss_weighting='eps',   # eps (simple) | elbo
      time_sampling='stratified',  # stratified (low-discrepancy per batch) | uniform
  ))

  c.optim = ml_collections.ConfigDict(dict(
      name='adamw', lr=2e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
      grad_clip=1.0, warmup_steps=100, lr_schedule='cosine',
      final_lr_fraction=optim.FINAL_LR_FRACTION,
  ))

  c.train = ml_collections.ConfigDict(dict(
      steps=2000, batch_size=128, steps_per_call=1,
      ema_decay=0.999,
      log_every=100, checkpoint_every=1000, keep_checkpoints=2, sample_every=0,
      on_nonfinite='stop',    # stop | skip
      num_devices=0,          # 0: all visible devices
      compilation_cache=True,
      # XLA:CPU options set before the backend starts ('': none); see parallel.py.
      xla_cpu_flags=parallel.DEFAULT_XLA_CPU_FLAGS,
      init_from='',           # workdir of a trained run: start from its EMA parameters
      debug_nan_step=-1,      # fault injection: the loss of this step is NaN (-1: off)
  ))

  # Multi-process runs (several hosts, or one process per GPU): see the README's
  # "Running at scale". Empty fields come from the environment or the cluster.
  c.parallel = ml_collections.ConfigDict(dict(
      distributed=False,      # True: jax.distributed.initialize() before anything else
      coordinator_address='',  # host:port of process 0 ('': JAX_COORDINATOR_ADDRESS/cluster)
      num_processes=0,        # 0: JAX_NUM_PROCESSES or the cluster's
      process_id=-1,          # -1: JAX_PROCESS_ID or the cluster's
      cpu_collectives='',     # CPU-only clusters: 'gloo' (or 'mpi'); '': JAX's default
      initialization_timeout=300,  # seconds to wait for all processes
  ))

  c.sample = ml_collections.ConfigDict(dict(
      sampler='ddim',         # ancestral | ddim | euler_maruyama | heun
      num_steps=100, eta=0.0, num_samples=64, use_ema=True,
      clip=1.0,               # the denoised prediction kept in [-clip, clip] (images), by
                              # every sampler (annealed MCMC: its diffusion steps); 0: off
      guidance_scale=1.0,     # classifier-free guidance weight w (1: plain conditional)
      cpu_onednn=True,        # on CPU: the sampler compiled with oneDNN kernels (parallel.py)
  ))

  c.method = ml_collections.ConfigDict(dict(name='dsm'))

  c.eval = ml_collections.ConfigDict(dict(
      enabled=False,          # after training: eval.json, class-frequency plot
      num_samples=1000,
      classifier_steps=0,     # 0: the dataset's default recipe
      feature_fn='',          # optional 'module:function' extractor for a real FID
  ))
  return c


def method_label(c: ml_collections.ConfigDict) -> str:
  """What a run of ``c`` trains, in a few words for its log and figures: the method's name,
  'constrained (disabled: lambda fixed at 0)' for a constrained config's unconstrained arm,
  a TIW config's variant and weight temperature."""
  mc = c.method
  label = mc.name
  if label == 'constrained' and not mc.get('enabled', True):
    label += ' (disabled: lambda fixed at 0)'
  elif label == 'tiw':
    variant = mc.get('variant', 'tiw')
    label += f' ({variant}, alpha {mc.alpha:g})' if variant in ('iw', 'tiw') else f' ({variant})'
  return label


def no_guidance(model_config) -> str | None:
  """Why a model of ``model_config`` has no classifier-free guidance: 'unconditional', or
  'no null class' (trained with ``class_dropout=0``); None when it has."""
  if not model_config.conditional:
    return 'unconditional'
  if model_config.class_dropout == 0:
    return 'no null class'
  return None


def _fail(field: str, value, fix: str):
  raise ConfigError(f'config.{field}={value!r}: {fix}')


# Sampling starts from pure noise: a forward process may end at alpha(1) of at most this
# (ddpm's 1,000 default steps: 0.006; vp's default betas: 0.007).
MAX_ALPHA_1 = 0.05


def _check_continuous_schedule(dc) -> None:
  """vp / cosine: times in [t_min, 1] with 0 < t_min < 1; vp's beta(t) positive, ending
  in (nearly) pure noise as the ddpm check asks."""
  if not 0.0 < dc.t_min < 1.0:
    _fail('diffusion.t_min', dc.t_min, 'must lie in (0, 1): the smallest training and '
          'sampling time (1e-3 by default; below 0 the noise variance is negative).')
  if dc.schedule != 'vp':
    return
  if not 0.0 <= dc.beta_min <= dc.beta_max or dc.beta_max <= 0.0:
    _fail('diffusion.beta_max', dc.beta_max, f'the VP betas must satisfy 0 <= beta_min '
          f'({dc.beta_min}) <= beta_max, beta_max > 0 (default 0.1 and 20).')
  alpha_1 = float(np.exp(-0.25 * (dc.beta_max + dc.beta_min)))
  if alpha_1 > MAX_ALPHA_1:
    _fail('diffusion.beta_max', dc.beta_max, f'with beta_min={dc.beta_min:g} the forward '
          f'process ends at alpha(1) = {alpha_1:.3f}, far from the pure noise sampling starts '
          f'from (default 0.1 and 20: 0.007); set beta_max >= '
          f'{-4 * np.log(MAX_ALPHA_1) - dc.beta_min:.3g}.')


def _check_ddpm_betas(dc) -> None:
  """The discrete schedule must end in (nearly) pure noise, where sampling starts: the
  linear betas are per-step values, so fewer steps with the same betas end far from it."""
  T, b0, b1 = dc.num_steps, dc.beta_start, dc.beta_end
  if not 0.0 < b0 <= b1 < 1.0:
    _fail('diffusion.beta_end', b1, f'the betas must satisfy 0 < beta_start ({b0}) <= '
          'beta_end < 1.')
  if T < 1:
    _fail('diffusion.num_steps', T, 'must be positive.')
  alpha_1 = float(np.exp(0.5 * np.sum(np.log1p(-np.linspace(b0, b1, T)))))
  if alpha_1 > MAX_ALPHA_1:
    scaled = b1 * 1000 / T
    hint = (f'set diffusion.beta_start={b0 * 1000 / T:.3g} and beta_end={scaled:.3g} (the '
            'noise of 1,000 steps)' if scaled < 1 else 'use more diffusion.num_steps')
    _fail('diffusion.num_steps', T, f'with betas {b0:g}..{b1:g} the forward process ends at '
          f'alpha(1) = {alpha_1:.3f}, far from the pure noise sampling starts from (1,000 '
          f'steps: 0.006); {hint}, or use diffusion.schedule=vp.')


def _choice(c, field: str, choices):
  value = c
  for part in field.split('.'):
    value = value[part]
  if value not in choices:
    _fail(field, value, f'must be one of {tuple(choices)}.')


def _positive(c, field: str, allow_zero: bool = False):
  value = c
  for part in field.split('.'):
    value = value[part]
  if not math.isfinite(value):
    _fail(field, value, 'must be a finite number.')
  if value < 0 or (value == 0 and not allow_zero):
    _fail(field, value, 'must be positive.' if not allow_zero else 'must be >= 0.')


# The sections every training config has, with base_config's fields (methods check
# config.method, experiments their own sections).
CORE_SECTIONS = ('data', 'model', 'diffusion', 'optim', 'train', 'sample', 'eval', 'parallel')


# Fields the experiments add to an arm's config, keys of the inputs it was built from (saved
# with it, so that a finished or interrupted arm is not reused for others); not the user's.
RUN_KEY_FIELDS = ('data.finetune_data_key', 'method.reference_key')


def check_fields(section: str, value, known, required=(), start_from: str = '') -> None:
  """Refuses a field of ``config.<section>`` outside ``known`` (set in a config file, a
  misspelled field is otherwise ignored while the code reads the default) and, naming
  ``start_from``, a missing one of ``required``."""
  known = sorted(known)
  keys = {f[len(section) + 1:] for f in RUN_KEY_FIELDS if f.startswith(section + '.')}
  unknown = sorted(set(value.keys()) - set(known) - keys)
  if unknown:
    close = difflib.get_close_matches(unknown[0], known, n=1)
    hint = f'; did you mean config.{section}.{close[0]}?' if close else ''
    raise ConfigError(f'config.{section}.{unknown[0]}: no such field{hint} (the fields of '
                      f'config.{section}: {", ".join(known)}).')
  missing = [f for f in required if f not in value]
  if missing:
    raise ConfigError(f'config.{section}.{missing[0]} is missing; start the config from '
                      f'{start_from}.')


def _check_core_fields(c) -> None:
  base = base_config()
  for section in CORE_SECTIONS:
    if section in c and hasattr(c[section], 'keys'):
      check_fields(section, c[section], base[section].keys())


# Tuple fields of numbers (the core's, the methods' and the experiments'; checked where
# present). ml_collections keeps an override it cannot parse as the raw text in a 1-tuple
# (--config.model.ch_mult=abc gives ('abc',)), which would fail later inside arithmetic.
NUMBER_TUPLES = {'data.minority_classes': int, 'data.drop_classes': int,
                 'data.keep_classes': int, 'model.ch_mult': int, 'model.attn_levels': int,
                 'method.constraint_classes': int, 'method.class_order': int,
                 'method.disc_ch_mult': int, 'method.thresholds': float,
                 'method.tiw.class_order': int, 'method.tiw.disc_ch_mult': int,
                 'finetune.pretrain_drop_classes': int, 'guidance.cfg_scales': float,
                 'guidance.classifier_scales': float, 'guidance.not_scales': float}


def _check_number_tuples(c) -> None:
  for field, kind in NUMBER_TUPLES.items():
    try:
      value = _get(c, field)
    except (KeyError, AttributeError):
      continue
    ok = (int,) if kind is int else (int, float)
    if not isinstance(value, (tuple, list)) or any(
        isinstance(v, bool) or not isinstance(v, ok) for v in value):
      what = 'integers' if kind is int else 'numbers'
      _fail(field, value, f'must be a tuple of {what}, e.g. --config.{field}="(1, 2)" '
            '(quoted for the shell).')


def validate(c: ml_collections.ConfigDict, check_paths: bool = True) -> None:
  """Checks the fields the core uses; methods check their own (``methods.validate``).
  ``check_paths=False``: not that the paths a training run reads exist (``data.data_dir``,
  the run it starts from, ``train.init_from``), for a run loaded from its own checkpoint,
  which reads them only where it needs them (and says so then)."""
  from cdiff_jax.sampling import SAMPLERS  # Local: keeps config import light.
  from cdiff_jax.models import PARAMETERIZATIONS

  _check_core_fields(c)
  _check_number_tuples(c)
  _choice(c, 'data.name', ('digits', 'mnist', 'fashion_mnist', 'cifar10', 'celeb_a', 'toy'))
  _choice(c, 'data.source', ('auto', 'sklearn', 'tfds', 'idx', 'npz'))
  if (check_paths and c.data.data_dir
      and not os.path.exists(os.path.expanduser(c.data.data_dir))):
    _fail('data.data_dir', c.data.data_dir, 'does not exist; point it at the folder (or '
          '.npz file) that holds the data.')
  _positive(c, 'data.image_size', allow_zero=True)
  if not 0.0 < c.data.minority_fraction <= 1.0:
    _fail('data.minority_fraction', c.data.minority_fraction, 'must lie in (0, 1].')
  _choice(c, 'model.name', ('unet', 'mlp'))
  _choice(c, 'model.parameterization', PARAMETERIZATIONS)
  _choice(c, 'model.dtype', ('float32', 'bfloat16'))
  if not 0.0 <= c.model.class_dropout < 1.0:
    _fail('model.class_dropout', c.model.class_dropout, 'must lie in [0, 1).')
  if c.model.name == 'mlp':   # a zero-width MLP trained and sampled constants
    _positive(c, 'model.hidden')
    _positive(c, 'model.depth', allow_zero=True)
  if c.model.name == 'unet':
    for f in ('model.ch', 'model.num_groups', 'model.num_res_blocks'):
      _positive(c, f)
    if not 0.0 <= c.model.dropout < 1.0:  # 1 zeroes every residual branch (NaN gradients)
      _fail('model.dropout', c.model.dropout, 'must lie in [0, 1).')
    for m in (1,) + tuple(c.model.ch_mult):   # 1: the stem's width, normalized first
      if (c.model.ch * m) % c.model.num_groups:
        _fail('model.num_groups', c.model.num_groups,
              f'must divide every level width ch * ch_mult = {c.model.ch} * {m}.')
    widths = [c.model.ch * m for m in c.model.ch_mult]
    if c.model.num_heads < 1 or any(w % c.model.num_heads for w in widths):
      _fail('model.num_heads', c.model.num_heads,
            f'must be >= 1 and divide every level width {widths}.')
    bad = [a for a in c.model.attn_levels if not 0 <= a < len(c.model.ch_mult)]
    if bad:
      _fail('model.attn_levels', tuple(c.model.attn_levels),
            f'levels {bad} do not exist (ch_mult has {len(c.model.ch_mult)} levels).')
    if c.data.image_size and c.data.image_size < 2 ** (len(c.model.ch_mult) - 1):
      _fail('model.ch_mult', tuple(c.model.ch_mult),
            f'{len(c.model.ch_mult)} levels downsample {c.data.image_size}x'
            f'{c.data.image_size} images below 1 pixel; use fewer levels.')
  _choice(c, 'diffusion.schedule', ('ddpm', 'vp', 'cosine'))
  _choice(c, 'diffusion.loss_weighting', losses.WEIGHTINGS)
  _choice(c, 'diffusion.time_sampling', ('stratified', 'uniform'))
  if c.diffusion.schedule == 'ddpm' and c.sample.num_steps >= c.diffusion.num_steps:
    _fail('sample.num_steps', c.sample.num_steps,
          f'must be below diffusion.num_steps={c.diffusion.num_steps} (the sampler moves '
          f'between its grid times; {c.diffusion.num_steps - 1} moves plus the final '
          'denoising step is the full DDPM chain).')
  if c.diffusion.schedule == 'ddpm':
    _check_ddpm_betas(c.diffusion)
  else:
    _check_continuous_schedule(c.diffusion)
  if not 0.0 <= c.sample.eta <= 1.0:  # DDIM's noise: 0 deterministic, 1 the DDPM posterior's
    _fail('sample.eta', c.sample.eta, 'must lie in [0, 1] (0: deterministic DDIM, 1: as much '
          'noise as ancestral sampling).')
  _choice(c, 'optim.name', ('adam', 'adamw'))
  _choice(c, 'optim.lr_schedule', ('constant', 'cosine'))
  _positive(c, 'optim.lr')
  for f in ('optim.b1', 'optim.b2'):
    if not 0.0 <= _get(c, f) < 1.0:
      _fail(f, _get(c, f), "must lie in [0, 1) (Adam's moment decay; 1 never updates).")
  _positive(c, 'optim.eps')  # 0: 0/0 = NaN updates for every parameter with a zero gradient
  _positive(c, 'optim.weight_decay', allow_zero=True)
  if c.optim.weight_decay and c.optim.name != 'adamw':
    _fail('optim.weight_decay', c.optim.weight_decay, f"optim.name={c.optim.name!r} has no "
          "weight decay; use optim.name='adamw' (or weight_decay=0).")
  _positive(c, 'optim.grad_clip', allow_zero=True)
  _positive(c, 'sample.clip', allow_zero=True)  # 0: no clipping
  _positive(c, 'optim.warmup_steps', allow_zero=True)
  if not 0.0 <= c.optim.get('final_lr_fraction', optim.FINAL_LR_FRACTION) <= 1.0:
    _fail('optim.final_lr_fraction', c.optim.final_lr_fraction,
          'must lie in [0, 1] (the end of the cosine schedule as a fraction of optim.lr).')
  for f in ('seed', 'data.subsample_seed', 'data.split_seed'):  # numpy takes no negative seeds
    _positive(c, f, allow_zero=True)
  for f in ('train.steps', 'train.batch_size', 'train.steps_per_call', 'train.log_every',
            'sample.num_steps', 'sample.num_samples'):
    _positive(c, f)
  for f in ('train.checkpoint_every', 'train.sample_every', 'train.num_devices',
            'train.keep_checkpoints'):
    _positive(c, f, allow_zero=True)
  if not 0.0 <= c.train.ema_decay < 1.0:
    _fail('train.ema_decay', c.train.ema_decay, 'must lie in [0, 1).')
  _choice(c, 'train.on_nonfinite', ('stop', 'skip'))
  if (check_paths and c.train.init_from
      and not os.path.isdir(os.path.join(c.train.init_from, 'checkpoints'))):
    _fail('train.init_from', c.train.init_from, 'holds no checkpoints/; train that run first.')
  bad = parallel.non_cpu_flags(c.train.get('xla_cpu_flags', ''))
  if bad:
    _fail('train.xla_cpu_flags', c.train.xla_cpu_flags,
          f'{bad} are not XLA:CPU options (--xla_cpu_...); other XLA options go in XLA_FLAGS.')
  if c.train.get('debug_nan_step', -1) < -1:
    _fail('train.debug_nan_step', c.train.debug_nan_step, 'must be a step >= 0, or -1 (off).')
  if 'parallel' in c:
    _validate_parallel(c)
  k = c.train.steps_per_call
  for f in ('steps', 'log_every', 'checkpoint_every', 'sample_every'):
    if c.train[f] % k:  # A call runs k steps: train.steps would be overshot.
      _fail(f'train.{f}', c.train[f], f'must be a multiple of train.steps_per_call={k}.')
  _choice(c, 'sample.sampler', SAMPLERS)
  w = c.sample.get('guidance_scale', 1.0)
  if not math.isfinite(w):
    _fail('sample.guidance_scale', w, 'must be a finite number (1: no guidance).')
  if w != 1.0 and (why := no_guidance(c.model)) == 'unconditional':
    _fail('sample.guidance_scale', w, 'classifier-free guidance needs a class-conditional '
          'model; set model.conditional=True (or guidance_scale=1).')
  if w != 1.0 and why == 'no null class':
    _fail('sample.guidance_scale', w, 'the null class is never trained with '
          'model.class_dropout=0; set model.class_dropout=0.1 (or guidance_scale=1).')
  if c.eval.num_samples < 2:  # the FID fits a covariance to the samples' features
    _fail('eval.num_samples', c.eval.num_samples, 'must be at least 2.')
  _positive(c, 'eval.classifier_steps', allow_zero=True)  # 0: the dataset's default
  if c.eval.enabled and c.data.name == 'toy':
    _fail('eval.enabled', True, 'the evaluation classifier needs an image dataset.')
  if c.eval.enabled and c.eval.get('feature_fn'):
    load_feature_fn(c.eval.feature_fn)  # before training, not after it


def load_feature_fn(spec: str):
  """``eval.feature_fn`` = 'package.module:function' -> the function (a user's own feature
  extractor for a real FID: images in [-1, 1] -> (N, D) features). Raises ConfigError
  naming the fix for a malformed spec, a module that does not import, or a missing name."""
  module, _, name = spec.partition(':')
  if not module or not name:
    _fail('eval.feature_fn', spec, "give 'package.module:function' (or '' for none).")
  try:
    mod = importlib.import_module(module)
  except ImportError as e:
    _fail('eval.feature_fn', spec, f'module {module!r} does not import ({e}); put its folder '
          'on PYTHONPATH or install its package.')
  fn = getattr(mod, name, None)
  if not callable(fn):
    _fail('eval.feature_fn', spec, f'{module} has no function {name!r}.')
  return fn


def check_sample_clip(sample_config, data_reach: float) -> None:
  """``sample.clip`` against the largest absolute value of the training data (1 for
  images): clipping the sampler's denoised prediction inside it would cut the data."""
  clip = sample_config.clip
  if clip and data_reach > clip * (1 + 1e-3):
    _fail('sample.clip', clip, f'the training data reach +-{data_reach:.3g}, so clipping the '
          f'sampler\'s denoised prediction to +-{clip:g} would cut them; set sample.clip=0 '
          f'(no clipping) or >= {data_reach:.3g}.')


def check_image_shape(model_config, image_shape) -> None:
  """The data's image shape against the model (once the data is loaded, since
  ``data.image_size=0`` takes the size from the data)."""
  mc = model_config
  if mc.name == 'mlp' and len(image_shape) != 1:
    _fail('model.name', mc.name, f'the MLP takes vectors (D,); the data has examples of '
          f'shape {tuple(image_shape)}; use model.name=\'unet\'.')
  if mc.name != 'unet':
    return
  if len(image_shape) != 3:
    _fail('model.name', mc.name, f'the UNet takes images (H, W, C); the data has examples of '
          f'shape {tuple(image_shape)}; use model.name=\'mlp\'.')
  levels = len(mc.ch_mult)
  smallest = min(image_shape[:2])
  if smallest < 2 ** (levels - 1):
    _fail('model.ch_mult', tuple(mc.ch_mult),
          f'{levels} levels downsample the data\'s {image_shape[0]}x{image_shape[1]} images '
          f'below 1 pixel; use at most {smallest.bit_length()} levels.')


def _validate_parallel(c) -> None:
  pc = c.parallel
  if pc.num_processes < 0:
    _fail('parallel.num_processes', pc.num_processes, 'must be >= 0 (0: from the environment).')
  if pc.process_id < -1:
    _fail('parallel.process_id', pc.process_id, 'must be >= 0, or -1 (from the environment).')
  if pc.num_processes and pc.process_id >= pc.num_processes:
    _fail('parallel.process_id', pc.process_id,
          f'must be below parallel.num_processes={pc.num_processes}.')
  _choice(c, 'parallel.cpu_collectives', ('', 'gloo', 'mpi'))
  _positive(c, 'parallel.initialization_timeout')


# Fields whose change makes a checkpoint meaningless for this run (state layout, data,
# the random stream, or the method: an unconstrained run's checkpoint is not a constrained
# run's); everything else (steps, learning rate, logging, sampling) may change on resume.
STRUCTURAL_FIELDS = ('seed', 'data', 'model', 'diffusion', 'optim.name', 'method',
                     'train.batch_size')
# Paths inside those sections: where things are, not what the run computes.
_PATH_FIELDS = ('data.data_dir', 'method.reference_workdir')


def _get(c, dotted: str):
  for part in dotted.split('.'):
    c = c[part]
  return c


def _flatten(prefix, value, out):
  if isinstance(value, dict):
    for k, v in value.items():
      _flatten(f'{prefix}.{k}' if prefix else k, v, out)
  else:
    out[prefix] = list(value) if isinstance(value, (tuple, list)) else value


def fingerprint(c: ml_collections.ConfigDict) -> dict:
  """Flat {field: value} of the structural fields, JSON-serializable."""
  out = {}
  for f in STRUCTURAL_FIELDS:
    v = _get(c, f)
    _flatten(f, v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v, out)
  return {k: v for k, v in out.items() if k not in _PATH_FIELDS}


# Fields that shape every training step without changing the state's layout: a resumed
# run keeps them, or its steps would follow two configs while config.json names one.
# (train.steps may grow: a longer run; the train step's other fields do not change the steps.)
TRAINING_FIELDS = ('optim', 'train.ema_decay')


def training_fingerprint(c: ml_collections.ConfigDict) -> dict:
  """Flat {field: value} of ``TRAINING_FIELDS``, JSON-serializable."""
  return {k: v for k, v in computing_fields(c).items()
          if any(k == f or k.startswith(f + '.') for f in TRAINING_FIELDS)}


# Fields that change where a run finds its data and how it logs, checkpoints or compiles,
# not what it computes: a finished run is still the answer for a config that differs only here.
BOOKKEEPING_FIELDS = ('data.data_dir', 'train.log_every', 'train.checkpoint_every',
                      'train.keep_checkpoints', 'train.sample_every', 'train.compilation_cache',
                      'train.xla_cpu_flags', 'train.num_devices', 'sample.num_samples',
                      'sample.cpu_onednn', 'parallel')


def _computing_fields(tree: dict, also_skip: Sequence[str] = ()) -> dict:
  """Flat {field: value} of a config's JSON tree, bookkeeping fields (and the fields or
  sections in ``also_skip``) aside."""
  flat = {}
  _flatten('', tree, flat)
  skipped = BOOKKEEPING_FIELDS + tuple(also_skip)
  skip = lambda k: any(k == b or k.startswith(b + '.') for b in skipped)
  return {k: v for k, v in flat.items() if not skip(k)}


def computing_fields(c: ml_collections.ConfigDict) -> dict:
  """Flat {field: value} (JSON values) of every field of ``c`` that changes what a run
  computes: the whole config but ``BOOKKEEPING_FIELDS``."""
  return _computing_fields(json.loads(c.to_json_best_effort()))


def saved_config_mismatch(path: str, c: ml_collections.ConfigDict,
                          unused: Sequence[str] = ()) -> list[str]:
  """Fields where a run's saved ``config.json`` differs from ``c``, bookkeeping fields and
  the fields or sections named in ``unused`` aside."""
  with open(path) as f:
    saved = _computing_fields(json.load(f), unused)
  return _mismatch(saved, computing_fields(c), 'saved')


def check_finished_run(workdir: str, c: ml_collections.ConfigDict,
                       unused: Sequence[str] = ()) -> None:
  """Refuses to reuse the finished run in ``workdir`` as the answer for another config.
  ``unused``: fields or sections (``'guidance'``) of ``c`` that the run never reads, so
  that other values of them still find it (an experiment's later stages read them)."""
  path = os.path.join(workdir, 'config.json')
  diffs = saved_config_mismatch(path, c, unused) if os.path.exists(path) else []
  if diffs:
    raise ConfigError(f'{workdir} holds a run finished with another config ({"; ".join(diffs[:4])}'
                      f'{" ..." if len(diffs) > 4 else ""}); use a new --workdir or delete that '
                      'folder.')


def _mismatch(saved: dict, current: dict, what: str) -> list[str]:
  """'field: {what} A vs now B' for every field of the saved flat dict that differs now.

  A field the saved record lacks came to the config (or to the record) after it was
  written, and is not held against it: a run interrupted or finished before an upgrade is
  still resumed or reused. A saved field the config no longer has is a difference."""
  return [f'{k}: {what} {v!r} vs now {current.get(k, "<absent>")!r}'
          for k, v in sorted(saved.items()) if current.get(k, '<absent>') != v]


def fingerprint_mismatch(saved: dict, current: dict) -> list[str]:
  return _mismatch(saved, current, 'checkpoint')
