"""Packaging: the Python package, the Triton kernels (``kernels/`` -> ``semask_fast.kernels``)
and the C++/CUDA sources (``csrc/`` -> ``semask_fast.csrc``, compiled just in time).

A pure install never compiles anything and works with or without a GPU or nvcc.
"""

from setuptools import setup

setup(
    packages=[
        "semask_fast",
        "semask_fast.backends",
        "semask_fast.backends.triton",
        "semask_fast.ops",
        "semask_fast.nn",
        "semask_fast.models",
        "semask_fast.kernels",
        "semask_fast.csrc",
    ],
    package_dir={"semask_fast.kernels": "kernels", "semask_fast.csrc": "csrc"},
    package_data={"semask_fast.csrc": ["**/*.cu", "**/*.cuh", "**/*.h", "**/*.cpp", "**/*.hpp"]},
)
