"""The CPU SIMT harness itself: CUDA semantics of the runtime that runs csrc/ops/*.cu in CI.

The kernels are in csrc/harness/selftest.cu (harness build only).  Each test compares a kernel's
result with values computed here independently, or checks that a deliberately broken kernel is
caught: a missing ``__syncthreads()`` gives wrong results under the seeded shuffle of thread
order, a barrier not every thread reaches raises instead of hanging.

Also the pieces of the CUDA sources that belong to no single op: their dropout hash (Philox) against
its known-answer vector, the keep rate of its host replay, and the reasons the ``simt`` backend gives
for inputs no kernel serves.  Each op's CUDA-source tests are in the "cuda sources" section of
tests/ops/test_<op>.py (helpers: tests/harness/_cuda_sources.py).
"""

import numpy as np
import pytest
import torch

import semask_fast
from semask_fast import _build, testing
from semask_fast.backends.registry import BackendNotSupportedError
from semask_fast.testing import REORDERED_FP32, assert_close
from tests.conftest import require_backend, require_toolchain
from tests.harness._cuda_sources import BACKEND

pytestmark = pytest.mark.harness


@pytest.fixture(scope="module")
def simt():
    require_toolchain("simt", "simt")
    return _build.load("simt", "harness/selftest.cu")


@pytest.fixture
def seed(monkeypatch):
    """Set SF_SIMT_SEED (read by every launch) for the duration of a test."""

    def set_seed(value):
        monkeypatch.setenv("SF_SIMT_SEED", str(value))

    return set_seed


def _reversed(x, block):
    return x.view(-1, block).flip(1).reshape(-1)


@pytest.mark.parametrize("block", [1, 33, 64, 256])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static-smem", "dynamic-smem"])
def test_barrier_makes_shared_memory_exchange_correct(simt, seed, block, dynamic):
    x = torch.randn(block * 5)
    for s in range(3):
        seed(s)
        assert torch.equal(simt.selftest_reverse(x, block, True, dynamic), _reversed(x, block))


@pytest.mark.parametrize("s", range(4))
def test_missing_barrier_is_caught(simt, seed, s):
    """The barrier removed: threads read shared slots other threads have not written yet."""
    seed(s)
    x = torch.randn(64 * 8)
    out = simt.selftest_reverse(x, 64, False, False)
    wrong = (out != _reversed(x, 64)).float().mean().item()
    assert wrong > 0.2, f"only {wrong:.0%} wrong: the thread order is not shuffled enough"


def test_thread_order_is_seeded(simt, seed):
    # Dynamic shared memory is poisoned per block, so the result of the racy kernel depends only on
    # the order the threads ran in (static shared memory would keep another launch's data).
    x = torch.randn(64 * 8)
    seed(7)
    a = simt.selftest_reverse(x, 64, False, True)
    b = simt.selftest_reverse(x, 64, False, True)
    seed(8)
    c = simt.selftest_reverse(x, 64, False, True)
    assert torch.equal(a.isnan(), b.isnan()), "same seed, different order"
    assert not torch.equal(a.isnan(), c.isnan()), "different seeds, same order"


def test_dynamic_shared_memory_is_poisoned(simt):
    """Reading dynamic shared memory nobody wrote gives NaN, not stale or zero data."""
    out = simt.selftest_reverse(torch.randn(128), 64, True, True, False)
    assert out.isnan().all()


def _warp_expected(x, block, width):
    """Per thread the 8 results of warp_ops_kernel, from the CUDA definitions."""
    vals = x.tolist()
    out = []
    for t, v in enumerate(vals):
        i = t % block
        base = (t // block) * block + (i // 32) * 32
        lanes = min(32, block - (i // 32) * 32)
        lane = i % 32
        warp = vals[base:base + lanes]
        seg = lane & ~(width - 1)

        def get(src, keep):
            return v if keep or src < 0 or src >= lanes else warp[src]

        xor_src = lane ^ 5
        o = [
            get(xor_src, xor_src & ~(width - 1) != seg),
            get(seg + (3 & (width - 1)), False),
            get(lane + 2, (lane + 2) & ~(width - 1) != seg),
            get(lane - 3, lane - 3 < seg),
        ]
        ballot = sum(1 << l for l, w in enumerate(warp) if w > 0)
        o.append(ballot - (1 << 32) if ballot >= 1 << 31 else ballot)
        o.append(int(any(w > 10 for w in warp)))
        o.append(int(all(w > -10 for w in warp)))
        s = list(warp)
        for m in (16, 8, 4, 2, 1):
            s = [s[l] + (s[l ^ m] if (l ^ m) < lanes else s[l]) for l in range(lanes)]
        o.append(s[lane])
        out.append(o)
    return torch.tensor(out, dtype=torch.int32)


@pytest.mark.parametrize("block,width", [(64, 32), (96, 8), (32, 16), (48, 32), (40, 4)],
                         ids=["2-warps", "width-8", "width-16", "partial-warp", "partial-width-4"])
def test_warp_primitives(simt, seed, block, width):
    gen = torch.Generator().manual_seed(block + width)
    x = torch.randint(-8, 20, (block * 3,), generator=gen, dtype=torch.int32)
    for s in range(2):
        seed(s)
        assert torch.equal(simt.selftest_warp_ops(x, block, width), _warp_expected(x, block, width))


@pytest.mark.parametrize("threads", [32, 128, 1024])
def test_block_reduction_across_warps(simt, threads):
    x = torch.randint(-100, 100, (6, 1000)).float()  # integers: every summation order is exact
    assert torch.equal(simt.selftest_block_sum(x, threads), x.sum(1))


def test_atomics_from_every_thread_of_every_block(simt, monkeypatch):
    monkeypatch.setenv("SF_SIMT_THREADS", "2")
    f, d, i, u = simt.selftest_atomics(200, 128)
    n = 200 * 128
    assert f.item() == n and d.item() == 0.5 * n and i.item() == 2 * n and u.item() == 3 * n


def test_blocks_run_on_several_host_threads(simt, monkeypatch):
    monkeypatch.setenv("SF_SIMT_THREADS", "2")
    assert simt.selftest_host_threads(512).unique().numel() == 2
    monkeypatch.setenv("SF_SIMT_THREADS", "1")
    assert simt.selftest_host_threads(64).unique().numel() == 1


def test_barrier_not_reached_by_every_thread_raises(simt):
    with pytest.raises(RuntimeError, match="deadlock: 63 threads wait at __syncthreads"):
        simt.selftest_early_exit(64)
    # The runtime is usable after the error.
    x = torch.randn(64)
    assert torch.equal(simt.selftest_reverse(x, 64, True, False), _reversed(x, 64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("trial", range(3))
def test_mma_wrapper_matches_matrix_product(simt, dtype, trial):
    """sf::mma_m16n8k16_f32 and the fragment loaders vs plain products (inputs exact in dtype)."""
    gen = torch.Generator().manual_seed(trial)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    a, b, bt, b2, b3 = rnd(16, 16), rnd(8, 16), rnd(16, 8), rnd(8, 16), rnd(16, 8)
    d, dt, e = simt.selftest_mma(a, b, bt, b2, b3)
    A, B, BT, B2, B3 = (t.double() for t in (a, b, bt, b2, b3))
    # Products of 16-bit floats are exact in fp32; only the fp32 accumulation rounds.
    assert_close(d, A @ B.T, tol=REORDERED_FP32)
    assert_close(dt, A.T @ BT, tol=REORDERED_FP32)
    # acc_to_a_frag rounds the fp32 accumulators to dtype, as a kernel re-using P as an operand; a
    # value on a rounding boundary may round the other way here, hence the dtype's tolerance.
    p = torch.cat([d, (A @ B2.T).float()], dim=1).to(dtype).double()
    assert_close(e, p @ B3, dtype)
    # And the layout is not accidentally symmetric: a transposed A gives a different product.
    assert not torch.allclose(d.double(), A.T @ B.T, atol=1e-2)


# ------------------------------------------------------------ shared-memory limits --
KIB = 1024
STATIC = 16 * KIB  # selftest_shared_memory's static array


def _shared_memory_sums(dynamic):
    """What selftest_shared_memory returns: per thread t of 128, its share of 0..4095 and of 0..dynamic/4-1."""
    t = torch.arange(128)
    fixed = torch.stack([torch.arange(i, 4096, 128).sum() for i in t]).float()
    extra = torch.stack([torch.arange(i, dynamic // 4, 128).sum() for i in t]).float()
    return fixed + extra


@pytest.mark.parametrize("arch,limit", [("sm_86", 99 * KIB), ("sm_89", 99 * KIB), ("sm_80", 163 * KIB),
                                        ("sm_90", 227 * KIB)])
def test_static_and_dynamic_shared_memory_count_against_the_arch_limit(simt, monkeypatch, arch, limit):
    monkeypatch.setenv("SF_SIMT_ARCH", arch)
    like = torch.zeros(1)
    fits = limit - STATIC
    assert torch.equal(simt.selftest_shared_memory(like, fits), _shared_memory_sums(fits))
    # The dynamic part alone fits; with the static array the block is 16 bytes over.
    with pytest.raises(RuntimeError, match=rf"{limit + 16} bytes of shared memory \({STATIC} static.*{arch}"):
        simt.selftest_shared_memory(like, fits + 16)
    with pytest.raises(RuntimeError, match=f"dynamic shared memory.*{arch}"):
        simt.selftest_shared_memory(like, limit + 16)


def test_default_arch_is_sm_90_and_unknown_archs_are_refused(simt, monkeypatch):
    like = torch.zeros(1)
    monkeypatch.delenv("SF_SIMT_ARCH", raising=False)
    simt.selftest_shared_memory(like, 227 * KIB - STATIC)
    monkeypatch.setenv("SF_SIMT_ARCH", "sm_75")
    with pytest.raises(RuntimeError, match="SF_SIMT_ARCH=sm_75"):
        simt.selftest_shared_memory(like, 0)


# -------------------------------------------------- pieces of the CUDA sources shared by several ops --
# The dropout hash of every CUDA source (replayed on the host by the dropout tests of each op) and
# the reasons the simt backend gives for inputs no kernel serves.
def test_philox_known_answer():
    # Random123's known-answer vector for philox4x32-10: counter 0, key 0.
    philox = testing.philox
    assert int(philox(0, np.array([0]))[0]) == 0x6627E8D5


def test_dropout_keep_rate_and_seed():
    keep = testing.dropout_keep
    a = keep(5, (8, 64, 64), 0.25)
    assert abs(a.float().mean().item() - 0.75) < 0.01
    assert torch.equal(a, keep(5, (8, 64, 64), 0.25))
    assert not torch.equal(a, keep(6, (8, 64, 64), 0.25))


def test_reasons_for_unsupported_inputs():
    require_backend("window_attention", BACKEND)
    q = torch.randn(1, 1, 4, 129)
    with pytest.raises(BackendNotSupportedError, match="head_dim=129"):
        semask_fast.window_attention(q, q, q, window_size=2, backend=BACKEND)
    s = torch.randn(1, 4, 161)
    with pytest.raises(BackendNotSupportedError, match="K=161"):
        semask_fast.semantic_attention(s, s, torch.randn(1, 4, 8), backend=BACKEND)
    q = torch.randn(1, 2, 3, 129)
    with pytest.raises(BackendNotSupportedError, match="head_dim=129"):
        semask_fast.atm_attention(q, q, q, backend=BACKEND)
