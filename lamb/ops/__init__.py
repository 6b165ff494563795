"""Builders and loaders of the fused kernels: ``load_cpu()`` and ``load_cuda()``.

Nothing here compiles at import. The first ``load_*()`` call builds the extension just in time with
``torch.utils.cpp_extension`` (ninja) into ``$TORCH_EXTENSIONS_DIR/lamb/<name>`` (default
``~/.cache/torch_extensions/lamb``), where the build is cached and reused: the name carries a hash of the
sources, the flags and the torch version, so a stale build is never loaded. ``LAMB_BUILD_OPS=1 pip install
--no-build-isolation .`` builds them ahead of time into the package instead (``setup.py``).

The kernels register torch ops, not Python modules: ``torch.ops.lamb_cpu.lamb_step_`` / ``lars_step_`` and
``torch.ops.lamb_cuda.lamb_step_`` / ``lars_step_``, and on both the split step for pieces of parameters
(ZeRO partitions, ``norm_reduce`` in ``lamb._fused``): ``lamb_pass_a_`` / ``lamb_pass_b_`` and
``lars_pass_a_`` / ``lars_pass_b_``.

Sources are the repository's ``cuda/`` folder (editable install) or the copy shipped as package data in
``lamb/ops/csrc`` (normal install).

Environment:
    LAMB_BUILD_OPS=1      build the extensions at ``pip install`` (setup.py).
    LAMB_OPS_VERBOSE=1    print the compiler's output while building.
    LAMB_CPU_ISA=base|avx2|avx512  cap the CPU loops picked from cpuid (default: the best the CPU has).
    TORCH_CUDA_ARCH_LIST  GPU architectures of the CUDA build (default: the visible GPUs').
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

import torch

__all__ = [
    "OpBuildError",
    "load_cpu",
    "load_cuda",
    "cpu_status",
    "cuda_status",
    "is_cpu_built",
    "is_cuda_built",
    "source_dir",
    "CPU_SOURCES",
    "CUDA_SOURCES",
    "CPU_CFLAGS",
    "CUDA_NVCC_FLAGS",
]


class OpBuildError(RuntimeError):
    """A fused kernel could not be built or loaded; the message says what is missing and how to fix it."""


CPU_SOURCES = ["lamb_cpu.cpp"]
CUDA_SOURCES = ["lamb_cuda_binding.cpp", "lamb_kernels.cu", "lars_kernels.cu"]
# -O3 and OpenMP; no -march: the AVX2 / AVX-512 loops are selected at run time (see cuda/lamb_cpu.cpp), so a cached
# build stays valid on another x86-64 machine. -fno-math-errno lets sqrt vectorise (no errno to set).
CPU_CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]
CPU_LDFLAGS = ["-fopenmp"]
# --fmad=false: no contraction into FMAs, so the GPU rounds as the CPU twin and the reference do.
CUDA_NVCC_FLAGS = ["-O3", "--fmad=false", "-std=c++17", "--expt-relaxed-constexpr"]
CUDA_CFLAGS = ["-O3", "-std=c++17"]

_lock = threading.Lock()
_loaded: dict[str, str] = {}


def source_dir() -> Path:
    """The folder holding ``include/lamb_math.h`` and the kernel sources."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent.parent / "cuda"):
        if (cand / "include" / "lamb_math.h").is_file():
            return cand
    raise OpBuildError(
        "lamb: the kernel sources are missing (looked in lamb/ops/csrc and the repository's cuda/); "
        "reinstall the package (pip install lamb) or run from a checkout with its cuda/ folder"
    )


def _files(sources: list[str]) -> list[Path]:
    root = source_dir()
    return [root / s for s in sources]


def _digest(sources: list[str], flags: list[str]) -> str:
    root = source_dir()
    h = hashlib.sha256()
    for f in sorted(glob.glob(str(root / "**" / "*"), recursive=True)):
        p = Path(f)
        if p.is_file() and p.suffix in (".h", ".cuh", ".cpp", ".cu", ".inc"):
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    h.update(" ".join(sources + flags).encode())
    h.update(torch.__version__.encode())
    h.update(str(torch.version.cuda).encode())
    h.update(torch.compiled_with_cxx11_abi().__str__().encode())
    return h.hexdigest()[:12]


def _build_root() -> Path:
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / "lamb"


def _ext_name(kind: str) -> str:
    if kind == "cpu":
        return f"lamb_cpu_{_digest(CPU_SOURCES, CPU_CFLAGS)}"
    return f"lamb_cuda_{_digest(CUDA_SOURCES, CUDA_NVCC_FLAGS + [os.environ.get('TORCH_CUDA_ARCH_LIST', '')])}"


def _prebuilt(kind: str) -> str | None:
    """The ahead-of-time build (``LAMB_BUILD_OPS=1`` at install), if there is one."""
    hits = glob.glob(str(Path(__file__).resolve().parent / f"_lamb_{kind}*.so"))
    return hits[0] if hits else None


def _cached(kind: str) -> str | None:
    name = _ext_name(kind)
    so = _build_root() / name / f"{name}.so"
    # While another process builds, torch.utils.cpp_extension holds a "lock" file in the build directory
    # and the .so may be half written: then go through _jit, which waits for that lock.
    if (so.parent / "lock").exists():
        return None
    return str(so) if so.is_file() else None


def is_cpu_built() -> bool:
    """Whether the CPU kernel is loaded or can be loaded without compiling."""
    try:
        return "cpu" in _loaded or _prebuilt("cpu") is not None or _cached("cpu") is not None
    except OpBuildError:
        return False


def is_cuda_built() -> bool:
    """Whether the CUDA kernel is loaded or can be loaded without compiling."""
    try:
        return "cuda" in _loaded or _prebuilt("cuda") is not None or _cached("cuda") is not None
    except OpBuildError:
        return False


def _cxx() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def cpu_status() -> tuple[bool, str]:
    """``(True, "")`` where the CPU kernel is built or can be built, else ``(False, why and how to fix)``."""
    if is_cpu_built():
        return True, ""
    try:
        source_dir()
    except OpBuildError as e:
        return False, str(e)
    if _cxx() is None:
        return False, ("no C++ compiler found to build the fused CPU kernel (looked for $CXX, c++, g++, clang++); "
                       "install one (e.g. apt-get install g++) or pass fused=False")
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401
        except ImportError:
            return False, "ninja is needed to build the fused CPU kernel; pip install ninja, or pass fused=False"
    return True, ""


def _nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return os.path.join(CUDA_HOME, "bin", "nvcc")
    return shutil.which("nvcc")


def nvcc_version(nvcc: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for tok in out.replace(",", " ").split():
        if tok.startswith("V") and tok[1:2].isdigit():
            parts = tok[1:].split(".")
            return int(parts[0]), int(parts[1])
    return None


def cuda_status(device: torch.device | None = None) -> tuple[bool, str]:
    """``(True, "")`` where the CUDA kernel can run on ``device``, else ``(False, why and how to fix)``."""
    if torch.version.cuda is None:
        return False, (f"this torch ({torch.__version__}) is a CPU-only build; install a CUDA build of torch "
                       "(https://pytorch.org/get-started/locally/) to use the fused CUDA kernels")
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible (torch.cuda.is_available() is False; check the driver and CUDA_VISIBLE_DEVICES)"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 7:
        return False, (f"the fused CUDA kernels need compute capability 7.0 or newer; "
                       f"{torch.cuda.get_device_name(device)} is {major}.{minor}")
    if is_cuda_built():
        return True, ""
    nvcc = _nvcc()
    if nvcc is None:
        return False, ("nvcc was not found (CUDA_HOME unset and no nvcc on PATH); install the CUDA toolkit "
                       f"matching torch's CUDA {torch.version.cuda} and set CUDA_HOME, or pass fused=False")
    ver = nvcc_version(nvcc)
    want = tuple(int(x) for x in torch.version.cuda.split(".")[:2])
    if ver is not None and ver[0] != want[0]:
        return False, (f"nvcc at {nvcc} is CUDA {ver[0]}.{ver[1]} but torch was built with CUDA "
                       f"{torch.version.cuda}; install the matching toolkit and point CUDA_HOME at it")
    if _cxx() is None:
        return False, "no host C++ compiler found for nvcc (install g++), or pass fused=False"
    return True, ""


# The ops that step tensors: each has a device kernel only, and the fake implementation below, so that
# torch.compile can put them in its graph (they return nothing and write only the tensors their schemas mark
# as written, so the fake implementation has nothing to compute).
STEP_OPS = ("lamb_step_", "lars_step_", "lamb_pass_a_", "lamb_pass_b_", "lars_pass_a_", "lars_pass_b_")


def _writes_in_place_only(*args, **kwargs) -> None:
    return None


def _load_library(kind: str, path: str) -> str:
    torch.ops.load_library(path)
    for name in STEP_OPS:
        torch.library.register_fake(f"lamb_{kind}::{name}")(_writes_in_place_only)
    _loaded[kind] = path
    return path


def _jit(kind: str, sources: list[str], **kw) -> str:
    from torch.utils.cpp_extension import load

    name = _ext_name(kind)
    build_dir = _build_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    verbose = os.environ.get("LAMB_OPS_VERBOSE", "0") == "1"
    root = source_dir()
    try:
        load(
            name=name,
            sources=[str(p) for p in _files(sources)],
            extra_include_paths=[str(root), str(root / "include")],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=verbose,
            **kw,
        )
    except Exception as e:  # compiler errors, a missing ninja, a CUDA/torch mismatch
        raise OpBuildError(
            f"lamb: building the fused {kind.upper()} kernel failed ({type(e).__name__}: {e}). "
            f"Build directory: {build_dir}. Set LAMB_OPS_VERBOSE=1 for the compiler output; "
            "pass fused=False to use the non-fused backends."
        ) from e
    so = build_dir / f"{name}.so"
    return str(so)


def load_cpu() -> str:
    """Load (building on first use) the fused CPU kernel; returns the library's path."""
    # loaded: no lock, which torch.compile could not trace (a fused=True optimizer loads its kernel when the
    # group is added, so a compiled step finds it loaded)
    if "cpu" in _loaded:
        return _loaded["cpu"]
    with _lock:
        if "cpu" in _loaded:
            return _loaded["cpu"]
        path = _prebuilt("cpu") or _cached("cpu")
        if path is None:
            ok, why = cpu_status()
            if not ok:
                raise OpBuildError(f"lamb: cannot build the fused CPU kernel: {why}")
            path = _jit("cpu", CPU_SOURCES, extra_cflags=CPU_CFLAGS, extra_ldflags=CPU_LDFLAGS)
        return _load_library("cpu", path)


def load_cuda() -> str:
    """Load (building on first use) the fused CUDA kernel; returns the library's path."""
    if "cuda" in _loaded:  # as load_cpu
        return _loaded["cuda"]
    with _lock:
        if "cuda" in _loaded:
            return _loaded["cuda"]
        ok, why = cuda_status()
        if not ok:
            raise OpBuildError(f"lamb: the fused CUDA kernel cannot run here: {why}")
        path = _prebuilt("cuda") or _cached("cuda")
        if path is None:
            path = _jit("cuda", CUDA_SOURCES, extra_cflags=CUDA_CFLAGS, extra_cuda_cflags=CUDA_NVCC_FLAGS)
        return _load_library("cuda", path)
