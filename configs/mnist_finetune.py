"""MNIST fine-tuning without overfitting (the paper's Figure 4).

Pre-train on MNIST without the 9s, generate 5,000 samples from it (q_pre), then fine-tune
on 1,000 new training images of all ten classes with KL(q_pre || p) <= b; plain
fine-tuning is the baseline.

  python -m experiments.finetune --config=configs/mnist_finetune.py --workdir=runs/mnist_finetune \\
      --config.data.source=idx --config.data.data_dir=DIR

Expected: the paper reports FID 45.9 (plain fine-tuning) vs 25.2 (constrained); here the
classifier FID and the class frequencies (9s appear in both fine-tuned models) are reported.
GPU-sized: hours on a 2-core CPU. Measured at a CPU budget with a small new set (README's
command, 42 min, jax 0.12.1: 1,500 pre-training steps of 64 at pretrain_lr 1e-3, 1,000 q_pre
samples, new_data_size=100, 1,500 fine-tuning steps of 32 + 32, dual_start 100; 1,000
samples of 50-step DDIM, a 600-step evaluation classifier): plain fine-tuning
overfits its 100 images (loss on q_pre 0.0345 -> 0.0535, TV 0.132, classifier FID 1.10),
the constrained arm holds it at b = 0.0345 (lambda 0.19; TV 0.080, FID 0.85). An earlier
run with 1,000 new images and 600 steps (19 passes; jax 0.12.0.1, b from the EMA
parameters, 0.0352) had plain fine-tuning not drifted yet, and the constraint never bound.
"""

from configs import digits_finetune, mnist_minority


def get_config():
  c = digits_finetune.get_config()
  m = mnist_minority.get_config()
  c.data = m.data
  c.data.minority_classes, c.data.minority_fraction = (), 1.0
  c.model = m.model
  c.train.steps = 4000
  c.finetune.pretrain_steps = 10000
  c.finetune.num_generated = 5000
  c.finetune.new_data_size = 1000
  c.method.objective_batch = 64
  c.method.constraint_batch = 128
  c.eval.num_samples = 2000
  return c
