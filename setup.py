"""megatron-pathmoe: Path-Constrained Mixture-of-Experts on NVIDIA Megatron-Core.

torch is given a range, never a pin: on CPU machines install ``torch==2.13.0`` first (the
README does), on GPU clusters the CUDA torch already installed satisfies the range, so pip
never replaces it. megatron-core is pinned exactly (0.16.1 is the newest for Python 3.11).
GPU-only packages are extras and never install on CPU.

The permutation kernels in csrc/ are compiled into ``megatron_pathmoe.ops._C`` by the builder in
megatron_pathmoe/ops/_build.py (loaded by path: it needs no torch, so pip's isolated build env,
which pyproject.toml gives setuptools and pybind11 only, is enough). CPU kernels are always
built; CUDA kernels when nvcc is found and the build sees a CUDA torch (``--no-build-isolation``)
or PATHMOE_OPS_CUDA=1, for the architectures in TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX").
A failed build only warns: the package then builds them on first use
(cached), and else falls back to megatron-core's permutation.
"""

import importlib.util
import os
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _ops_builder():
    spec = importlib.util.spec_from_file_location(
        "_pathmoe_ops_build", ROOT / "megatron_pathmoe" / "ops" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _want_cuda(builder) -> tuple[bool, str]:
    choice = os.environ.get("PATHMOE_OPS_CUDA", "auto")
    if choice in ("0", "1"):
        return choice == "1", f"PATHMOE_OPS_CUDA={choice}"
    if builder.find_nvcc() is None:
        return False, "nvcc not found"
    try:
        import torch
    except ImportError:
        return False, ("torch is not importable in the build environment (pip build isolation; "
                       "use --no-build-isolation or PATHMOE_OPS_CUDA=1)")
    if not torch.version.cuda:
        return False, f"torch {torch.__version__} is a CPU build"
    return True, f"nvcc and torch {torch.__version__}"


class BuildPermuteOps(build_ext):
    """Compiles csrc/ with the package's own builder; warns instead of failing."""

    def build_extension(self, ext):
        builder = _ops_builder()
        with_cuda, why = _want_cuda(builder)
        target = Path(self.get_ext_fullpath(ext.name))
        print(f"megatron-pathmoe: building permutation kernels (CPU{' + CUDA' if with_cuda else ''}"
              f"; CUDA: {why}) -> {target}")
        try:
            builder.build_extension(target, with_cuda)
        except (builder.BuildError, OSError) as error:
            print(f"WARNING megatron-pathmoe: permutation kernels not built ({error}); they are "
                  "built on first use, else --permute-impl auto uses megatron-core's permute")

# None of these pulls torch (each pinned version checked with pip --dry-run on the CPU wheel).
_DATA = ["sentencepiece==0.2.3", "zstandard==0.25.0"]  # SentencePiece tokenizers, .zst input
_HF = ["transformers==5.23.0", "safetensors==0.8.0",
       "lm-eval==0.4.13", "accelerate==1.15.0"]  # lm-eval's hf model imports accelerate
_MONITORING = ["tensorboard==2.21.0", "wandb==0.31.0"]  # --tensorboard-dir, --wandb-project
EXTRAS = {
    "data": _DATA,
    "hf": _HF,
    "monitoring": _MONITORING,
    # mistral-common ships a Llama-family SentencePiece .model for the tokenizer tests; 1.8.5 is
    # the newest that leaves numpy unpinned on Python 3.11 (later ones pin numpy<2.4).
    "test": ["pytest>=7", "import-linter==2.17", "mistral-common==1.8.5", *_DATA, *_HF,
             *_MONITORING],  # lint-imports
    # GPU clusters only: transformer-engine raises at import on CPU machines. The range is
    # megatron-core 0.16.1's own (its dev extra: transformer-engine>=2.9.0a0,<2.12.0).
    "gpu": ["transformer-engine[pytorch]>=2.9.0a0,<2.12.0"],
    # PathMoE gating for DeepSpeed-MoE (megatron_pathmoe/integrations/deepspeed). Install with
    # DS_BUILD_OPS=0: 0.19.8 then builds no ops and keeps the installed torch (pip --dry-run).
    "deepspeed": ["deepspeed==0.19.8"],
}

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
        "matplotlib>=3.7",  # expert-path analysis plots
    ],
    extras_require=EXTRAS,
    ext_modules=[Extension("megatron_pathmoe.ops._C",
                           sources=["csrc/bindings.cpp", "csrc/permute_cpu.cpp",
                                    "csrc/permute_cpu_avx2.cpp"])],
    cmdclass={"build_ext": BuildPermuteOps},
    entry_points={
        "console_scripts": [
            "pathmoe-pretrain=megatron_pathmoe.training.pretrain:main",
            "pathmoe-convert=megatron_pathmoe.convert.cli:main",
            "pathmoe-evaluate=megatron_pathmoe.eval.cli:main",
            "pathmoe-analyze-paths=megatron_pathmoe.analysis.cli:main",
        ],
    },
)
