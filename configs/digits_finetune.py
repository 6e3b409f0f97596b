"""Fine-tuning without overfitting, on the embedded 8x8 digits (CPU version of the paper's
MNIST fine-tuning task).

A model pre-trained on digits without the 9s is fine-tuned on a new, small set of 100
training images of all ten classes. The constraint KL(q_pre || p) <= b keeps it close to
the pre-trained model, where q_pre is a set of 1,000 samples of the pre-trained model and
b is a little above the pre-trained model's own loss on them; plain fine-tuning is the
baseline.

  python -m experiments.finetune --config=configs/digits_finetune.py --workdir=runs/digits_finetune

Expected (2-core CPU, ~8 minutes): both fine-tuned models generate 9s (the pre-trained one
hardly: 0.018, malformed digits the classifier calls 9); plain fine-tuning drifts towards its 100 images (smaller distance of samples
to their nearest new-data image, a worse classifier FID), the constrained one keeps the
pre-trained model's diversity. See the README for the measured table.
"""

import ml_collections

from configs import digits_minority
from cdiff_jax.methods import constrained


def get_config():
  c = digits_minority.get_config()
  c.data.minority_classes = ()
  c.data.minority_fraction = 1.0

  c.diffusion.loss_weighting = 'eps'        # thresholds below are relative eps-loss levels
  c.method = constrained.default_method_config()
  c.method.constraint_source = 'source'     # source 0: new data, source 1: q_pre samples
  c.method.constraint_names = ('pretrained',)
  c.method.objective_batch = 32
  c.method.constraint_batch = 64
  c.method.threshold_mode = 'absolute'      # experiments/finetune.py switches to 'reference'
  c.method.thresholds = (0.05,)
  c.method.threshold_scale = 1.1            # b = 1.1 x the pre-trained model's loss on q_pre
  c.method.dual_lr = 0.5
  c.method.dual_lr_schedule = 'primal'
  c.method.dual_start = 100

  c.optim.lr, c.optim.warmup_steps = 5e-4, 50
  c.train.steps = 1500
  c.train.checkpoint_every = 500

  c.finetune = ml_collections.ConfigDict(dict(
      pretrain_steps=2000, pretrain_batch=128, pretrain_drop_classes=(9,),
      pretrain_lr=0.0,                      # 0: optim.lr, as for the fine-tuning
      num_generated=1000, new_data_size=100, new_data_seed=0))
  return c
