"""The builds of csrc/ops/*.cu: the SIMT-harness extension, the nvcc extension for sm_80 and sm_90,
what the backends report, and the committed ptxas resource table (no spills)."""

import re
import shutil
import subprocess

from pathlib import Path

import pytest
import torch

from benchmarks import cuda_resources
from semask_fast import _build
from semask_fast.backends import registry
from semask_fast.backends.cuda import SimtImpl
from tests.conftest import require_toolchain

SOURCES = [p.name for p in _build.op_sources()]
MY_OPS = ("window_partition", "window_merge", "mask_similarity")


def _schema_names(source):
    return re.findall(r'm\.def\(\s*"(\w+)\(', (_build.csrc_dir() / "ops" / source).read_text())


def test_every_op_source_defines_forward_and_backward():
    for source in SOURCES:
        names = _schema_names(source)
        assert names, f"{source} registers no op"
        assert any(n.endswith("_forward") for n in names) and any(n.endswith("_backward") for n in names), source
        for name in names:  # besides the kernels, only a query of what a shape needs of the device
            assert name.endswith(("_forward", "_backward", "_shared_memory")), \
                f"{source}: op {name} is not <op>_forward/_backward/_shared_memory"


@pytest.mark.harness
@pytest.mark.parametrize("source", SOURCES)
def test_simt_extension_builds_and_loads(source):
    require_toolchain("simt", "simt")
    ns = _build.load("simt", source)
    for name in _schema_names(source):
        assert hasattr(ns, name), f"torch.ops.semask_fast_simt.{name} missing after loading {source}"


def _cuobjdump() -> str:
    """The toolkit's cuobjdump, else the copy bundled with Triton (a minimal toolkit may lack it)."""
    import triton

    for candidate in (_build.cuda_home() / "bin" / "cuobjdump",
                      Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"):
        if candidate.exists():
            return str(candidate)
    pytest.fail("no cuobjdump in the CUDA toolkit nor in Triton's bundle")


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES)
def test_nvcc_extension_builds_for_sm80_and_sm90_and_loads(source):
    require_toolchain("cuda", "cuda")
    if torch.version.cuda is None:
        pytest.skip("torch without CUDA cannot load the nvcc extension")
    ns = _build.load("cuda", source)
    for name in _schema_names(source):
        assert hasattr(ns, name), f"torch.ops.semask_fast_cuda.{name} missing after loading {source}"
    listing = subprocess.run([_cuobjdump(), "--list-elf", str(_build.loaded_library("cuda", source))],
                             capture_output=True, text=True, check=True).stdout
    assert "sm_80" in listing and "sm_90" in listing, listing


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_backend_reports_no_cuda_device():
    for op in MY_OPS:
        assert registry.implementation(op, "cuda") is not None, f"no cuda implementation of {op}"
    for op in registry.OPS:
        if registry.implementation(op, "cuda") is not None:
            assert registry.reasons(op, "cuda") == ["no CUDA device"], op


def test_harness_backend_is_never_picked_automatically():
    x = torch.randn(1, 7, 7, 4)
    from semask_fast.ops.window_process import WindowPartitionInputs

    inp = WindowPartitionInputs(x=x, window_size=(7, 7), shift_size=(0, 0), pad_then_roll=True)
    assert registry.select("window_partition", inp).backend != "simt"
    assert registry.implementation("window_partition", "simt").auto_select is False


def test_build_failure_becomes_an_availability_reason(tmp_path, monkeypatch):
    require_toolchain("simt", "simt")
    src = tmp_path / "csrc"
    shutil.copytree(_build.csrc_dir() / "include", src / "include")
    shutil.copytree(_build.csrc_dir() / "harness", src / "harness")
    (src / "ops").mkdir()
    (src / "ops" / "broken_for_test.cu").write_text('#include "sf_common.cuh"\nstatic int x = not_declared_anywhere;\n')
    monkeypatch.setattr(_build, "csrc_dir", lambda: src)
    monkeypatch.setenv("SEMASK_FAST_BUILD_DIR", str(tmp_path / "build"))

    class Broken(SimtImpl):
        op = "window_partition"
        source = "broken_for_test.cu"

    reasons = Broken().availability_reasons()
    assert len(reasons) == 1 and "broken_for_test.cu failed" in reasons[0] and "not_declared_anywhere" in reasons[0]
    with pytest.raises(_build.BuildError, match="not_declared_anywhere"):
        Broken().library()


#: Kernels whose committed ptxas figures show spills (none left: every kernel is spill-free).
#: The test fails on any spill not listed here AND on a listed kernel that no longer
#: spills, so the list can only shrink by fixing kernels, never grow silently.
KNOWN_SPILLS: set = set()  # empty: every kernel of the table is spill-free


def test_resource_table_has_every_kernel_and_no_spills():
    rows = cuda_resources.read_table()
    assert rows, f"no CUDA rows in {cuda_resources.RESULTS}: run benchmarks/cuda_resources.py"
    for source in SOURCES:
        archs = {r["arch"] for r in rows if r["source"] == source}
        assert archs == {"sm_80", "sm_90"}, f"{source}: table has {sorted(archs)} (rerun cuda_resources.py)"
    spills = {(r["source"], r["kernel"], r["arch"]) for r in rows if r["spill_stores"] or r["spill_loads"]}
    new = sorted(" ".join(k) for k in spills - KNOWN_SPILLS)
    assert not new, "kernels spill registers: " + ", ".join(new)
    fixed = sorted(" ".join(k) for k in KNOWN_SPILLS - spills)
    assert not fixed, "no longer spill, remove from KNOWN_SPILLS: " + ", ".join(fixed)
