"""Plain DSM on the embedded 8x8 digits (all 1438 training images), unconditional UNet.

Command:
  python -m cdiff_jax.main --config=configs/digits_dsm.py --workdir=runs/digits_dsm

Expected: ~2 minutes on a 2-core CPU; the loss falls from ~1.0 to ~0.25 and
samples/final.png shows recognizable digits.
"""

from cdiff_jax.config import base_config


def get_config():
  config = base_config()
  config.train.steps = 2000
  return config
