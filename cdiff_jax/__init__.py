"""cdiff_jax: diffusion models that obey requirements on what they generate (JAX/Flax).

Submodules: ``schedules``, ``losses``, ``models``, ``methods``, ``sampling``, ``data``,
``train_step``, ``train``, ``checkpoint``, ``parallel``, ``writers``, ``config``;
``sample`` and ``main`` are the sampling and training commands.
"""

__version__ = '0.1.0'
