"""Debiasing and minority constraints together: a TIW-DSM objective inside the constrained
dual training, on the embedded 8x8 digits.

Data: configs/digits_tiw.py's long-tailed split (biased set 136 zeros ... 13 nines, plus a
balanced reference set of 10% of its size). The primal objective is TIW-DSM on the
half-reference, half-biased minibatch (the discriminator is trained first and frozen);
one constraint per tail class (7, 8, 9) asks for that class's plain DSM loss to be at most
`method.thresholds` (eps-loss units; about the loss a DSM model reaches on the data
overall, so "fit the tail classes as well as the data").

Command:
  python -m cdiff_jax.main --config=configs/digits_tiw_minority.py --workdir=runs/digits_tiw_minority
Without constraints (TIW-DSM alone, same batches): add --config.method.enabled=False.

Expected (2-core CPU, about 5 minutes; not yet run at this size, tested end to end at a tiny one):
metrics.jsonl logs lam (one per tail class) and the TIW weight
figures (weight_ref, weight_bias) side by side; eval.json gives the class frequencies and
the classifier FID (compare with --config.method.enabled=False).
"""

from cdiff_jax.config import base_config
from cdiff_jax.methods import constrained


def get_config():
  c = base_config()
  c.model.ch, c.model.ch_mult, c.model.num_res_blocks, c.model.attn_levels = 32, (1, 2), 1, (1,)
  c.optim.lr, c.optim.warmup_steps = 2e-3, 100
  c.train.steps = 1500
  c.train.log_every, c.train.checkpoint_every = 100, 500

  c.method = constrained.default_method_config()
  c.method.objective = 'tiw'
  c.method.tiw.imbalance_ratio = 0.1
  c.method.tiw.ref_fraction = 0.1
  c.method.tiw.disc_pretrain_steps = 500
  c.method.constraint_classes = (7, 8, 9)
  c.method.objective_batch = 64
  c.method.constraint_batch = 16
  c.method.thresholds = (0.075,)
  c.method.dual_lr = 1.0
  c.method.dual_lr_schedule = 'primal'
  c.method.dual_start = 150

  c.sample.sampler = 'ddim'
  c.sample.num_steps = 100
  c.eval.enabled = True
  c.eval.num_samples = 1000
  return c
