"""cdiff_jax: constrained, debiased and composable diffusion models in JAX/Flax."""

from setuptools import find_packages, setup

# Lower bounds are the versions the test suite was run with (Python 3.12).
INSTALL_REQUIRES = [
    'jax>=0.12.0',
    'flax>=0.12.12',
    'optax>=0.2.8',
    'orbax-checkpoint>=0.12.8',
    'tensorflow-datasets>=4.9.10',
    'importlib_resources>=7.1.0',  # imported by tensorflow-datasets without declaring it
    'ml-collections>=1.1.0',
    'chex>=0.1.92',
    'absl-py>=2.5.1',
    'numpy>=2.0',
    'scikit-learn>=1.9.1',  # the embedded 8x8 digits dataset
    'matplotlib>=3.11.2',
    'pillow>=13.0.0',
    'tqdm>=4.70.1',
    'tensorboardX>=2.6.5',  # TensorBoard event files without TensorFlow
]

EXTRAS = {
    'test': ['pytest>=9.2.0', 'pytest-xdist>=3.8.0', 'nbclient>=0.11.0', 'nbformat>=5.10',
             'ipykernel>=6.29'],
    # The PyTorch reference of the benchmarks. On Python 3.12 PyPI only has CUDA builds of
    # this version; `make bench` puts it in a separate venv (Python 3.11 when there is one,
    # else 3.12), with TORCH_INDEX for the CPU-only build.
    'bench': ['torch==2.13.0'],
}

setup(
    name='cdiff_jax',
    version='0.1.0',
    description='Diffusion models under requirements: constrained dual training, TIW-DSM, '
                'composition and guidance, in JAX/Flax.',
    packages=find_packages(include=['cdiff_jax', 'cdiff_jax.*']),
    python_requires='>=3.12',
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
