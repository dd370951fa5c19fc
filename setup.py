"""Packaging: the Python package (its Triton kernels in ``semask_fast/kernels``) and the C++/CUDA
sources (``csrc/`` -> ``semask_fast.csrc``, compiled just in time).

A pure install never compiles anything and works with or without a GPU or nvcc.
``SEMASK_FAST_BUILD_CUDA=1`` additionally builds the CUDA kernels (csrc/ops/*.cu) with nvcc for
sm_80 and sm_90 ahead of time (needs torch with CUDA and CUDA_HOME), instead of on first use.
"""

import os
import sys
from pathlib import Path

from setuptools import setup


def _cuda_extensions():
    if os.environ.get("SEMASK_FAST_BUILD_CUDA") != "1":
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    # semask_fast/_build.py (flags, library names, generated instance units) from this checkout: its
    # ops' CUDA backends declare the instances a source is compiled as (INSTANCES).
    root = Path(__file__).resolve().parent
    sys.path.insert(0, str(root))
    from semask_fast import _build as build

    csrc = root / "csrc"
    extensions = []
    for src in sorted((csrc / "ops").glob("*.cu")):
        units_dir = root / "build" / "semask_fast_units" / src.stem
        units = build.write_generated("cuda", src, units_dir)
        extensions.append(CUDAExtension(
            name=build.prebuilt_module(src, csrc), sources=[str(f.relative_to(root)) for f in [src] + units],
            include_dirs=[str(csrc / "include"), str(units_dir), str(csrc)],
            extra_compile_args={"cxx": ["-O2", "-std=c++20"], "nvcc": list(build.CUDA_CFLAGS)}))
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
