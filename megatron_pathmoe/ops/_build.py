"""Builds the permutation extension ``megatron_pathmoe.ops._C`` from ``csrc/``.

One builder serves both ``setup.py`` (``build_ext``) and the first-use build of a source checkout
(:mod:`megatron_pathmoe.ops.extension`). It needs only the standard library, a C++17 compiler
with OpenMP, pybind11's headers and, for the CUDA kernels, ``nvcc``. It imports neither torch
nor this package (``setup.py`` loads it by path inside pip's isolated build): the kernels take
raw pointers, so the module does not link against torch and survives torch upgrades.

Every build is labelled with a hash of the sources, the flags and the Python ABI; the loader
rebuilds when the label of an installed module no longer matches ``csrc/``.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CPU_SOURCES = ("bindings.cpp", "permute_cpu.cpp", "permute_cpu_avx2.cpp")
CUDA_SOURCES = ("permute_cuda.cu",)
HEADERS = ("permute.h", "dtype_dispatch.h", "cpu_common.h", "cpu_dtypes.h", "cpu_vec.h",
           "cpu_row_kernels.h")
# Per-file instruction sets (x86-64): the AVX2 variant of the row kernels, picked at run time.
# The baseline objects come first on the link line, so the linker keeps their copies of any
# shared inline library code.
ISA_FLAGS = {"permute_cpu_avx2.cpp": ("-mavx2", "-mf16c")} if platform.machine() in ("x86_64", "AMD64") else {}
# GPU architectures, as torch's extensions read TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX", "8.6 9.0",
# "Hopper"): SASS for A100 and H100 plus PTX of the newest, which the driver JIT-compiles on
# later GPUs instead of failing with "no kernel image is available".
CUDA_ARCH_ENV = "TORCH_CUDA_ARCH_LIST"
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
NAMED_CUDA_ARCHS = {"Volta": "7.0+PTX", "Turing": "7.5+PTX", "Ampere": "8.0;8.6+PTX",
                    "Ada": "8.9+PTX", "Hopper": "9.0+PTX"}
_ARCH = re.compile(r"(\d+)\.(\d)([af]?)(\+PTX)?")
# -ffp-contract=off: a weighted sum rounds the product before adding, exactly like
# megatron-core's unfused unpermute (tokens * probs, then scatter_add), so fp32 matches bitwise.
# -Wno-psabi: the vector types of cpu_vec.h never cross a call (all inlined), so the note that
# their calling convention depends on the ISA is moot.
CXX_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-fopenmp", "-ffp-contract=off",
             "-fvisibility=hidden", "-Wno-psabi")
NVCC_FLAGS = ("-O3", "-std=c++17", "-Xcompiler", "-fPIC", "--fmad=false")


class BuildError(RuntimeError):
    """The compiler failed or is missing; the message names the command and the log."""


def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME/bin, else from PATH."""
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_archs(value: str | None = None) -> tuple[str, ...]:
    """The architectures to build, e.g. ("80", "90+PTX"), from ``value`` (default: the
    TORCH_CUDA_ARCH_LIST environment variable, else DEFAULT_CUDA_ARCHS)."""
    if value is None:
        value = os.environ.get(CUDA_ARCH_ENV) or DEFAULT_CUDA_ARCHS
    archs = []
    for entry in value.replace(" ", ";").split(";"):
        for item in NAMED_CUDA_ARCHS.get(entry, entry).split(";"):
            if not item:
                continue
            match = _ARCH.fullmatch(item)
            if match is None:
                raise BuildError(f"{CUDA_ARCH_ENV}: {item!r} is not an architecture like 8.0, "
                                 f"9.0a, 9.0+PTX or one of {', '.join(NAMED_CUDA_ARCHS)}")
            major, minor, suffix, ptx = match.groups()
            archs.append(f"{major}{minor}{suffix}{ptx or ''}")
    if not archs:
        raise BuildError(f"{CUDA_ARCH_ENV}={value!r} names no architecture")
    return tuple(dict.fromkeys(archs))


def nvcc_arch_flags(archs: tuple[str, ...] | None = None) -> list[str]:
    """-gencode flags: SASS for every architecture, plus PTX for those marked +PTX."""
    flags = []
    for arch in archs if archs is not None else cuda_archs():
        code = arch.removesuffix("+PTX")
        flags.append(f"-gencode=arch=compute_{code},code=sm_{code}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{code},code=compute_{code}")
    return flags


def arch_problem(archs: str, capability: tuple[int, int]) -> str | None:
    """Why a module built for ``archs`` ("80;90+PTX", as the module reports it) has no kernel
    image for a GPU of compute ``capability``, or None when it has one. SASS runs on the same
    major version at an equal or higher minor one ("a"/"f" variants only on their own
    architecture); PTX is JIT-compiled for any equal or newer GPU."""
    device = capability[0] * 10 + capability[1]
    for arch in archs.split(";"):
        match = re.fullmatch(r"(\d+)(\d)([af]?)(\+PTX)?", arch)
        if match is None:
            continue
        major, minor, suffix, ptx = int(match[1]), int(match[2]), match[3], match[4]
        if (major, minor) == capability or (not suffix and major == capability[0] and
                                             minor <= capability[1]):
            return None
        if ptx and major * 10 + minor <= device:
            return None
    wanted = f"{capability[0]}.{capability[1]}"
    return (f"the CUDA kernels were built for {archs.replace(';', ', ')}, this GPU has compute "
            f"capability {wanted} (sm_{capability[0]}{capability[1]}); rebuild with "
            f"{CUDA_ARCH_ENV}=\"{wanted}\" (or add +PTX to the newest)")


def extension_filename() -> str:
    return "_C" + sysconfig.get_config_var("EXT_SUFFIX")


def build_hash(with_cuda: bool, csrc: Path = CSRC) -> str:
    """Label of a build: sources, headers, flags, Python ABI and whether CUDA is in."""
    digest = hashlib.sha256()
    files = CPU_SOURCES + HEADERS + (CUDA_SOURCES if with_cuda else ())
    for name in files:
        digest.update(name.encode())
        digest.update((csrc / name).read_bytes())
    digest.update(repr((CXX_FLAGS, ISA_FLAGS, NVCC_FLAGS if with_cuda else (), with_cuda,
                        cuda_archs() if with_cuda else (), extension_filename())).encode())
    return digest.hexdigest()[:16]


LABEL_PREFIX = b"pathmoe-ops-build:"


def file_build_hash(path: Path) -> str | None:
    """The build label compiled into an extension file (see csrc/bindings.cpp), read without
    loading it; None when absent."""
    data = Path(path).read_bytes()
    start = data.find(LABEL_PREFIX)
    if start < 0:
        return None
    label = data[start + len(LABEL_PREFIX):start + len(LABEL_PREFIX) + 16]
    return label.decode("ascii", errors="replace")


def _include_flags(csrc: Path) -> list[str]:
    try:
        import pybind11
    except ImportError as error:
        raise BuildError("pybind11 is not installed (pip install pybind11)") from error
    return [f"-I{csrc}", f"-I{pybind11.get_include()}",
            f"-I{sysconfig.get_paths()['include']}"]


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "a", encoding="utf-8") as out:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        try:
            result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
        except FileNotFoundError as error:
            raise BuildError(f"compiler not found: {cmd[0]} (set CXX or install g++)") from error
    if result.returncode != 0:
        raise BuildError(f"`{' '.join(cmd[:1] + cmd[-3:])}` failed; full log: {log}")


def _compile_commands(csrc: Path, objdir: Path, with_cuda: bool, label: str) -> list[list[str]]:
    cxx = os.environ.get("CXX", "c++")
    defines = [f'-DPATHMOE_OPS_BUILD_HASH="{label}"']
    if with_cuda:
        defines += ["-DPATHMOE_WITH_CUDA", f'-DPATHMOE_OPS_CUDA_ARCHS="{";".join(cuda_archs())}"']
    includes = _include_flags(csrc)
    commands = [[cxx, *CXX_FLAGS, *ISA_FLAGS.get(name, ()), *defines, *includes, "-c",
                 str(csrc / name), "-o", str(objdir / (name + ".o"))] for name in CPU_SOURCES]
    if with_cuda:
        nvcc = find_nvcc()
        if nvcc is None:
            raise BuildError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
        commands += [[nvcc, *NVCC_FLAGS, *nvcc_arch_flags(), *defines, f"-I{csrc}", "-c",
                      str(csrc / name), "-o", str(objdir / (name + ".o"))]
                     for name in CUDA_SOURCES]
    return commands


def _link_command(objects: list[str], output: Path, with_cuda: bool) -> list[str]:
    if with_cuda:
        # nvcc links the CUDA runtime statically: no libcudart on the loader path is needed.
        return [find_nvcc(), "-shared", "-cudart", "static", "-Xcompiler", "-fopenmp",
                *objects, "-o", str(output)]
    return [os.environ.get("CXX", "c++"), "-shared", "-fopenmp", *objects, "-o", str(output)]


def build_extension(output: Path, with_cuda: bool, csrc: Path = CSRC,
                    log: Path | None = None) -> Path:
    """Compile csrc/ into the extension file ``output`` (written atomically). Returns output."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    log = Path(log) if log else output.with_suffix(".log")
    log.write_text(f"building {output} (cuda={with_cuda}) with {sys.executable}\n")
    label = build_hash(with_cuda, csrc)
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        commands = _compile_commands(csrc, Path(tmp), with_cuda, label)
        with ThreadPoolExecutor(max_workers=len(commands)) as pool:
            for future in [pool.submit(_run, cmd, log) for cmd in commands]:
                future.result()
        staged = Path(tmp) / output.name
        _run(_link_command([cmd[-1] for cmd in commands], staged, with_cuda), log)
        os.replace(staged, output)
    return output
