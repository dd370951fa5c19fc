"""The traffic tracer of the SIMT harness (csrc/harness/sf_trace.h, the ``trace`` build flavour).

benchmarks/traffic_cuda.py reports the CUDA kernels' memory traffic from it, so it must count
exactly: a window partition reads every input byte once and writes every output byte once, pads
included, whatever the geometry.  These numbers come from the tensors' sizes, not from a table.
"""

import pytest
import torch

from semask_fast import _build
from semask_fast._traffic import harness_bytes
from semask_fast.ops.window_process import padded_grid
from tests.conftest import require_toolchain

pytestmark = pytest.mark.harness


@pytest.fixture(scope="module", autouse=True)
def trace_build():
    require_toolchain("trace", "simt")
    _build.load("trace", "window_process.cu")


@pytest.mark.parametrize("B,H,W,C,ws,shift,dtype", [
    (2, 14, 14, 32, 7, 3, torch.float32),   # no padding
    (1, 13, 11, 24, 7, 3, torch.float16),   # pads on both axes
    (3, 9, 16, 8, 4, 0, torch.bfloat16),    # no shift
])
def test_partition_counts_every_byte_once(B, H, W, C, ws, shift, dtype):
    x = torch.randn(B, H, W, C).to(dtype)
    result = {}
    traffic = harness_bytes("window_process.cu", lambda lib: result.update(
        y=lib.window_partition_forward(x, ws, ws, shift, shift, True)), [x])
    nWh, nWw = padded_grid(H, W, (ws, ws))
    out_bytes = B * nWh * nWw * ws * ws * C * x.element_size()
    assert result["y"].nbytes == out_bytes
    assert traffic.launches == 1
    assert (traffic.read, traffic.read_issued) == (x.nbytes, x.nbytes)
    assert (traffic.written, traffic.written_issued) == (out_bytes, out_bytes)


def test_unique_bytes_are_per_launch():
    # Partition then merge back inside one trace: the window tensor is written by the first launch
    # and read by the second; the image is read by the first and rewritten by the second.
    x = torch.randn(1, 14, 14, 16)

    def run(lib):
        y = lib.window_partition_forward(x, 7, 7, 3, 3, True)
        lib.window_merge_forward(y, 14, 14, 7, 7, 3, 3, True)

    traffic = harness_bytes("window_process.cu", run, [x])
    assert traffic.launches == 2
    assert traffic.read == 2 * x.nbytes and traffic.written == 2 * x.nbytes


def test_read_modify_write_and_atomics():
    # A non-atomic out[i] += x[i] counts the store too (AddressSanitizer's instrumentation drops a
    # store check dominated by a load of the same address; the trace flavour must not); atomics are
    # a read and a write.  Unique bytes count each address once per launch.
    x, reps = torch.randn(100), 3
    result = {}
    traffic = harness_bytes("harness/selftest.cu", lambda lib: result.update(y=lib.selftest_accumulate(x, reps)), [x])
    assert torch.equal(result["y"], x * reps)  # x + x + x rounds once, as x * 3
    assert (traffic.read, traffic.written) == (2 * x.nbytes, x.nbytes)
    assert traffic.read_issued >= traffic.read and traffic.written_issued >= traffic.written

    blocks, threads = 3, 64
    traffic = harness_bytes("harness/selftest.cu", lambda lib: lib.selftest_atomics(blocks, threads), [])
    counters = 4 + 8 + 4 + 8  # float, double, int, unsigned long long
    assert (traffic.read, traffic.written) == (counters, counters)
    assert traffic.written_issued == blocks * threads * counters


def test_needs_one_host_thread(monkeypatch):
    lib = _build.load("trace", "window_process.cu")
    monkeypatch.setenv("SF_SIMT_THREADS", "2")
    with pytest.raises(RuntimeError, match="SF_SIMT_THREADS=1"):
        lib.trace_begin([torch.zeros(4)])


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm-affine"])
def test_mask_similarity_reads_each_tensor_once_per_launch(norm):
    # The kernels' design, checked on their code: the forward is one launch reading P and C once
    # (both norms from the staged tiles); the backward is two launches (dS with dP, then dC), each
    # reading P and C once, and its only large intermediate is G = dS, the size of the output.
    B, N, K, D = 2, 70, 19, 40
    g = torch.Generator().manual_seed(0)
    P, C = torch.randn(B, N, D, generator=g).half(), torch.randn(B, K, D, generator=g).half()
    dY = torch.randn(B, N, K, generator=g).half()
    w, b = (torch.randn(K, generator=g), torch.randn(K, generator=g)) if norm else (None, None)
    inputs = [t for t in (P, C, dY, w, b) if t is not None]
    out = {}

    def by_tensor(regions):
        return {r["begin"]: r for r in regions}

    regions = []
    fwd = harness_bytes("mask_similarity.cu", lambda lib: out.update(
        y=lib.mask_similarity_forward(P, C, w, b, norm, 1e-5)), inputs, regions)
    seen = by_tensor(regions)
    assert fwd.launches == 1
    assert seen[P.data_ptr()]["read"] == P.nbytes and seen[C.data_ptr()]["read"] == C.nbytes
    assert seen[out["y"].data_ptr()]["written"] == out["y"].nbytes

    regions = []
    bwd = harness_bytes("mask_similarity.cu", lambda lib: out.update(
        grads=lib.mask_similarity_backward(dY, P, C, w, norm, 1e-5)), inputs, regions)
    seen = by_tensor(regions)
    assert bwd.launches == 2
    assert seen[P.data_ptr()]["read"] == 2 * P.nbytes and seen[C.data_ptr()]["read"] == 2 * C.nbytes
    assert seen[dY.data_ptr()]["read"] == dY.nbytes
    dP, dC = out["grads"][:2]
    assert seen[dP.data_ptr()]["written"] == dP.nbytes and seen[dC.data_ptr()]["written"] == dC.nbytes
    workspace = [r for r in regions if r["allocated"] and r["begin"] not in (dP.data_ptr(), dC.data_ptr())]
    G = max(workspace, key=lambda r: r["bytes"])
    assert (G["bytes"], G["written"], G["read"]) == (dY.nbytes, dY.nbytes, dY.nbytes)
    assert sum(r["bytes"] for r in workspace) - G["bytes"] < dY.nbytes  # the fp32 norms and partials
