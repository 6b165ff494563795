"""Packaging hooks that pyproject.toml cannot express: ship the kernel sources, optionally prebuild them.

* The CUDA/C++ sources in ``cuda/`` are copied into the package as ``lamb/ops/csrc`` so that a normal
  (non-editable) install can still build the kernels just in time (``lamb.ops.source_dir``).
* ``LAMB_BUILD_OPS=1 pip install --no-build-isolation .`` compiles the CPU kernel (and, with a CUDA
  build of torch, the CUDA kernel) ahead of time into ``lamb/ops/_lamb_{cpu,cuda}*.so``; torch must be
  importable at build time, hence ``--no-build-isolation``. Without the variable nothing is compiled.
"""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithKernelSources(build_py):
    def run(self):
        super().run()
        dest = Path(self.build_lib) / "lamb" / "ops" / "csrc"
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(ROOT / "cuda", dest, ignore=shutil.ignore_patterns("*.o", "__pycache__"))


cmdclass = {"build_py": BuildPyWithKernelSources}
ext_modules = []
if os.environ.get("LAMB_BUILD_OPS", "0") == "1":
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    import importlib.util

    spec = importlib.util.spec_from_file_location("_lamb_ops_flags", ROOT / "lamb" / "ops" / "__init__.py")
    flags = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flags)
    inc = [str(ROOT / "cuda"), str(ROOT / "cuda" / "include")]
    ext_modules.append(CppExtension(
        "lamb.ops._lamb_cpu", [f"cuda/{s}" for s in flags.CPU_SOURCES], include_dirs=inc,
        extra_compile_args=flags.CPU_CFLAGS, extra_link_args=flags.CPU_LDFLAGS))
    if torch.version.cuda is not None:
        ext_modules.append(CUDAExtension(
            "lamb.ops._lamb_cuda", [f"cuda/{s}" for s in flags.CUDA_SOURCES], include_dirs=inc,
            extra_compile_args={"cxx": flags.CUDA_CFLAGS, "nvcc": flags.CUDA_NVCC_FLAGS}))
    cmdclass["build_ext"] = BuildExtension.with_options(no_python_abi_suffix=False)

setup(cmdclass=cmdclass, ext_modules=ext_modules)
