"""CelebA 64x64 with a male minority (the paper's Figure 2), constrained vs unconstrained.

Label: the `Male` attribute (class 1 = male). The male images keep 20% of their training
examples; one constraint asks the model to generate males at frequency 1/2: the ELBO
threshold b = L_male(ref) - log(0.5 / pi_male) nats from the unconstrained reference run
(`method.target_frequency=0.5`; digits_minority's 0.1 is 1/10 classes).
Data: TFDS `celeb_a` prepared as ArrayRecord (`tfds build celeb_a --file_format=array_record`,
then `--config.data.data_dir=DIR`); images are center-cropped to 140x140 and resized to 64.

  python -m experiments.minority --config=configs/celeba_male_minority.py \\
      --workdir=runs/celeba_male --config.data.data_dir=DIR

Expected: the constrained model's male frequency moves from the skewed training frequency
towards 1/2 (the paper reports FID 19.6 -> 11.6). Needs a GPU (or TPU): a 64x64 UNet is far
too slow for a CPU.
"""

from configs import digits_minority


def get_config():
  c = digits_minority.get_config()
  c.data.name = 'celeb_a'
  c.data.image_size = 64
  c.data.label_attribute = 'Male'
  c.data.minority_classes = (1,)
  c.data.minority_fraction = 0.2
  c.model.ch, c.model.ch_mult, c.model.num_res_blocks = 64, (1, 2, 2, 2), 2
  c.model.attn_levels, c.model.num_groups, c.model.dropout = (2,), 16, 0.1
  c.method.constraint_classes = (1,)
  c.method.target_frequency = 0.5   # two classes: fair is 1/2
  c.method.objective_batch = 64
  c.method.constraint_batch = 64
  c.optim.lr = 2e-4
  c.train.steps = 100000
  c.train.log_every, c.train.checkpoint_every = 100, 5000
  c.method.dual_start = 5000
  c.eval.num_samples = 5000
  return c
