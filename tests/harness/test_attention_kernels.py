"""The CUDA attention kernels (csrc/ops/{window,atm,semantic}_attention.cu) under the SIMT harness.

The shared parity tests in tests/ops/ already run these kernels through the ``simt``
backend (``pytest -k harness``).  This file adds what they do not cover:

* dropout: the kernels' Philox hash checked against its known-answer vector, and
  the dropout of window and ATM attention replayed exactly in the reference with
  the keep-mask recomputed on the host (outputs and every gradient);
* the bias-table gradient is bitwise identical across harness seeds (thread
  order) and host-thread counts, including a batch split into many window chunks;
* shapes at the edges of the kernels' tiling: head_dim 1 and 80 (padded in shared
  memory), non-square windows with a one-axis shift, K = 1 and K = 160 classes,
  C tiles with a remainder, single query / key rows;
* the reasons the backends give for inputs they do not serve;
* the ATM forward's key ranges: the roofline plan, forced counts (one range over 1600
  keys, a partial last range, a count normalised so no range is empty, idle warps, 64
  heads; ``forward_splits`` scoped to its block and thread), dropout, bitwise
  reproducibility;
* ATM q, k, v as permuted / sliced views of projections and dO, dM as transposed views:
  read in place (no copy reaches the library), outputs and every gradient at parity;
* window q, k, v as the timm drop-in's permuted views of one fused projection and dO as a
  transposed view: read in place, at parity;
* the window table gradient's chunking: the plan, ``windows_per_chunk_override`` (any chunking
  at parity and bitwise reproducible; scoped to its block and thread).

Every parity check goes through ``assert_parity`` (float64 reference, and the
``simt`` backend must have run forward and backward).  bf16 and fp16 run the same
kernel code as on a GPU (fp32 accumulation of the FFMA path); nothing is upcast
for the harness.
"""

import concurrent.futures
import functools

import numpy as np
import pytest
import torch

import semask_fast
from semask_fast import _build, reference
from semask_fast._traffic import harness_bytes
from semask_fast.backends import registry
from semask_fast.backends.registry import BackendNotSupportedError
from semask_fast.ops.atm_attention import ATMAttentionInputs
from semask_fast.testing import assert_parity
from tests.conftest import next_seed, require_backend, require_toolchain

pytestmark = pytest.mark.harness

BACKEND = "simt"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = lambda d: str(d).replace("torch.", "")  # noqa: E731


def _randn(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _cuda_module(name):
    import importlib

    return importlib.import_module(f"semask_fast.backends.cuda.{name}")


# ----------------------------------------------------------------- dropout --
def test_philox_known_answer():
    # Random123's known-answer vector for philox4x32-10: counter 0, key 0.
    philox = _cuda_module("window_attention").philox
    assert int(philox(0, np.array([0]))[0]) == 0x6627E8D5


def test_dropout_keep_rate_and_seed():
    keep = _cuda_module("window_attention").dropout_keep
    a = keep(5, (8, 64, 64), 0.25)
    assert abs(a.float().mean().item() - 0.75) < 0.01
    assert torch.equal(a, keep(5, (8, 64, 64), 0.25))
    assert not torch.equal(a, keep(6, (8, 64, 64), 0.25))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_window_dropout_replay(dtype):
    require_backend("window_attention", BACKEND)
    wa = _cuda_module("window_attention")
    b_, h, ws, d, p = 4, 2, (7, 7), 32, 0.3
    n = ws[0] * ws[1]
    g = torch.Generator().manual_seed(0)
    t = {name: _randn(g, b_, h, n, d) for name in ("q", "k", "v")}
    t["bias_table"] = _randn(g, 13 * 13, h)
    torch.manual_seed(11)
    keep = wa.dropout_keep(next_seed("simt"), (b_, h, n, n), p)
    geo = dict(window_size=ws, shift_size=(3, 3), grid=(2, 2))

    def fn(backend, **kw):
        if backend == "reference":
            return reference.window_attention(**kw, **geo, dropout_p=p, dropout_keep=keep)
        torch.manual_seed(11)  # the seed the forward draws
        return semask_fast.window_attention(**kw, **geo, dropout_p=p, backend=backend)

    assert_parity(fn, t, ["q", "k", "v", "bias_table"], dtype, backend=BACKEND, op="window_attention")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_atm_dropout_replay(dtype):
    require_backend("atm_attention", BACKEND)
    wa = _cuda_module("window_attention")
    b, h, nq, nk, d, p = 2, 3, 19, 45, 16, 0.1
    g = torch.Generator().manual_seed(1)
    t = {"q": _randn(g, b, h, nq, d), "k": _randn(g, b, h, nk, d), "v": _randn(g, b, h, nk, d)}
    torch.manual_seed(12)
    keep = wa.dropout_keep(next_seed("simt", "atm_attention"), (b, h, nq, nk), p)

    def fn(backend, **kw):
        if backend == "reference":
            return reference.atm_attention(**kw, dropout_p=p, dropout_keep=keep)
        torch.manual_seed(12)
        return semask_fast.atm_attention(**kw, dropout_p=p, backend=backend)

    assert_parity(fn, t, ["q", "k", "v"], dtype, backend=BACKEND, op="atm_attention")


# --------------------------------------------- deterministic table gradient --
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=IDS)  # FFMA and tensor-core kernels
@pytest.mark.parametrize("b_, h, ws, grid", [
    (4, 2, (7, 7), (2, 2)),
    # 262 windows: the table gradient is summed over chunks of several windows (fp16: 88 chunks of 3,
    # the last holding 1; fp32: 131 of 2), so the fixed order across chunks and within them is tested.
    (262, 2, (2, 2), (2, 131)),
])
def test_table_grad_bitwise_reproducible(monkeypatch, b_, h, ws, grid, dtype):
    require_backend("window_attention", BACKEND)
    g = torch.Generator().manual_seed(2)
    n = ws[0] * ws[1]
    q, k, v = (_randn(g, b_, h, n, 8).to(dtype) for _ in range(3))
    table = _randn(g, (2 * ws[0] - 1) * (2 * ws[1] - 1), h).float()
    dout = _randn(g, b_, h, n, 8).to(dtype)

    def table_grad():
        tab = table.clone().requires_grad_()
        out = semask_fast.window_attention(q, k, v, tab, window_size=ws, shift_size=(1, 1), grid=grid, backend=BACKEND)
        out.backward(dout)
        return tab.grad

    runs = []
    for seed, threads in (("0", "1"), ("7", "3")):
        monkeypatch.setenv("SF_SIMT_SEED", seed)  # thread order inside a block
        monkeypatch.setenv("SF_SIMT_THREADS", threads)  # blocks on host threads
        runs.append(table_grad())
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    ref_tab = table.double().requires_grad_()
    reference.window_attention(q.double(), k.double(), v.double(), ref_tab, window_size=ws, shift_size=(1, 1),
                               grid=grid).backward(dout.double())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(runs[0].double(), ref_tab.grad, atol=tol, rtol=tol)


# ------------------------------------------------------------- edge shapes --
WINDOW_SHAPES = {
    # (B*nW, heads, window, head_dim, shift, grid)
    "d1": (2, 2, (3, 3), 1, (1, 1), (1, 2)),
    "d80-padded": (2, 1, (4, 4), 80, (0, 0), None),
    "nonsquare-12x4-shift-y": (4, 2, (12, 4), 24, (6, 0), (2, 2)),
    # The fused one-tile backward (N <= 64, head_dim <= 64; tensor cores for fp16 / bf16, FFMA for
    # fp32) at its edges, and the first shapes past them (two-kernel paths).
    "w8x8-d64-shift": (4, 2, (8, 8), 64, (4, 4), (2, 2)),  # N = 64: the full tile, head_dim 64
    "w2x2-d40": (3, 5, (2, 2), 40, (0, 0), None),  # N = 4: three warps without rows or keys
    "w1x7-d33-shift": (4, 3, (1, 7), 33, (0, 3), (2, 2)),  # one-row windows, padded head_dim
    "w13x5-shift": (4, 2, (13, 5), 16, (6, 2), (2, 2)),  # N = 65: two-kernel path
    "w4x4-d65": (2, 2, (4, 4), 65, (0, 0), None),  # head_dim 65: two-kernel path
}


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("name", list(WINDOW_SHAPES))
def test_window_edge_shapes(name, dtype):
    require_backend("window_attention", BACKEND)
    b_, h, ws, d, shift, grid = WINDOW_SHAPES[name]
    n = ws[0] * ws[1]
    g = torch.Generator().manual_seed(3)
    t = {nm: _randn(g, b_, h, n, d) for nm in ("q", "k", "v")}
    t["bias_table"] = _randn(g, (2 * ws[0] - 1) * (2 * ws[1] - 1), h)
    fn = functools.partial(semask_fast.window_attention, window_size=ws, shift_size=shift, grid=grid)
    assert_parity(fn, t, ["q", "k", "v", "bias_table"], dtype, backend=BACKEND, op="window_attention")


def test_window_half_mask_and_table():
    """An fp16 explicit mask and an fp16 table with fp16 q: the kernels read them as fp32."""
    require_backend("window_attention", BACKEND)
    g = torch.Generator().manual_seed(4)
    ws, n = (4, 4), 16
    t = {nm: _randn(g, 4, 2, n, 16) for nm in ("q", "k", "v")}
    t["bias_table"] = _randn(g, 49, 2)
    t["mask"] = torch.where(torch.rand(2, n, n, generator=g) < 0.3, -100.0, 0.0).double()
    fn = functools.partial(semask_fast.window_attention, window_size=ws)
    assert_parity(fn, t, ["q", "k", "v", "bias_table"], torch.float16, backend=BACKEND, op="window_attention")


ATM_SHAPES = {
    # (B, heads, Nq, Nk, head_dim)
    "one-query-d128": (1, 1, 1, 40, 128),
    "one-key": (2, 2, 17, 1, 32),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("name", list(ATM_SHAPES))
def test_atm_edge_shapes(name, dtype):
    require_backend("atm_attention", BACKEND)
    b, h, nq, nk, d = ATM_SHAPES[name]
    g = torch.Generator().manual_seed(5)
    t = {"q": _randn(g, b, h, nq, d), "k": _randn(g, b, h, nk, d), "v": _randn(g, b, h, nk, d)}
    assert_parity(semask_fast.atm_attention, t, ["q", "k", "v"], dtype, backend=BACKEND, op="atm_attention")


SEMANTIC_SHAPES = {
    # (B_, N, K, C)
    "k1": (2, 20, 1, 40),
    "k160-max": (1, 33, 160, 32),
    "c-remainder-two-tiles": (1, 18, 19, 161),
    "one-token": (3, 1, 150, 96),
    # K buckets of the dSq / dSk accumulators (kp = 64, 128), two 64-row owner blocks with a
    # remainder, dYv over two C tiles and dP over C chunks with remainders.
    "k40-n70-c200": (1, 70, 40, 200),
    "k100-n65-c72-batch2": (2, 65, 100, 72),
    # The backward is one launch: dSq blocks, and a block per (key block, 128-column C tile of dYv);
    # the C tile 0 block also computes dP over all of C and dSk.  At the C tile edges (one full tile, a
    # one-column second tile, two full tiles, a one-column third tile, three tiles) with odd N (key
    # blocks of 64 (fp16 / bf16) and 32 (fp32) ending partial), K = 19 and 150, batch 1 and 2.
    "c128-one-tile": (1, 67, 19, 128),
    "c129-one-column-tile": (1, 67, 150, 129),
    "c256-two-tiles": (1, 33, 19, 256),
    "c257-batch2": (2, 45, 150, 257),
    "c384-three-tiles": (1, 71, 150, 384),
}


def _semantic_inputs(g, b_, n, k, c):
    # SeMask's logits are O(1): keep Sq Sk^T in a range where fp16 is meaningful.
    return {"sq": _randn(g, b_, n, k, scale=k ** -0.25), "sk": _randn(g, b_, n, k, scale=k ** -0.25),
            "yv": _randn(g, b_, n, c)}


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("name", list(SEMANTIC_SHAPES))
def test_semantic_shapes(name, dtype):
    require_backend("semantic_attention", BACKEND)
    t = _semantic_inputs(torch.Generator().manual_seed(6), *SEMANTIC_SHAPES[name])
    assert_parity(semask_fast.semantic_attention, t, ["sq", "sk", "yv"], dtype, backend=BACKEND,
                  op="semantic_attention")


# ------------------------------------------------------------------ reasons --
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


# ------------------------------------------------ ATM forward key splits --
# The ATM forward runs a block per 16 class tokens x key range x batch item (all heads, two
# passes over the range); several ranges are merged by a combine kernel.  `forward_splits(n)`
# replaces the roofline plan within its block.
def _atm_inputs(b, h, nq, nk, d, seed):
    g = torch.Generator().manual_seed(seed)
    return {"q": _randn(g, b, h, nq, d), "k": _randn(g, b, h, nk, d), "v": _randn(g, b, h, nk, d)}


def _spy_atm_library(monkeypatch):
    """Record what reaches the harness library's ATM kernels (tensors as passed, the forward's key
    ranges) while still running them; returns the list of calls."""
    impl = registry.implementation("atm_attention", BACKEND)
    lib = impl.library()
    calls = []

    class Spy:
        def __getattr__(self, name):
            return getattr(lib, name)

        def atm_attention_forward(self, q, k, v, scale, dropout_p, seed, splits):
            calls.append({"call": "forward", "q": q, "k": k, "v": v, "splits": splits})
            return lib.atm_attention_forward(q, k, v, scale, dropout_p, seed, splits)

        def atm_attention_backward(self, dout, dmask, q, k, v, *rest):
            calls.append({"call": "backward", "dout": dout, "dmask": dmask, "q": q, "k": k, "v": v})
            return lib.atm_attention_backward(dout, dmask, q, k, v, *rest)

    spy = Spy()
    monkeypatch.setattr(impl, "library", lambda: spy)
    return calls


def test_atm_split_plan():
    mod = _cuda_module("atm_attention")
    plan, model = mod.plan_splits, mod.split_model_seconds
    fp16 = torch.float16
    # SegViT-L (B=2, h=16, Nq=150, Nk=1600, d=32): 20 blocks with one range; the model's
    # optimum is 3 ranges (60 blocks: 4.92 -> 3.75 us), beyond which the partials cost more
    # than the parallelism gains.
    assert plan(2, 16, 150, 1600, fp16, 32, sms=132) == 3
    times = [model(s, 2, 16, 150, 1600, 32, fp16, 132) for s in range(1, 9)]
    assert times.index(min(times)) == 2 and times[0] > 2 * times[2]
    # The grid already fills the device: one range, no workspace.
    assert plan(16, 16, 150, 1600, fp16, 32, sms=132) == 1
    assert plan(64, 16, 150, 200, torch.float32, 32, sms=132) == 1
    # A tiny grid over long keys: many ranges (fp32 on FFMA is compute-bound longer).
    assert plan(1, 16, 16, 4096, fp16, 32, sms=132) > 4
    assert plan(1, 16, 16, 4096, torch.float32, 32, sms=132) > plan(1, 16, 16, 4096, fp16, 32, sms=132)
    # Ties go to the smaller count: fp32 at B=16 is compute-bound at full occupancy for any count.
    assert len({model(s, 16, 16, 150, 1600, 32, torch.float32, 132) for s in (1, 2, 3)}) == 1
    assert plan(16, 16, 150, 1600, torch.float32, 32, sms=132) == 1
    # Never an empty range, planned or forced.
    for nk in (1, 31, 33, 300, 513, 1600, 4000):
        tiles = -(-nk // 32)
        for s in [plan(1, 4, 5, nk, fp16, 32, sms=132)] + [plan(1, 4, 5, nk, fp16, 32, sms=132, requested=r)
                                                            for r in (0, 1, 3, 7, 99)]:
            assert 1 <= s <= tiles and -(-tiles // -(-tiles // s)) == s, (nk, s)
    assert plan(1, 1, 16, 300, fp16, 32, sms=132, requested=4) == 4  # 3 + 3 + 3 + 1 tiles
    assert plan(1, 1, 16, 300, fp16, 32, sms=132, requested=7) == 5  # 2 tiles each
    assert plan(1, 1, 16, 300, fp16, 32, sms=132, requested=99) == 10


def test_atm_reason_when_shared_memory_is_short(monkeypatch):
    """On a 99 KiB device (the harness as sm_86) the fp32 forward with head_dim 128 fits up to 20
    heads (their row statistics are in shared memory), the 16-bit one many more: the C++ side
    says so (atm_attention_shared_memory) and the backend refuses with the reason."""
    require_backend("atm_attention", BACKEND)
    monkeypatch.setenv("SF_SIMT_ARCH", "sm_86")
    impl = registry.implementation("atm_attention", BACKEND)

    def reasons(heads, dtype):
        q = torch.randn(1, heads, 3, 128, dtype=dtype)
        return impl.input_reasons(ATMAttentionInputs(q=q, k=q, v=q, scale=0.1, dropout_p=0.0))

    assert reasons(20, torch.float32) == []
    (reason,) = reasons(21, torch.float32)
    assert "shared memory per block (cpu gives 101376)" in reason, reason
    q = torch.randn(1, 21, 3, 128)
    with pytest.raises(BackendNotSupportedError, match="shared memory per block"):
        semask_fast.atm_attention(q, q, q, backend=BACKEND)
    semask_fast.atm_attention(q.half(), q.half(), q.half(), backend=BACKEND)  # 16-bit tiles fit


ATM_SPLIT_CASES = {
    # name: ((B, heads, Nq, Nk, head_dim), forced splits, splits run)
    "one-split-d48": ((2, 5, 19, 200, 48), 1, 1),
    "four-splits-last-partial": ((1, 6, 33, 300, 32), 4, 4),
    "one-range-of-17-tiles": ((1, 2, 17, 513, 16), 1, 1),  # no length limit on a range
    "one-range-1600-keys-d128": ((1, 3, 5, 1600, 128), 1, 1),
    "seven-asked-six-run": ((1, 7, 18, 530, 32), 7, 6),  # 17 tiles: 3 per range
    "five-splits-d128": ((1, 3, 20, 130, 128), 5, 5),
    "one-head-three-warps-idle": ((2, 1, 16, 100, 32), 3, 2),
    "64-heads": ((1, 64, 5, 40, 64), 2, 2),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("name", list(ATM_SPLIT_CASES))
def test_atm_forced_splits(monkeypatch, name, dtype):
    require_backend("atm_attention", BACKEND)
    mod = _cuda_module("atm_attention")
    shape, forced, runs = ATM_SPLIT_CASES[name]
    b, h, nq, nk, d = shape
    assert mod.plan_splits(b, h, nq, nk, dtype, d, sms=1, requested=forced) == runs
    calls = _spy_atm_library(monkeypatch)
    with mod.forward_splits(forced):
        assert_parity(semask_fast.atm_attention, _atm_inputs(*shape, seed=7), ["q", "k", "v"], dtype, backend=BACKEND,
                      op="atm_attention")
    assert {c["splits"] for c in calls if c["call"] == "forward"} == {runs}


@pytest.mark.parametrize("forced", [1, 3])
def test_atm_dropout_replay_splits(forced):
    require_backend("atm_attention", BACKEND)
    wa, mod = _cuda_module("window_attention"), _cuda_module("atm_attention")
    b, h, nq, nk, d, p = 1, 4, 18, 90, 32, 0.2
    t = _atm_inputs(b, h, nq, nk, d, seed=8)
    torch.manual_seed(13)
    keep = wa.dropout_keep(next_seed("simt", "atm_attention"), (b, h, nq, nk), p)

    def fn(backend, **kw):
        if backend == "reference":
            return reference.atm_attention(**kw, dropout_p=p, dropout_keep=keep)
        torch.manual_seed(13)
        return semask_fast.atm_attention(**kw, dropout_p=p, backend=backend)

    with mod.forward_splits(forced):
        assert_parity(fn, t, ["q", "k", "v"], torch.float16, backend=BACKEND, op="atm_attention")


@pytest.mark.parametrize("forced", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=IDS)  # FFMA and tensor-core kernels
def test_atm_bitwise_reproducible(monkeypatch, dtype, forced):
    """One or several key ranges, heads per warp and dQ key tiles per warp: the combine, the
    head sum (warps in order) and the dQ partials are added in a fixed order, whatever the
    thread order and host threads."""
    require_backend("atm_attention", BACKEND)
    base = {n: x.to(dtype) for n, x in _atm_inputs(2, 9, 21, 200, 32, seed=9).items()}
    runs = []
    for seed, threads in (("0", "1"), ("5", "3")):
        monkeypatch.setenv("SF_SIMT_SEED", seed)
        monkeypatch.setenv("SF_SIMT_THREADS", threads)
        t = {n: x.clone().requires_grad_() for n, x in base.items()}
        with _cuda_module("atm_attention").forward_splits(forced):
            out, m = semask_fast.atm_attention(t["q"], t["k"], t["v"], backend=BACKEND)
        (out.float().sum() + m.float().square().sum()).backward()
        runs.append([out, m] + [t[n].grad for n in ("q", "k", "v")])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def _assert_override_is_scoped(override, run, planned):
    """A plan override (a context manager) holds inside its block, nests, restores the outer choice
    and does not reach another thread; run() returns the plan the kernels received."""
    with override(3):
        assert run() == 3
        with override(2):
            assert run() == 2
        assert run() == 3
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            assert pool.submit(run).result() == planned
    assert run() == planned


def test_atm_forward_splits_is_scoped(monkeypatch):
    """forward_splits holds inside its block only, nests, and does not reach other threads."""
    require_backend("atm_attention", BACKEND)
    mod = _cuda_module("atm_attention")
    calls = _spy_atm_library(monkeypatch)
    q, k, v = (x.float() for x in _atm_inputs(1, 2, 16, 300, 16, seed=3).values())  # 10 key tiles
    planned = mod.plan_splits(1, 2, 16, 300, torch.float32, 16, sms=mod.HARNESS_MULTIPROCESSORS)
    assert planned not in (2, 3)

    def splits_run():
        semask_fast.atm_attention(q, k, v, backend=BACKEND)
        return calls[-1]["splits"]

    _assert_override_is_scoped(mod.forward_splits, splits_run, planned)


# (B, heads, Nq, Nk, head_dim) and how q, k, v are cut from projections.  The kernels read them in
# place (batch, head and row strides; 16-byte chunks where every stride allows, else elements).
ATM_VIEW_CASES = {
    # One fused (B, N, 3, h, d) projection permuted to (B, h, N, d): chunked loads.
    "fused-qkv": (2, 3, 40, 40, 32),
    # SegViT's ATM layer: q from the class tokens' (B, Nq, h, d), k and v from one fused (B, Nk, 2, h, d).
    "segvit-q-and-kv": (2, 3, 19, 70, 32),
    # Heads cut from a wider buffer (head_dim 13 of 15): odd row strides, element loads.
    "sliced-heads": (2, 3, 18, 45, 13),
}


def _atm_views(name, fused):
    """q, k, v as views of the case's projection tensors (no copy)."""
    if name == "fused-qkv":
        return fused["qkv"].permute(2, 0, 3, 1, 4).unbind(0)
    if name == "segvit-q-and-kv":
        return (fused["q"].transpose(1, 2), *fused["kv"].permute(2, 0, 3, 1, 4).unbind(0))
    return tuple(fused[n][..., :13] for n in ("q", "k", "v"))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("name", list(ATM_VIEW_CASES))
def test_atm_strided_views_read_in_place(monkeypatch, name, dtype):
    """q, k, v as permuted / sliced views of projections, dO and dM as transposed views (the outputs
    are used transposed, as SegViT does): parity with the reference for both outputs and every
    gradient, and what reaches the library is the views themselves (same storage, same strides),
    not contiguous copies."""
    require_backend("atm_attention", BACKEND)
    b, h, nq, nk, d = ATM_VIEW_CASES[name]
    g = torch.Generator().manual_seed(14)
    fused = {"fused-qkv": {"qkv": _randn(g, b, nq, 3, h, d)},
             "segvit-q-and-kv": {"q": _randn(g, b, nq, h, d), "kv": _randn(g, b, nk, 2, h, d)},
             "sliced-heads": {"q": _randn(g, b, h, nq, 15), "k": _randn(g, b, h, nk, 15),
                              "v": _randn(g, b, h, nk, 15)}}[name]
    calls = _spy_atm_library(monkeypatch)
    seen = []

    def fn(backend, **tensors):
        q, k, v = _atm_views(name, tensors)
        if backend == BACKEND:
            seen.append((tensors, (q, k, v)))
        out, mask_logits = semask_fast.atm_attention(q, k, v, backend=backend)
        return out.transpose(1, 2), mask_logits.transpose(0, 1)

    assert_parity(fn, fused, list(fused), dtype, backend=BACKEND, op="atm_attention")
    (tensors, views), = seen
    forward, backward = calls
    assert forward["call"] == "forward" and backward["call"] == "backward"
    storages = {t.untyped_storage().data_ptr() for t in tensors.values()}
    for call in (forward, backward):
        for n, view in zip("qkv", views):
            assert not view.is_contiguous()
            assert call[n].untyped_storage().data_ptr() in storages, f"{call['call']}: {n} was copied"
            assert (call[n].data_ptr(), call[n].stride()) == (view.data_ptr(), view.stride()), n
    # Gradients of the transposed outputs arrive transposed: read in place as well.
    assert backward["dout"].stride() == (nq * h * d, d, h * d, 1)
    assert backward["dmask"].stride() == (nk, b * nk, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_atm_chunked_and_element_loads_agree(dtype):
    """Tiles load in 16-byte chunks when rows hold whole chunks and every tensor is 16-byte
    aligned, element by element otherwise: a storage offset of one element (unaligned) must
    give bitwise the same outputs and gradients, and an odd head_dim the reference's."""
    require_backend("atm_attention", BACKEND)
    base = {n: x.to(dtype) for n, x in _atm_inputs(2, 3, 20, 70, 32, seed=10).items()}

    def run(unaligned):
        t = {}
        for n, x in base.items():
            y = torch.empty(x.numel() + 1, dtype=dtype)[1:].view_as(x) if unaligned else torch.empty_like(x)
            t[n] = y.copy_(x).requires_grad_()
        assert (t["q"].data_ptr() % 16 != 0) == unaligned
        out, m = semask_fast.atm_attention(t["q"], t["k"], t["v"], backend=BACKEND)
        g = torch.Generator().manual_seed(11)
        torch.autograd.backward([out, m], [torch.randn(out.shape, generator=g).to(dtype),
                                           torch.randn(m.shape, generator=g).to(dtype)])
        return [out.detach(), m.detach()] + [t[n].grad for n in ("q", "k", "v")]

    assert all(torch.equal(a, b) for a, b in zip(run(False), run(True)))
    assert_parity(semask_fast.atm_attention, _atm_inputs(1, 2, 18, 40, 13, seed=12), ["q", "k", "v"], dtype,
                  backend=BACKEND, op="atm_attention")


# ------------------------------- packed rows / tensor-core backward (helper F) --
# The fp16 / bf16 window kernels pack the rows of several (window, head) segments into
# one 64-row block (forward: query rows, dK/dV: keys); these shapes make blocks straddle
# segment boundaries and end on a partial block (rows % 64 != 0).  fp32 runs the FFMA
# kernels on the same shapes.
PACKED_WINDOW_SHAPES = {
    # (B*nW, heads, window, head_dim, shift, grid): rows = B*nW * heads * N
    "n49-noshift": (6, 3, (7, 7), 32, (0, 0), None),              # 882 rows: 13 blocks + 50
    "n49-shift": (6, 3, (7, 7), 32, (3, 3), (2, 3)),
    "n144-noshift": (2, 3, (12, 12), 16, (0, 0), None),           # 864 rows: 13 blocks + 32
    "n144-shift": (2, 3, (12, 12), 16, (6, 6), (1, 2)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("name", list(PACKED_WINDOW_SHAPES))
def test_window_packed_rows(name, dtype):
    require_backend("window_attention", BACKEND)
    b_, h, ws, d, shift, grid = PACKED_WINDOW_SHAPES[name]
    n = ws[0] * ws[1]
    g = torch.Generator().manual_seed(7)
    t = {nm: _randn(g, b_, h, n, d) for nm in ("q", "k", "v")}
    t["bias_table"] = _randn(g, (2 * ws[0] - 1) * (2 * ws[1] - 1), h)
    fn = functools.partial(semask_fast.window_attention, window_size=ws, shift_size=shift, grid=grid)
    assert_parity(fn, t, ["q", "k", "v", "bias_table"], dtype, backend=BACKEND, op="window_attention")


# ------------------------------------ semantic backward: strided inputs, traffic --
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("layout", ["qkv-columns", "batch-inner"])
def test_semantic_dyv_c_tiles_strided(layout, dtype):
    """Several dYv C tiles read from strided inputs: Sq, Sk, Yv as column views of one (B_, N, 2K + C)
    tensor (row stride 2K + C), or stored (N, B_, .) and transposed (batch stride < row stride)."""
    require_backend("semantic_attention", BACKEND)
    b_, n, k, c = 2, 37, 150, 257
    t = _semantic_inputs(torch.Generator().manual_seed(10), b_, n, k, c)
    if layout == "qkv-columns":
        def fn(backend, qkv):
            sq, sk, yv = qkv.split([k, k, c], dim=-1)
            return semask_fast.semantic_attention(sq, sk, yv, backend=backend)

        assert_parity(fn, {"qkv": torch.cat([t["sq"], t["sk"], t["yv"]], dim=-1)}, ["qkv"], dtype, backend=BACKEND,
                      op="semantic_attention")
    else:
        def fn(backend, sq, sk, yv):
            return semask_fast.semantic_attention(*(x.transpose(0, 1) for x in (sq, sk, yv)), backend=backend)

        stored = {nm: x.transpose(0, 1).contiguous() for nm, x in t.items()}
        assert_parity(fn, stored, ["sq", "sk", "yv"], dtype, backend=BACKEND, op="semantic_attention")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=IDS)
def test_semantic_backward_reads_inputs_once(dtype):
    """The backward is one launch (dSq blocks, dSk / dYv blocks) whatever the number of dYv C tiles:
    it reads Sq, Sk, Yv, dO and O once, counted by the harness tracer (unique bytes per launch), and
    writes every gradient byte once; the backward has no workspace."""
    require_toolchain("trace", "simt")
    b_, n, k, c = 1, 70, 19, 300  # three dYv C tiles
    t = _semantic_inputs(torch.Generator().manual_seed(11), b_, n, k, c)
    sq, sk, yv = (t[nm].to(dtype) for nm in ("sq", "sk", "yv"))
    dout = torch.randn(b_, n, c, dtype=torch.float64).to(dtype)
    lib = _build.load("simt", "semantic_attention.cu")
    out, lse = lib.semantic_attention_forward(sq, sk, yv)
    regions = []
    grads = {}
    traffic = harness_bytes("semantic_attention.cu", lambda tl: grads.update(
        zip(("sq", "sk", "yv"), tl.semantic_attention_backward(dout, sq, sk, yv, out, lse))),
        [dout, sq, sk, yv, out, lse], regions)
    assert traffic.launches == 1
    read = {r["begin"]: r["read"] for r in regions}
    for x in (sq, sk, yv, dout, out, lse):
        assert read[x.data_ptr()] == x.nbytes
    written = {r["begin"]: (r["written"], r["written_issued"]) for r in regions if r["written"]}
    assert written == {g.data_ptr(): (g.nbytes, g.nbytes) for g in grads.values()}


# --------------------------------------- window q, k, v as strided views --
# The timm drop-in projects (B_, N, C) to one (B_, N, 3, h, d) tensor and passes q, k, v as its
# permuted views (B_, h, N, d), strides (N*3*h*d, d, 3*h*d, 1); the output is used transposed to
# (B_, N, h, d), so dO arrives as a transposed view too.  The kernels read both in place.
WINDOW_VIEW_CASES = {
    # (B_, heads, window, head_dim, shift, grid)
    "n49-fused": (4, 3, (7, 7), 32, (3, 3), (2, 2)),  # fused backward; packed forward rows (fp16 / bf16)
    "n72-two-kernel": (4, 2, (9, 8), 16, (4, 3), (2, 2)),  # two-kernel backward, packed dK/dV keys
    "n4-d80": (6, 3, (2, 2), 80, (0, 0), None),  # segments of 4 rows, padded head_dim, two-kernel
    "n2-d8": (5, 3, (1, 2), 8, (0, 0), None),  # segments of 2 rows: a staging pass spans several
}


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("name", list(WINDOW_VIEW_CASES))
def test_window_strided_views_read_in_place(monkeypatch, name, dtype):
    """q, k, v as the timm drop-in cuts them from one fused projection and dO as a transposed view:
    parity with the reference for the output and every gradient (q, k, v through the projection,
    the bias table), and what reaches the library is the views themselves (same data pointer,
    same strides), not contiguous copies."""
    require_backend("window_attention", BACKEND)
    b_, h, ws, d, shift, grid = WINDOW_VIEW_CASES[name]
    n = ws[0] * ws[1]
    g = torch.Generator().manual_seed(15)
    t = {"qkv": _randn(g, b_, n, 3, h, d), "bias_table": _randn(g, (2 * ws[0] - 1) * (2 * ws[1] - 1), h)}
    calls = _spy_window_library(monkeypatch)
    seen = []

    def fn(backend, qkv, bias_table):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if backend == BACKEND:
            seen.append((q, k, v))
        out = semask_fast.window_attention(q, k, v, bias_table, window_size=ws, shift_size=shift, grid=grid,
                                           backend=backend)
        return out.transpose(1, 2)

    assert_parity(fn, t, ["qkv", "bias_table"], dtype, backend=BACKEND, op="window_attention")
    (views,) = seen
    forward, backward = calls
    assert forward["call"] == "forward" and backward["call"] == "backward"
    for call in (forward, backward):
        for nm, view in zip("qkv", views):
            assert view.stride() == (n * 3 * h * d, d, 3 * h * d, 1)
            assert (call[nm].data_ptr(), call[nm].stride()) == (view.data_ptr(), view.stride()), f"{call['call']}: {nm}"
    assert backward["dout"].stride() == (n * h * d, d, h * d, 1)


# ------------------------------------------- table-gradient chunk plan --
def _spy_window_library(monkeypatch):
    """Record what reaches the harness library's window kernels (tensors as passed, the backward's
    windows per chunk) while still running them; returns the list of calls."""
    impl = registry.implementation("window_attention", BACKEND)
    lib = impl.library()
    calls = []

    class Spy:
        def __getattr__(self, name):
            return getattr(lib, name)

        def window_attention_forward(self, q, k, v, *rest):
            calls.append({"call": "forward", "q": q, "k": k, "v": v})
            return lib.window_attention_forward(q, k, v, *rest)

        def window_attention_backward(self, dout, q, k, v, out, lse, *rest):
            # rest ends with windows_per_chunk, need_dq, need_dkv, need_table.
            calls.append({"call": "backward", "dout": dout, "q": q, "k": k, "v": v, "per_chunk": rest[-4]})
            return lib.window_attention_backward(dout, q, k, v, out, lse, *rest)

    spy = Spy()
    monkeypatch.setattr(impl, "library", lambda: spy)
    return calls


def test_window_chunk_plan():
    plan = _cuda_module("window_attention").windows_per_chunk
    # Swin-T stage 1 at batch 1 (64 windows, h = 3, N = 49): the fused kernel (a block per head,
    # every dtype) keeps one window per chunk; past it (N = 144), the fp32 FFMA dQ kernel (27
    # blocks a window) packs 3 of 16 windows (the grid keeps 128 blocks).
    assert plan(64, 3, 49, 32, torch.float16) == 1
    assert plan(64, 3, 49, 32, torch.float32) == 1
    assert plan(16, 3, 144, 32, torch.float32) == 3
    # Enough windows: the partials (written once, read once) stay within 10% of the backward's
    # minimum traffic, and the grid keeps a wave of blocks.
    for b_, h, n, d, dtype in [(512, 3, 49, 32, torch.float16), (2048, 3, 144, 32, torch.bfloat16),
                               (4096, 24, 49, 32, torch.float32), (8192, 2, 4, 8, torch.float16)]:
        k = plan(b_, h, n, d, dtype)
        chunks = -(-b_ // k)
        itemsize = torch.empty((), dtype=dtype).element_size()
        fused = n <= 64 and d <= 64
        slice_floats = h * 4 * n if fused else h * n * n  # (2Wh-1)(2Ww-1) < 4N folded table rows
        assert 2 * chunks * slice_floats * 4 <= 0.1 * 8 * b_ * h * n * d * itemsize
        blocks = h if fused else h * -(-n // 16) if dtype == torch.float32 else -(-h * n // 64)
        assert chunks * blocks >= 128
    # The buffer stays under 4M floats whatever the shape; the fused kernel's folded partials
    # (h x table rows a chunk) never need packing for memory.
    k = plan(1 << 16, 16, 256, 128, torch.float16)
    assert -(-(1 << 16) // k) * 16 * 256 * 256 <= 1 << 22
    assert plan(4096, 3, 49, 32, torch.float16) == 1


# 12 windows of (5, 3) (the fused one-tile kernel: fp16 on tensor cores, fp32 with FFMA) and of
# (9, 8) (N = 72: the two-kernel paths, tensor-core for fp16, FFMA for fp32).
FORCED_CHUNK_CASES = [("w5x3", torch.float32), ("w5x3", torch.float16), ("w9x8", torch.float32),
                      ("w9x8", torch.float16)]


@pytest.mark.parametrize("window,dtype", FORCED_CHUNK_CASES, ids=lambda c: c if isinstance(c, str) else IDS(c))
@pytest.mark.parametrize("per_chunk", [1, 3, 5, 12])  # 12 windows: even, uneven (last chunk 2), one chunk
def test_window_forced_chunks(monkeypatch, per_chunk, window, dtype):
    """Any chunking gives the reference's table gradient, bitwise the same across thread orders.
    Deterministic mode fills uninitialised memory with NaN, so a partial-sum element the
    kernels left unwritten (the buffer is not cleared) poisons the gradient."""
    require_backend("window_attention", BACKEND)
    wa = _cuda_module("window_attention")
    b_, h, d, grid = 12, 3, 8, (3, 4)
    ws = (5, 3) if window == "w5x3" else (9, 8)
    n = ws[0] * ws[1]
    g = torch.Generator().manual_seed(9)
    t = {nm: _randn(g, b_, h, n, d) for nm in ("q", "k", "v")}
    t["bias_table"] = _randn(g, (2 * ws[0] - 1) * (2 * ws[1] - 1), h)
    fn = functools.partial(semask_fast.window_attention, window_size=ws, shift_size=(2, 1), grid=grid)
    calls = _spy_window_library(monkeypatch)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with wa.windows_per_chunk_override(per_chunk):
            assert_parity(fn, t, ["q", "k", "v", "bias_table"], dtype, backend=BACKEND, op="window_attention")
            runs = []
            for seed, threads in (("0", "1"), ("5", "3")):
                monkeypatch.setenv("SF_SIMT_SEED", seed)
                monkeypatch.setenv("SF_SIMT_THREADS", threads)
                tab = t["bias_table"].float().requires_grad_()
                q, k, v = (t[nm].to(dtype) for nm in ("q", "k", "v"))
                fn(q, k, v, tab, backend=BACKEND).backward(torch.ones(b_, h, n, d, dtype=dtype))
                runs.append(tab.grad)
        assert torch.equal(runs[0], runs[1])
    finally:
        torch.use_deterministic_algorithms(was)
    assert {c["per_chunk"] for c in calls if c["call"] == "backward"} == {per_chunk}


def test_window_per_chunk_override_is_scoped(monkeypatch):
    """windows_per_chunk_override holds inside its block only, nests, and does not reach other threads."""
    require_backend("window_attention", BACKEND)
    wa = _cuda_module("window_attention")
    calls = _spy_window_library(monkeypatch)
    b_, h, ws, d = 8, 2, (4, 4), 8
    g = torch.Generator().manual_seed(5)
    q, k, v = (_randn(g, b_, h, 16, d).float().requires_grad_() for _ in range(3))
    tab = _randn(g, 49, h).float().requires_grad_()
    planned = wa.windows_per_chunk(b_, h, 16, d, torch.float32)
    assert planned not in (2, 3)

    def per_chunk_run():
        semask_fast.window_attention(q, k, v, tab, window_size=ws, backend=BACKEND).sum().backward()
        return calls[-1]["per_chunk"]

    _assert_override_is_scoped(wa.windows_per_chunk_override, per_chunk_run, planned)


# The fused backward with the inputs the shapes of WINDOW_SHAPES leave out (every dtype, fp32 being the
# FFMA twin of the tensor-core kernel): an explicit (nW, N, N) mask with a table, and no table
# at batch 1 (one window: no fold, no chunk sum).
FUSED_INPUT_CASES = {
    # (B*nW, heads, window, head_dim, explicit-mask nW, table)
    "w3x5-d16-mask": (4, 2, (3, 5), 16, 2, True),
    "w7x7-d64-no-table-batch1": (1, 3, (7, 7), 64, None, False),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("name", list(FUSED_INPUT_CASES))
def test_window_fused_backward_inputs(name, dtype):
    require_backend("window_attention", BACKEND)
    b_, h, ws, d, mask_nw, table = FUSED_INPUT_CASES[name]
    n = ws[0] * ws[1]
    g = torch.Generator().manual_seed(11)
    t = {nm: _randn(g, b_, h, n, d) for nm in ("q", "k", "v")}
    grads = ["q", "k", "v"]
    if table:
        t["bias_table"] = _randn(g, (2 * ws[0] - 1) * (2 * ws[1] - 1), h)
        grads.append("bias_table")
    if mask_nw:
        # Swin-like: 0 or -100 per pair, the diagonal kept (no row fully masked).
        m = torch.where(torch.rand(mask_nw, n, n, generator=g) < 0.3, -100.0, 0.0).double()
        t["mask"] = m * (1 - torch.eye(n, dtype=torch.float64))
    fn = functools.partial(semask_fast.window_attention, window_size=ws)
    assert_parity(fn, t, grads, dtype, backend=BACKEND, op="window_attention")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("table", [True, False], ids=["table", "no-table"])
def test_window_fused_backward_reads_inputs_once(table, dtype):
    """Swin-like windows (N = 49, shift) in every dtype take the fused backward: one launch, plus
    the chunk sum of the folded table partials with a table.  Counted by the harness tracer
    (unique bytes per launch): q, k, v, dO, O, lse and the table are read once, every gradient
    byte is written once, and the only workspace is the (chunks, h, table rows) partials,
    written once and read once."""
    require_toolchain("trace", "simt")
    b_, h, ws, d, shift, grid = 4, 2, (7, 7), 32, (3, 3), (2, 2)
    n, trows = ws[0] * ws[1], (2 * ws[0] - 1) * (2 * ws[1] - 1)
    g = torch.Generator().manual_seed(12)
    q, k, v, dout = (_randn(g, b_, h, n, d).to(dtype) for _ in range(4))
    tab = _randn(g, trows, h).float() if table else None
    args = (tab, None, *ws, *grid, *shift, d ** -0.5, -100.0, 0.0, torch.tensor(0))
    lib = _build.load("simt", "window_attention.cu")
    out, lse = lib.window_attention_forward(q, k, v, *args)
    regions, grads = [], []
    traffic = harness_bytes("window_attention.cu", lambda tl: grads.extend(
        tl.window_attention_backward(dout, q, k, v, out, lse, *args, 1, True, True, True)), [dout, q, k, v, out, lse, tab],
        regions)
    assert traffic.launches == (2 if table else 1)
    read = {r["begin"]: r["read"] for r in regions}
    for x in (q, k, v, dout, out, lse) + ((tab,) if table else ()):
        assert read[x.data_ptr()] == x.nbytes
    written = {r["begin"]: (r["written"], r["written_issued"]) for r in regions if r["written"]}
    want = {x.data_ptr(): (x.nbytes, x.nbytes) for x in grads[:3] + (grads[3:] if table else [])}
    partials = b_ * h * trows * 4  # one window per chunk
    workspace = {r["begin"]: (r["written"], r["read"]) for r in regions if r["written"] and r["begin"] not in want}
    assert list(workspace.values()) == ([(partials, partials)] if table else [])
    assert {a: w for a, w in written.items() if a in want} == want
