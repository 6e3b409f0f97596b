"""2-D composition benchmarks with exact answers: AND (ring of 8 Gaussians x vertical bar),
OR (mixture of a vertical and a horizontal bar), NOT (big box minus a small box).

Command:
  python -m experiments.toy_composition --config=configs/toy_composition.py --workdir=runs/toy

Trains five energy-parameterized MLPs (ring, vertical bar, horizontal bar, big box, small
box), each on its own exact samples; composes them without retraining; samples every
composition with plain reverse diffusion and with annealed ULA, MALA, U-HMC and HMC, with
the learned components and with the exact ("oracle") component scores; writes
WORKDIR/toy_table.{md,json} (mean exact log-likelihood of the samples under the composed
density, sliced Wasserstein distance to exact samples, acceptance rates) and the sample
plots WORKDIR/toy_<benchmark>.png.

Expected (2-core CPU, 5-9 minutes; notebooks/composition_mcmc.ipynb runs the same):
on the product, plain reverse diffusion is clearly worse than MALA/HMC in exact
log-likelihood (oracle components: about 0.66 vs 1.36-1.44; exact samples give 1.50), and the
learned components follow the same ordering. The mixture and the negation are exact
diffusions, so all samplers are close there.
"""

import ml_collections

from cdiff_jax.config import base_config


def get_config():
  config = base_config()
  config.data.name = 'toy'
  config.model.name = 'mlp'
  config.model.hidden = 128
  config.model.depth = 3
  config.model.parameterization = 'energy'   # MALA/HMC need energies
  config.diffusion.schedule = 'ddpm'
  config.train.steps = 6000
  config.train.batch_size = 512
  config.train.ema_decay = 0.999
  config.train.log_every = 500
  config.train.checkpoint_every = 0
  config.optim.lr = 2e-3
  config.optim.warmup_steps = 200
  # Of config.sample the experiment reads only num_steps: its plain reverse diffusion is
  # ancestral, with the EMA parameters, unclipped (clip=0 says so to any library sampler
  # built from this config).
  config.sample.clip = 0.0
  config.sample.num_steps = 100              # noise levels of every sampler

  config.toy = ml_collections.ConfigDict(dict(
      benchmarks=('product', 'mixture', 'negation'),
      components=('oracle', 'learned'),      # exact component scores and/or trained models
      num_train=50_000,                      # exact samples per component training set
      num_samples=2000,                      # samples per sampler and benchmark
      quadrature_points=200,                 # per axis, for the learned log-normalizers
  ))
  config.mcmc = ml_collections.ConfigDict(dict(
      samplers=('diffusion', 'ula', 'mala', 'uhmc', 'hmc'),
      steps_per_level=10,
      step_schedule='sigma',                 # step sizes scale with sigma_t
      ula_step=0.2, mala_step=0.5,           # eta = step * sigma_t^2
      uhmc_step=0.3, hmc_step=0.5,           # leapfrog step = step * sigma_t
      num_leapfrog=3,
      damping=0.5,                           # momentum refresh fraction (1 = full)
  ))
  return config
