"""cdiff_jax: diffusion models that obey requirements on what they generate (JAX/Flax).

Submodules: ``schedules``, ``losses``, ``models``, ``methods``, ``sampling``, ``data``,
``train_step``, ``train``, ``checkpoint``, ``parallel``, ``writers``, ``config``,
``evaluation`` (class frequencies, TV, classifier FID), ``toys`` (2-D densities with exact
answers), ``optim``, ``state``; ``sample`` and ``main`` are the sampling and training
commands, ``cli`` their shared command-line plumbing.
"""

__version__ = '0.1.0'
