"""The builds of csrc/ops/*.cu: the SIMT-harness extension, the nvcc extension for sm_80 and sm_90,
what the backends report, the committed ptxas resource table (no spills), and the instances an op
declares (INSTANCES of its CUDA backend): the one owner of its size limit (the backends' reasons,
the generated header the .cu checks and dispatches with), in the build hash, compiled as units of
their own beside the .cu into its one library."""

import importlib
import re
import shutil
import subprocess

from pathlib import Path

import pytest
import torch

import semask_fast
from benchmarks import cuda_resources
from semask_fast import _build
from semask_fast.backends import registry
from semask_fast.backends.base import record_dispatch
from semask_fast.backends.cuda import SimtImpl
from semask_fast.backends.registry import BackendNotSupportedError
from semask_fast.ops.atm_attention import ATMAttentionInputs
from semask_fast.ops.semantic_attention import SemanticAttentionInputs
from semask_fast.ops.window_attention import WindowAttentionInputs
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
    _assert_units_linked_into_one_library("cuda", source)


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
    shutil.copytree(_build.csrc_dir() / "common", src / "common")
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
    # Every kernel of an op's headers is compiled for both architectures (a launch that only host code
    # sees, e.g. in the bindings' host-only section, leaves its kernel without device code).
    for header in sorted((_build.csrc_dir() / "include").glob("sf_*_attention_*.cuh")):
        source = header.stem.removeprefix("sf_").rsplit("_", 1)[0] + ".cu"
        for kernel in re.findall(r"__global__[^{;]*?\b(\w+_kernel)\s*\(", header.read_text()):
            archs = {r["arch"] for r in rows if r["source"] == source and re.search(rf"\b{kernel}\b", r["kernel"])}
            assert archs == {"sm_80", "sm_90"}, f"{source}: {kernel} compiled for {sorted(archs)}"
    spills = {(r["source"], r["kernel"], r["arch"]) for r in rows if r["spill_stores"] or r["spill_loads"]}
    new = sorted(" ".join(k) for k in spills - KNOWN_SPILLS)
    assert not new, "kernels spill registers: " + ", ".join(new)
    fixed = sorted(" ".join(k) for k in KNOWN_SPILLS - spills)
    assert not fixed, "no longer spill, remove from KNOWN_SPILLS: " + ", ".join(fixed)


# ------------------------------------------------------------------ declared instances --
#: The ops whose CUDA backend declares its instances (INSTANCES).
INSTANCED_OPS = ("window_attention", "atm_attention", "semantic_attention")


def _declared(op):
    module = importlib.import_module(f"semask_fast.backends.cuda.{op}")
    return module, module.INSTANCES


def _call_with_size(op, size):
    """(inputs, call(backend)) of ``op`` whose padded size (head_dim, or K classes) is ``size``."""
    if op == "semantic_attention":
        s, y = torch.randn(1, 4, size), torch.randn(1, 4, 8)
        return SemanticAttentionInputs(sq=s, sk=s, yv=y), lambda b: semask_fast.semantic_attention(s, s, y, backend=b)
    q = torch.randn(1, 2, 4, size)
    if op == "atm_attention":
        return (ATMAttentionInputs(q=q, k=q, v=q, scale=0.1, dropout_p=0.0),
                lambda b: semask_fast.atm_attention(q, q, q, backend=b))
    inp = WindowAttentionInputs(q=q, k=q, v=q, bias_table=None, mask=None, window_size=(2, 2), shift_size=(0, 0),
                                grid=None, scale=0.1, mask_value=-100.0, dropout_p=0.0)
    return inp, lambda b: semask_fast.window_attention(q, q, q, window_size=2, backend=b)


def _no_build(*args, **kwargs):
    raise AssertionError("input_reasons built a library")


@pytest.mark.parametrize("op", INSTANCED_OPS)
def test_declared_instances_are_the_one_owner_of_the_limit(monkeypatch, op):
    """The cuda and simt backends refuse a size above the largest declared tile, with the reason,
    without building anything; the limit follows the declaration; the .cu has no copy of the
    number (its check and dispatch use the generated header's)."""
    module, declared = _declared(op)
    label = "K" if op == "semantic_attention" else "head_dim"
    monkeypatch.setattr(_build, "load", _no_build)
    over, _ = _call_with_size(op, declared.limit + 1)
    for backend in ("cuda", "simt"):
        impl = registry.implementation(op, backend)
        (reason,) = impl.input_reasons(over)
        assert reason.startswith(f"{label}={declared.limit + 1} ") and f"(supported: 1..{declared.limit})" in reason
    cuda = registry.implementation(op, "cuda")
    assert cuda.input_reasons(_call_with_size(op, declared.limit)[0]) == []  # CPU inputs: no device check either
    smaller = _build.Instances(declared.name, declared.tiles[:-1])
    monkeypatch.setattr(module, "INSTANCES", smaller)
    (reason,) = cuda.input_reasons(_call_with_size(op, smaller.limit + 1)[0])
    assert f"(supported: 1..{smaller.limit})" in reason
    header = _build.generated_files(_build.source_path(op + ".cu"), declared)[f"sf_{op}_instances.h"]
    assert f"#define SF_{op.upper()}_MAX_{declared.name.upper()} {declared.limit}\n" in header
    source = (_build.csrc_dir() / "ops" / f"{op}.cu").read_text()
    assert not re.search(rf"\b{declared.limit}\b", source), f"{op}.cu repeats the limit {declared.limit}"
    assert f"SF_{op.upper()}_MAX_{declared.name.upper()}" in source and f"SF_{op.upper()}_INSTANCES" in source


@pytest.mark.harness
@pytest.mark.parametrize("op", INSTANCED_OPS)
def test_size_above_the_declared_instances_falls_back(op):
    require_toolchain("simt", "simt")
    _, declared = _declared(op)
    _, call = _call_with_size(op, declared.limit + 1)
    with pytest.raises(BackendNotSupportedError, match=rf"supported: 1\.\.{declared.limit}\)"):
        call("simt")
    with record_dispatch() as ran:
        call("auto")
    assert ran and not {backend for _, backend, _ in ran} & {"cuda", "simt"}, ran


def test_declared_instances_generate_one_unit_each_and_enter_the_build_hash(monkeypatch):
    module, declared = _declared("window_attention")
    source = _build.source_path("window_attention.cu")
    units = sorted(n for n in _build.generated_files(source) if n.endswith(".cu"))
    assert units == sorted(f"window_attention__{d}_{t}.cu" for d in _build.DTYPES for t in declared.tiles)
    before = {f: _build.library_path(f, "window_attention.cu") for f in ("cuda", "simt", "trace", "asan")}
    prebuilt = _build.prebuilt_module(source)
    monkeypatch.setattr(module, "INSTANCES", _build.Instances("head_dim", declared.tiles[:-1]))
    after = {f: _build.library_path(f, "window_attention.cu") for f in before}
    assert all(before[f].parent != after[f].parent for f in before), (before, after)
    assert _build.prebuilt_module(source) != prebuilt
    assert len([n for n in _build.generated_files(source) if n.endswith(".cu")]) == len(units) - len(_build.DTYPES)
    with pytest.raises(ValueError, match="ascending"):
        _build.Instances("head_dim", (64, 32))


def _assert_units_linked_into_one_library(flavour, source):
    """The library of ``source`` links the bindings' object and one object per generated unit, each
    compiled from its own file with no order between them (ninja runs them in parallel)."""
    library = _build.loaded_library(flavour, source) if flavour != "asan" else _build.build(flavour, source)
    ninja = (library.parent / "build.ninja").read_text()
    compiled = dict(re.findall(r"^build (\S+\.o): \w*compile (\S+)$", ninja, re.M))
    units = [n for n in _build.generated_files(_build.source_path(source)) if n.endswith(".cu")]
    assert len(compiled) == 1 + len(units), compiled
    assert {Path(f).stem for f in compiled.values()} >= {Path(u).stem for u in units}
    (linked,) = re.findall(r"^build \S+\.so: link (.*)$", ninja, re.M)
    assert sorted(linked.split()) == sorted(compiled)


@pytest.mark.harness
@pytest.mark.parametrize("source", [op + ".cu" for op in INSTANCED_OPS])
def test_instance_units_are_linked_into_the_one_simt_library(source):
    require_toolchain("simt", "simt")
    _build.load("simt", source)
    _assert_units_linked_into_one_library("simt", source)
