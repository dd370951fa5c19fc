"""Every kernel of csrc/ops under AddressSanitizer and UndefinedBehaviorSanitizer (the ``asan``
build flavour, see ``semask_fast._build``): out-of-bounds and use-after-free on tensors, dynamic
shared memory and fiber stacks, misaligned vector loads and stores, and the rest of UBSan.

A process can load an asan library only with the ASan runtime preloaded, and a finding ends the
process with its report: each test runs its kernels in a child Python started with
``_build.asan_environment()`` (whose ``simt`` backend runs the asan build), and asserts that it
exited cleanly, wrote no sanitizer report, ran the simt backend on the asan library and matched
the float64 reference (``semask_fast.testing.check_parity``).  The sanitized libraries are built in
this process first, cached like every flavour.

The cases, forward and backward in float32 and float16: ``testing.small_cases()`` of each op the
CUDA sources implement (window attention with the in-kernel shift mask and with an explicit mask,
partition, merge, semantic, ATM and mask similarity attention); every vector width of
window_process's copies and a misaligned input; and the attention kernels' other paths
(:func:`_wider_cases`).  Three planted faults (a read past a tensor, a write past the launch's
dynamic shared memory, a misaligned float2 load) check that the build reports what it exists for.

Runtime on a 2-core VM: about 55 s with the builds cached (the five ops about 40 s, the faults
about 10 s, each mostly a child's start); building the six sanitized libraries first adds about 4
minutes.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from semask_fast import _build
from tests.conftest import require_toolchain

pytestmark = pytest.mark.harness

ROOT = Path(__file__).resolve().parents[2]
DTYPES = {"float32": torch.float32, "float16": torch.float16}
#: What a sanitizer writes when it finds something (ASan's "ERROR: AddressSanitizer: ...", UBSan's
#: "file:line:col: runtime error: ...").
REPORT_MARKERS = ("ERROR: AddressSanitizer", "runtime error:", "AddressSanitizer: CHECK failed")


def _window_process_cases():
    """window_process.cu beyond its small cases: every vector width of the copy (fp16 rows of 2
    to 24 bytes) and an input view starting one element into its storage (2-byte aligned)."""
    import semask_fast
    from semask_fast.testing import Case, _randn

    def partition(backend, x):
        return semask_fast.window_partition(x, (4, 5), (2, 1), True, backend=backend)

    def merge_view(backend, flat):
        return semask_fast.window_merge(flat[1:].view(2 * 9, 4, 5, 8), (4, 5), (1, 2), 10, 13, False,
                                        backend=backend)

    cases = [Case("window_partition", f"2x9x11x{c}, window 4x5, shift 2x1", partition,
                  lambda g, c=c: dict(x=_randn(g, 2, 9, 11, c)), ("x",), exact=True) for c in (1, 2, 4, 8, 12)]
    cases.append(Case("window_merge", "a view one element into its storage", merge_view,
                      lambda g: dict(flat=_randn(g, 1 + 2 * 9 * 4 * 5 * 8)), ("flat",), exact=True))
    return cases


def _wider_cases():
    """The kernels' other paths: window attention on 7x7 windows (packed
    rows), with idle warps (N = 4), at the fused backward's limits (N = 64, head_dim 64) and past
    them (N = 65, head_dim 65); ATM with a single query at head_dim 128 and 150 queries over 600
    keys; semantic attention with 150 classes over three C tiles; mask similarity past one 64-class
    tile, with and without the LayerNorm."""
    import semask_fast
    from semask_fast.testing import Case, _randn

    def window(b_, h, ws, d, shift, grid):
        n = ws[0] * ws[1]

        def fn(backend, q, k, v, bias_table):
            return semask_fast.window_attention(q, k, v, bias_table, window_size=ws, shift_size=shift, grid=grid,
                                                backend=backend)

        def tensors(g):
            t = {nm: _randn(g, b_, h, n, d) for nm in ("q", "k", "v")}
            return dict(t, bias_table=_randn(g, (2 * ws[0] - 1) * (2 * ws[1] - 1), h))

        return Case("window_attention", f"{b_}x{h} heads, window {ws[0]}x{ws[1]}, d={d}, shift {shift}", fn, tensors,
                    ("q", "k", "v", "bias_table"))

    def atm(b, h, nq, nk, d):
        return Case("atm_attention", f"B={b}, h={h}, Nq={nq}, Nk={nk}, d={d}",
                    lambda backend, **t: semask_fast.atm_attention(backend=backend, **t),
                    lambda g: dict(q=_randn(g, b, h, nq, d), k=_randn(g, b, h, nk, d), v=_randn(g, b, h, nk, d)),
                    ("q", "k", "v"))

    def semantic(b_, n, k, c):
        return Case("semantic_attention", f"{b_} windows N={n}, K={k}, C={c}",
                    lambda backend, **t: semask_fast.semantic_attention(backend=backend, **t),
                    lambda g: dict(sq=_randn(g, b_, n, k, std=k ** -0.25), sk=_randn(g, b_, n, k, std=k ** -0.25),
                                   yv=_randn(g, b_, n, c)), ("sq", "sk", "yv"))

    def similarity(b, n, k, d, norm):
        def fn(backend, patches, classes, w=None, b=None):
            return semask_fast.mask_similarity(patches, classes, norm=norm, norm_weight=w, norm_bias=b,
                                               backend=backend)

        def tensors(g):
            t = dict(patches=_randn(g, b, n, d), classes=_randn(g, b, k, d))
            return dict(t, w=1 + _randn(g, k, std=0.1), b=_randn(g, k, std=0.1)) if norm else t

        return Case("mask_similarity", f"B={b}, Np={n}, K={k}, D={d}" + (", with mask_norm" if norm else ""), fn,
                    tensors, ("patches", "classes", "w", "b") if norm else ("patches", "classes"))

    return [
        window(6, 3, (7, 7), 32, (3, 3), (2, 3)),
        window(3, 5, (2, 2), 40, (0, 0), None),
        window(4, 2, (8, 8), 64, (4, 4), (2, 2)),
        window(4, 2, (13, 5), 16, (6, 2), (2, 2)),
        window(2, 2, (4, 4), 65, (0, 0), None),
        atm(1, 1, 1, 40, 128),
        atm(1, 2, 150, 600, 32),
        semantic(2, 45, 150, 257),
        semantic(1, 71, 19, 384),
        similarity(2, 100, 150, 64, True),
        similarity(1, 37, 70, 40, False),
    ]


def cases(source: str):
    """The parity cases of the ops implemented by ``csrc/ops/<source>``."""
    from semask_fast.backends import registry
    from semask_fast.testing import small_cases

    found = small_cases() + _window_process_cases() + _wider_cases()
    return [c for c in found if _simt_source(registry, c.op) == source]


def _simt_source(registry, op):
    impl = registry.implementation(op, "simt")
    return impl.source_name() if impl is not None else None


def run_cases(source: str, dtypes) -> None:
    """Child process: run ``source``'s cases on the simt backend, one JSON line per check."""
    from semask_fast.testing import check_parity

    for case in cases(source):
        for dtype in dtypes:
            results = check_parity(case.fn, case.tensors(torch.Generator().manual_seed(0)), case.grad_names,
                                   DTYPES[dtype], backend="simt", op=case.op, exact=case.exact)
            print(json.dumps(dict(case=f"{case.op}: {case.name}", dtype=dtype, ok=all(r.ok for r in results),
                                  detail="; ".join(map(str, results)))), flush=True)
    print(json.dumps(dict(library=str(_build.loaded_library("simt", source)))), flush=True)


def run_fault(fault: int) -> None:
    """Child process: the planted fault ``fault`` of csrc/harness/selftest.cu (-1: none)."""
    lib = _build.load("asan", "harness/selftest.cu")
    # A larger launch first: the next one's dynamic shared memory is then the start of a larger
    # buffer of this host thread, past which only the harness's poisoning catches a write.
    lib.selftest_fault(torch.zeros(1024), -1)
    x = torch.arange(64, dtype=torch.float32)
    out = lib.selftest_fault(x, fault)
    print(json.dumps(dict(equal=bool(torch.equal(out, x)))), flush=True)


def _child(call: str, timeout: float = 900) -> subprocess.CompletedProcess:
    code = f"from tests.harness.test_asan import *; {call}"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_build.asan_environment(),
                          capture_output=True, text=True, timeout=timeout)


def _lines(stdout: str):
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def _report(stderr: str) -> str:
    """The sanitizer's report in ``stderr`` (from its first line; empty when there is none)."""
    starts = [stderr.find(m) for m in REPORT_MARKERS if m in stderr]
    return stderr[max(0, min(starts) - 300):][:6000] if starts else ""


@pytest.fixture(scope="module", autouse=True)
def asan_toolchain():
    require_toolchain("asan", "simt")


SOURCES = [
    pytest.param("window_process.cu", id="window_process"),
    pytest.param("window_attention.cu", id="window_attention"),
    pytest.param("semantic_attention.cu", id="semantic_attention"),
    pytest.param("atm_attention.cu", id="atm_attention"),
    pytest.param("mask_similarity.cu", id="mask_similarity"),
]


@pytest.mark.parametrize("source", SOURCES)
def test_kernels_run_clean_under_asan(source):
    _build.build("asan", source)
    expected = [(c.op, c.name) for c in cases(source)]
    assert expected, f"no simt op is implemented by {source}"
    proc = _child(f"run_cases({source!r}, {list(DTYPES)!r})")
    report = _report(proc.stderr)
    assert not report, f"{source}: sanitizer report:\n{report}"
    assert proc.returncode == 0, f"{source}: exit status {proc.returncode}:\n{proc.stderr[-6000:]}"
    lines = _lines(proc.stdout)
    checks, library = lines[:-1], lines[-1]["library"]
    assert Path(library).parent.name.startswith("asan-"), f"the simt backend ran {library}, not the asan build"
    assert [(c["case"], c["dtype"]) for c in checks] == [(f"{op}: {name}", d) for op, name in expected for d in DTYPES]
    bad = [f"{c['case']} ({c['dtype']}): {c['detail']}" for c in checks if not c["ok"]]
    assert not bad, "\n".join(bad)


#: (fault, what ASan or UBSan must report): see fault_kernel in csrc/harness/selftest.cu.
FAULTS = [
    pytest.param(0, "heap-buffer-overflow", id="read-past-tensor"),
    pytest.param(1, "use-after-poison", id="write-past-dynamic-shared-memory"),
    pytest.param(2, "misaligned address", id="misaligned-float2"),
]


def test_clean_selftest_passes():
    _build.build("asan", "harness/selftest.cu")
    proc = _child("run_fault(-1)")
    assert not _report(proc.stderr) and proc.returncode == 0, proc.stderr[-6000:]
    assert _lines(proc.stdout) == [dict(equal=True)]


@pytest.mark.parametrize("fault,finding", FAULTS)
def test_planted_fault_is_reported(fault, finding):
    _build.build("asan", "harness/selftest.cu")
    proc = _child(f"run_fault({fault})")
    report = _report(proc.stderr)
    assert proc.returncode != 0 and _lines(proc.stdout) == [], "the fault ran to completion"
    assert finding in report, f"expected {finding!r}, got:\n{report or proc.stderr[-6000:]}"
    assert "selftest.cu:" in report  # the report points at the kernel's line


def test_asan_library_is_not_loaded_without_its_runtime():
    # Loading it would make ASan end this process; load() refuses with the reason instead.
    _build.build("asan", "window_process.cu")
    if _build.asan_runtime_loaded():
        pytest.skip("this process runs with the ASan runtime")
    with pytest.raises(_build.BuildError, match="AddressSanitizer runtime is not loaded"):
        _build.load("asan", "window_process.cu")
