"""Samplers: reverse diffusion (``diffusion``) and annealed MCMC (``mcmc``)."""

from cdiff_jax.sampling.diffusion import SAMPLERS, Sampler, denoise, make_step, sample
from cdiff_jax.sampling import mcmc
