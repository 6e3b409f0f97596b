"""Plain DSM on the embedded 8x8 digits (all 1438 training images), unconditional UNet.

Command:
  python -m cdiff_jax.main --config=configs/digits_dsm.py --workdir=runs/digits_dsm

Expected: ~3 minutes on a 2-core CPU; the logged loss (the mean of each 100 steps) falls
from 0.37 over the first 100 steps to 0.073 over the last, and samples/final.png shows
recognizable digits.
"""

from cdiff_jax.config import base_config


def get_config():
  config = base_config()
  config.train.steps = 2000
  return config
