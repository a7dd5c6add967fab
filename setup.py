"""deeplanczos: Hessian eigenvalues of deep-network losses, in JAX, on a mesh."""

import pathlib

import setuptools

HERE = pathlib.Path(__file__).parent

setuptools.setup(
    name="deeplanczos",
    version="0.2.0",
    description=("Matrix-free Hessian eigenvalues (power method, Lanczos) of "
                 "deep-network losses over a whole dataset, sharded on a "
                 "device mesh"),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["deeplanczos", "deeplanczos.*"]),
    install_requires=[
        "jax>=0.7",
        "jaxlib>=0.7",
        "flax>=0.10",
        "grain>=0.2.12",
        "absl-py",
        "ml-collections",
        "optax",
        "orbax-checkpoint",
        "tensorboardX",
        "tqdm",
        "numpy",
        "matplotlib",
        "scikit-learn",
    ],
    extras_require={
        "tpu": ["jax[tpu]"],
        "cuda": ["jax[cuda12]"],
        "test": ["pytest", "pytest-xdist", "scipy", "scikit-learn"],
        # Install a CPU build of torch first (pip install torch --index-url
        # https://download.pytorch.org/whl/cpu), or pip fetches a CUDA one.
        "bench": ["torch", "pyhessian", "scipy", "matfree",
                  "curvlinops-for-pytorch", "hessian-eigenthings"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
