"""The traffic tracer of the SIMT harness (csrc/harness/sf_trace.h, the ``trace`` build flavour).

benchmarks/traffic_cuda.py reports the CUDA kernels' memory traffic from it, so it must count
exactly: a window partition reads every input byte once and writes every output byte once, pads
included, whatever the geometry.  These numbers come from the tensors' sizes, not from a table.
"""

import sys
from pathlib import Path

import pytest
import torch

from semask_fast import _build
from semask_fast.ops.window_process import padded_grid

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.traffic import harness_bytes  # noqa: E402

pytestmark = pytest.mark.harness


@pytest.fixture(scope="module", autouse=True)
def trace_build():
    if _build.toolchain_reasons("trace"):
        pytest.skip("; ".join(_build.toolchain_reasons("trace")))
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
    torch.testing.assert_close(result["y"], x * reps)
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
