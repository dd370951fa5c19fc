"""Packaging: the Python package (its Triton kernels in ``semask_fast/kernels``) and the C++/CUDA
sources (``csrc/`` -> ``semask_fast.csrc``, compiled just in time).

A pure install never compiles anything and works with or without a GPU or nvcc.
``SEMASK_FAST_BUILD_CUDA=1`` additionally builds the CUDA kernels (csrc/ops/*.cu) with nvcc for
sm_80 and sm_90 ahead of time (needs torch with CUDA and CUDA_HOME), instead of on first use.
"""

import importlib.util
import os
from pathlib import Path

from setuptools import setup


def _cuda_extensions():
    if os.environ.get("SEMASK_FAST_BUILD_CUDA") != "1":
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    # semask_fast/_build.py (flags, library names) without importing the package.
    root = Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location("_semask_fast_build", root / "semask_fast" / "_build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    csrc = root / "csrc"
    extensions = [
        CUDAExtension(name=build.prebuilt_module(src, csrc), sources=[str(src.relative_to(root))],
                      include_dirs=[str(csrc / "include")],
                      extra_compile_args={"cxx": ["-O2", "-std=c++20"], "nvcc": list(build.CUDA_CFLAGS)})
        for src in sorted((csrc / "ops").glob("*.cu"))
    ]
    return {"ext_modules": extensions, "cmdclass": {"build_ext": BuildExtension}}


setup(
    packages=[
        "semask_fast",
        "semask_fast.backends",
        "semask_fast.backends.triton",
        "semask_fast.backends.cuda",
        "semask_fast.backends.cpu",
        "semask_fast.ops",
        "semask_fast.nn",
        "semask_fast.models",
        "semask_fast.kernels",
        "semask_fast.csrc",
    ],
    package_dir={"semask_fast.csrc": "csrc"},
    package_data={"semask_fast.csrc": ["**/*.cu", "**/*.cuh", "**/*.h", "**/*.cpp", "**/*.hpp"]},
    **_cuda_extensions(),
)
