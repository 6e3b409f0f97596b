"""MNIST with minority digits 4, 5 and 7 (the paper's Figure 1), constrained vs unconstrained.

Data: TFDS `mnist` prepared as ArrayRecord (`--config.data.data_dir=DIR`), or the four
official IDX files in a folder (`--config.data.source=idx --config.data.data_dir=DIR`).
The minority digits keep 10% of their training images (about 590 each).

  python -m experiments.minority --config=configs/mnist_minority.py --workdir=runs/mnist_minority \\
      --config.data.source=idx --config.data.data_dir=DIR

Expected: generated class frequencies of the constrained model much closer to uniform than
the unconstrained model's (the paper reports FID 15.9 -> 13.4 with Inception features; here
the classifier FID is reported instead). On a 2-core CPU each arm of this size takes hours;
measured at a CPU budget (README's command: 1,500 steps of 64 + 3 x 16, dual from step
1,000 with an EMA (0.98) of the constraint losses, --config.method.frequency_source=generated,
1,000 samples of 50-step DDIM, a 600-step evaluation classifier; 31 + 26 min on a shared CPU,
jax 0.12.1): TV to
uniform 0.185 -> 0.143, classifier FID 2.82 -> 2.21, minorities 4/5/7 0.036/0.028/0.061 ->
0.078/0.053/0.186 (jax 0.12.0.1: 0.186 -> 0.137, 2.89 -> 2.16, 0.032/0.036/0.068 ->
0.085/0.055/0.174).
"""

from configs import digits_minority


def get_config():
  c = digits_minority.get_config()
  c.data.name = 'mnist'
  c.data.image_size = 28
  c.model.ch, c.model.ch_mult, c.model.num_res_blocks, c.model.attn_levels = 32, (1, 2, 2), 1, (2,)
  c.model.dropout = 0.1
  c.method.objective_batch = 128
  c.method.constraint_batch = 64
  c.optim.lr = 1e-3
  c.train.steps = 10000
  c.train.log_every, c.train.checkpoint_every = 100, 1000
  c.method.dual_start = 1000
  c.eval.num_samples = 2000
  return c
