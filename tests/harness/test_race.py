"""The shared-memory race detector of the SIMT harness (csrc/harness/sf_race.h, in the ``trace`` build).

The harness's shuffled thread order catches a missing ``__syncthreads()`` by wrong values, but not a
race that only a warp operation hides: every lane reaches a shuffle before any passes it, so reads
before a shuffle always run before another lane's writes after it.  The instrumented build checks
the CUDA memory model instead (only ``__syncthreads()`` and ``__syncwarp()`` order shared-memory
accesses).  Each attention kernel runs here on small shapes covering its code paths (FFMA and
tensor-core, fused and unfused, idle warps): a race anywhere raises.
"""

import pytest
import torch

from semask_fast import _build
from semask_fast.backends.cuda.window_attention import fused_backward
from tests.conftest import require_toolchain

pytestmark = pytest.mark.harness

RACE = "shared-memory race"


def _lib(source):
    require_toolchain("trace", "simt")
    return _build.load("trace", source)


@pytest.fixture(scope="module")
def selftest():
    return _lib("harness/selftest.cu")


def test_shuffle_does_not_order_memory(selftest):
    x = torch.randn(32)
    # The plain harness computes the right value either way: its run order cannot show the race.
    simt = _build.load("simt", "harness/selftest.cu")
    for fence in (False, True):
        assert torch.equal(simt.selftest_running_max(x, fence), x.max().expand(32))
    assert torch.equal(selftest.selftest_running_max(x, True), x.max().expand(32))
    with pytest.raises(RuntimeError, match=RACE):
        selftest.selftest_running_max(x, False)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static-smem", "dynamic-smem"])
def test_missing_barrier_is_a_race(selftest, dynamic):
    x = torch.randn(64 * 2)
    assert torch.equal(selftest.selftest_reverse(x, 64, True, dynamic), x.view(2, 64).flip(1).reshape(-1))
    with pytest.raises(RuntimeError, match=RACE):
        selftest.selftest_reverse(x, 64, False, dynamic)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = lambda d: str(d).replace("torch.", "")  # noqa: E731


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("splits", [1, 2])
def test_atm_attention_is_race_free(dtype, splits):
    lib = _lib("atm_attention.cu")
    g = torch.Generator().manual_seed(0)
    B, h, Nq, Nk, d = 1, 5, 20, 70, 32  # 5 heads: the warps take heads round-robin, some idle
    q, k, v = (torch.randn(B, h, n, d, generator=g).to(dtype) for n in (Nq, Nk, Nk))
    seed = torch.tensor(3)
    out, mask_logits, lse = lib.atm_attention_forward(q, k, v, d ** -0.5, 0.1, seed, splits)
    dout, dmask = torch.randn_like(out), torch.randn_like(mask_logits)
    lib.atm_attention_backward(dout, dmask, q, k, v, out, lse, d ** -0.5, 0.1, seed, True, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("ws,d", [(7, 32), (4, 32), (9, 80)], ids=["fused-49", "fused-16-idle-warps", "unfused-81"])
def test_window_attention_is_race_free(dtype, ws, d):
    lib = _lib("window_attention.cu")
    g = torch.Generator().manual_seed(0)
    grid, h = 2, 3
    N = ws * ws
    q, k, v = (torch.randn(grid * grid, h, N, d, generator=g).to(dtype) for _ in range(3))
    table = torch.randn((2 * ws - 1) ** 2, h, generator=g)
    shift = ws // 2
    args = (table, None, ws, ws, grid, grid, shift, shift, d ** -0.5, -100.0, 0.1, torch.tensor(5))
    out, lse = lib.window_attention_forward(q, k, v, *args)
    fused = fused_backward(N, d, dtype)  # the plan, as the backend passes it
    assert fused == (ws <= 8)  # the ids say which path each case exercises
    lib.window_attention_backward(torch.randn_like(out), q, k, v, out, lse, *args, 2, fused, True, True, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_semantic_attention_is_race_free(dtype):
    lib = _lib("semantic_attention.cu")
    g = torch.Generator().manual_seed(0)
    B, N, K, C = 1, 70, 19, 40
    sq, sk = (torch.randn(B, N, K, generator=g).to(dtype) for _ in range(2))
    yv = torch.randn(B, N, C, generator=g).to(dtype)
    out, lse = lib.semantic_attention_forward(sq, sk, yv)
    lib.semantic_attention_backward(torch.randn_like(out), sq, sk, yv, out, lse)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
def test_mask_similarity_is_race_free(dtype, norm):
    lib = _lib("mask_similarity.cu")
    g = torch.Generator().manual_seed(0)
    B, N, K, D = 1, 40, 19, 40
    P, C = torch.randn(B, N, D, generator=g).to(dtype), torch.randn(B, K, D, generator=g).to(dtype)
    w, b = (torch.randn(K, generator=g), torch.randn(K, generator=g)) if norm else (None, None)
    y = lib.mask_similarity_forward(P, C, w, b, norm, 1e-5)
    lib.mask_similarity_backward(torch.randn_like(y), P, C, w, norm, 1e-5)
