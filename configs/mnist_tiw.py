"""TIW-DSM on long-tailed MNIST (as CIFAR-10-LT: imbalance ratio 0.01), reference 5% or 10%.

Data: MNIST's training digits split into a biased set whose class sizes fall exponentially
from 0 to 9 (ratio 0.01: ~5,800 zeros ... 58 nines) and a disjoint balanced reference set of
``method.ref_fraction`` times its size (0.1: 1,430 images; 0.05: 730). Score minibatches
are half reference, half biased. Read from TFDS (prepared, no download) or local IDX files.

Commands:
  python -m cdiff_jax.main --config=configs/mnist_tiw.py --workdir=runs/mnist_tiw \\
      --config.data.source=idx --config.data.data_dir=DIR_WITH_IDX_FILES \\
      --config.method.variant=tiw --config.method.ref_fraction=0.05
  python experiments/tiw_compare.py --config=configs/mnist_tiw.py --workdir=runs/mnist_cmp \\
      --ref_fractions=0.05,0.1 --config.data.source=idx \\
      --config.data.data_dir=DIR_WITH_IDX_FILES

Expected: an accelerator run (20k steps, batch 128) per arm; the paper's ordering on
CIFAR-10-LT is TIW-DSM better (lower FID, more uniform classes) than DSM(obs), which can
beat IW-DSM. On a 2-core CPU a step takes ~1 s, so the full recipe is hours per arm. At a CPU
budget (5% reference, 1,500 steps of batch 64, lr 1e-3; command in the README; jax
0.12.1) TIW-DSM beat DSM(obs): classifier FID 1.93 -> 1.48, TV to uniform 0.155 -> 0.092,
tail mass 0.38 -> 0.47; IW-DSM (FID 1.87) and DSM(obs) were within the run-to-run spread
(jax 0.12.0.1: 2.14 against 1.91); DSM(ref) was best there (FID 1.29, no copying yet at
1,500 steps), which the paper's longer runs reverse. With 10% reference (same budget, jax
0.12.0.1) TIW-DSM beat DSM(obs) and IW-DSM again (FID 1.38, TV 0.097 against DSM(obs) 2.07 / 0.159),
but IW-DSM (1.97) edged out DSM(obs) there; DSM(ref) 1.31. Alpha sweep at 10% (FID / TV):
alpha 0 (DSM(obs)) 2.07 / 0.159, 0.5 1.55 / 0.107, 1 1.38 / 0.097, 2 1.80 / 0.110.
"""

from cdiff_jax.config import base_config
from cdiff_jax.methods import tiw


def get_config():
  config = base_config()
  config.data.name = 'mnist'
  config.model.ch = 32
  config.model.ch_mult = (1, 2, 2)
  config.model.num_res_blocks = 2
  config.model.attn_levels = (2,)
  config.model.dropout = 0.1
  config.train.steps = 20_000
  config.train.batch_size = 128
  config.train.checkpoint_every = 5000
  config.train.log_every = 200
  config.optim.lr = 2e-4
  config.optim.warmup_steps = 500
  config.method = tiw.default_config()
  config.method.imbalance_ratio = 0.01
  config.method.ref_fraction = 0.1
  config.method.disc_ch = 32
  config.method.disc_ch_mult = (1, 2, 2)
  config.method.disc_pretrain_steps = 2000
  config.eval.enabled = True
  config.eval.num_samples = 5000
  return config
