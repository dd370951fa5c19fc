"""The native cpu backend's build: the instruction set is chosen per machine, the portable path works."""

import os
import subprocess
import sys

import pytest

from semask_fast import _build
from tests.conftest import require_backend


def test_build_hash_names_isa_and_cpu(monkeypatch):
    """A cache shared by machines of different CPUs never hands one a library built for another,
    and the portable build is a different library from the native one."""
    native = _build.library_path("cpu", "cpu/window_attention.cpp")
    monkeypatch.setattr(_build, "cpu_features", lambda: "another CPU|sse2")
    assert _build.library_path("cpu", "cpu/window_attention.cpp") != native
    monkeypatch.undo()
    monkeypatch.setenv("SEMASK_FAST_CPU_ISA", "portable")
    assert "-march=native" not in _build.cpu_isa_flags()
    assert _build.library_path("cpu", "cpu/window_attention.cpp") != native


def test_unknown_isa_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("SEMASK_FAST_CPU_ISA", "avx9000")
    with pytest.raises(ValueError, match="SEMASK_FAST_CPU_ISA='avx9000'"):
        _build.cpu_isa()


_PORTABLE_CHECK = """
import torch, semask_fast
from semask_fast.testing import assert_parity, small_cases
for case in small_cases():
    if case.op in ("window_attention", "semantic_attention"):
        gen = torch.Generator().manual_seed(0)
        assert_parity(case.fn, case.tensors(gen), case.grad_names, torch.float32, backend="cpu", op=case.op)
print("portable ok")
"""


@pytest.mark.slow
def test_portable_build_passes_parity():
    """SEMASK_FAST_CPU_ISA=portable (the compiler's baseline, e.g. SSE2 on x86-64: 4-lane vectors,
    no FMA, the generic exp) builds and matches the reference."""
    require_backend("window_attention", "cpu")
    env = dict(os.environ, SEMASK_FAST_CPU_ISA="portable")
    done = subprocess.run([sys.executable, "-c", _PORTABLE_CHECK], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0 and "portable ok" in done.stdout, done.stdout[-2000:] + done.stderr[-4000:]
