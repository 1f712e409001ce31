"""megatron-pathmoe: Path-Constrained Mixture-of-Experts on NVIDIA Megatron-Core.

torch is given a range, never a pin: on CPU machines install ``torch==2.13.0`` first (the
README does), on GPU clusters the CUDA torch already installed satisfies the range, so pip
never replaces it. megatron-core is pinned exactly (0.16.1 is the newest for Python 3.11).
GPU-only packages are extras and never install on CPU.
"""

from setuptools import find_packages, setup

setup(
    name="megatron-pathmoe",
    version="0.1.0",
    description="PathMoE: block-shared MoE routers for Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_pathmoe", "megatron_pathmoe.*"]),
    install_requires=[
        "torch>=2.6,<2.15",
        "megatron-core==0.16.1",
        "numpy",
        "psutil",  # dist_checkpointing's writer processes die without it (and the parent hangs)
        "pybind11",
        "tokenizers>=0.15",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest>=7"],
        # GPU clusters only: transformer-engine raises at import on CPU machines.
        "gpu": ["transformer-engine[pytorch]"],
    },
    entry_points={
        "console_scripts": [
            "pathmoe-pretrain=megatron_pathmoe.training.pretrain:main",
        ],
    },
)
