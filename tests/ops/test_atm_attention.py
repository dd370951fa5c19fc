"""Every test of ``atm_attention`` (SegViT ATM cross-attention), one section per backend.

Every backend: both outputs (attention output and head-mean mask logits) and the gradients of
q, k, v (taken through both outputs) are compared with the float64 reference
through ``assert_parity``, which also asserts the requested backend ran forward
and backward.  Shapes: Nq = 150 class tokens over Nk = 400 spatial tokens,
h = 1 / 8 / 16, head_dim 16..128, odd sizes, batch 1.  Dropout: the Triton
kernels' Philox keep-mask is materialised for the seed and replayed in the
reference (outputs and gradients).  Then:

* triton launchers (``semask_fast.kernels.atm_attention``) called directly with explicit plans
  (helpers: ``tests/kernels/_launch_parity.py``): the GPU tiles (head groups with padding heads),
  dropout, and peaked logits (diagonal logits ~120, past exp's fp32 range at ~88.7) through the
  forward's two passes, built with a modest scale over head_dim 64 for the reason given in
  tests/ops/test_window_attention.py (the backward's D = rowsum(dO * O) rounding);
* cpu: gradcheck on the native kernels, odd head_dim, thread-count independence;
* cuda sources: csrc/ops/atm_attention.cu run by the SIMT harness (``harness`` marker; helpers:
  ``tests/harness/_cuda_sources.py``): dropout replayed with the keep-mask recomputed on the host;
  edge shapes (one query with head_dim 128, one key); the reason given when shared memory is short;
  the forward's key ranges (the roofline plan, forced counts: one range over 1600 keys, a partial
  last range, a count normalised so no range is empty, idle warps, 64 heads; ``forward_splits``
  scoped to its block and thread), dropout over several ranges, bitwise reproducibility; q, k, v as
  permuted / sliced views of projections and dO, dM as transposed views, read in place (no copy
  reaches the library); chunked and element loads agree.

bf16 under Triton's interpreter: ``tl.dot`` is wrong on bf16 operands there
(triton issue 11584), so the kernels upcast the two dot operands to fp32 right
before each ``tl.dot`` (``DOT_FP32``).  bf16 loads, casts of P and dS to bf16
and bf16 stores are exercised; the bf16 tensor-core product itself is not.
"""

import pytest
import torch

import semask_fast
from semask_fast import reference
from semask_fast.backends import registry
from semask_fast.backends.registry import BackendNotSupportedError
from semask_fast.ops.atm_attention import ATMAttentionInputs
from semask_fast.testing import assert_close, assert_parity, dropout_keep
from tests.conftest import cpu_matrix_unit, next_seed as _next_seed, onednn, require_backend
from tests.harness._cuda_sources import BACKEND, IDS, assert_override_is_scoped, cuda_module, randn, spy_atm_library
from tests.kernels._launch_parity import atm_inputs, ids, kernels, rounded, run_atm

OP = "atm_attention"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (B, h, Nq, Nk, d)
SHAPES = [
    (1, 8, 150, 400, 32),   # SegViT class tokens over a 20x20 map, batch 1
    (2, 16, 19, 100, 32),   # h = 16 (ViT-L), Cityscapes classes
    (2, 1, 37, 81, 64),     # one head, odd sizes
    (1, 3, 21, 50, 128),    # largest head dim
    (1, 5, 9, 33, 16),      # smallest head dim, odd head count
]


def _inputs(B, H, NQ, NK, D, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(B, H, rows, D, generator=g, dtype=torch.float64).to(device)
            for n, rows in (("q", NQ), ("k", NK), ("v", NK))}


# --------------------------------------------------------------------------- #
# every backend
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_parity(kernel_backend, shape, dtype):
    device = require_backend(OP, kernel_backend)
    assert_parity(semask_fast.atm_attention, _inputs(*shape, device), ["q", "k", "v"], dtype,
                  backend=kernel_backend, op=OP)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_peaked_logits(kernel_backend, dtype):
    """Logits above 100 (exp overflows fp32 past 88.7): a softmax without the row maximum fails."""
    device = require_backend(OP, kernel_backend)
    t = _inputs(2, 2, 19, 100, 32, device)
    t["q"], t["k"] = t["q"] * 6, t["k"] * 6
    assert ((t["q"] * 32 ** -0.5) @ t["k"].transpose(-2, -1)).max() > 100
    assert_parity(semask_fast.atm_attention, t, ["q", "k", "v"], dtype, backend=kernel_backend, op=OP)


def test_parity_custom_scale(kernel_backend):
    device = require_backend(OP, kernel_backend)
    fn = lambda backend, **t: semask_fast.atm_attention(**t, scale=0.3, backend=backend)  # noqa: E731
    assert_parity(fn, _inputs(2, 4, 30, 70, 32, device), ["q", "k", "v"], torch.float32, backend=kernel_backend,
                  op=OP)


def _keep_mask(backend, B, H, NQ, NK, p, device):
    """The keep-mask a backend's kernels apply for the seed drawn next from torch's generator."""
    seed = _next_seed(backend, OP, device)
    if backend == "triton":
        from semask_fast.kernels.atm_attention import dropout_keep_mask

        return dropout_keep_mask(seed, B, H, NQ, NK, p, device=device)

    return dropout_keep(seed, (B, H, NQ, NK), p).to(device)


_DROPOUT_CASES = [("triton", torch.float32), ("triton", torch.float16), ("cpu", torch.float32),
                  ("cpu", torch.float64), ("cpu", torch.bfloat16)]  # cpu bfloat16: on the matrix unit where there is one


@pytest.mark.parametrize("backend,dtype", _DROPOUT_CASES,
                         ids=[f"{b}-{str(d).replace('torch.', '')}" for b, d in _DROPOUT_CASES])
def test_dropout_replay(backend, dtype):
    """Forward and backward dropout equal the reference with the kernels' keep-mask for the seed."""
    device = require_backend(OP, backend)
    from semask_fast import reference
    from semask_fast.testing import TOLERANCES

    B, H, NQ, NK, D, p = 2, 3, 40, 90, 32, 0.1
    t = {n: x.to(dtype).requires_grad_() for n, x in _inputs(B, H, NQ, NK, D, device).items()}
    torch.manual_seed(7)
    with semask_fast.record_dispatch() as ran:
        out, mask_logits = semask_fast.atm_attention(t["q"], t["k"], t["v"], dropout_p=p, backend=backend)
        gout, gmask = torch.randn_like(out), torch.randn_like(mask_logits)
        torch.autograd.backward([out, mask_logits], [gout, gmask])
    assert ran == [(OP, backend, "forward"), (OP, backend, "backward")]
    torch.manual_seed(7)
    keep = _keep_mask(backend, B, H, NQ, NK, p, device)
    assert 0.85 < keep.float().mean().item() < 0.95  # about 1 - p kept

    r = {n: x.detach().double().requires_grad_() for n, x in t.items()}
    r_out, r_mask = reference.atm_attention(r["q"], r["k"], r["v"], dropout_p=p, dropout_keep=keep)
    torch.autograd.backward([r_out, r_mask], [gout.double(), gmask.double()])
    tol = TOLERANCES[dtype][1]
    tol = dict(atol=tol.atol, rtol=tol.rtol)
    torch.testing.assert_close(out.double(), r_out, **tol)
    torch.testing.assert_close(mask_logits.double(), r_mask, **tol)
    for n in t:
        torch.testing.assert_close(t[n].grad.double(), r[n].grad, **tol)
    # Without the keep-mask the reference differs: the test can fail.
    assert not torch.allclose(out.double(), reference.atm_attention(r["q"], r["k"], r["v"])[0], atol=1e-2)


def test_triton_dropout_seed_changes_mask():
    require_backend(OP, "triton")
    from semask_fast.kernels.atm_attention import dropout_keep_mask

    a, b = dropout_keep_mask(1, 1, 2, 20, 30, 0.5), dropout_keep_mask(2, 1, 2, 20, 30, 0.5)
    assert not torch.equal(a, b)
    assert torch.equal(a, dropout_keep_mask(1, 1, 2, 20, 30, 0.5))


@pytest.mark.parametrize("d", [8, 256])
def test_triton_rejects_head_dim(d):
    t = _inputs(1, 2, 4, 8, d, require_backend(OP, "triton"))
    with pytest.raises(ValueError, match=f"head_dim={d}"):
        semask_fast.atm_attention(t["q"].float(), t["k"].float(), t["v"].float(), backend="triton")


# --------------------------------------------------------------------------- #
# triton launchers with explicit plans (tests/kernels/_launch_parity.py)
# --------------------------------------------------------------------------- #


@ids()
@pytest.mark.parametrize("d", [32, 64, 128])
def test_atm_gpu_tiles(d, dtype):
    """The GPU tiles: several key and query blocks, head groups with padding heads (5 heads in groups
    of 2 at d = 32) and one group of one head at d = 128."""
    k = kernels("atm_attention")
    shape = (1, 5, 40, 70, d)
    B, H, NQ, NK, D = shape
    bwd = k.backward_plan(H, NQ, NK, D, dtype, interpreter=False)
    if d == 32:
        assert bwd["kv"]["BLOCK_G"] == 2
    run_atm(k, rounded(atm_inputs(*shape), dtype), D ** -0.5, k.forward_plan(H, NQ, NK, D, dtype, interpreter=False),
            bwd)


@ids([torch.float32, torch.float16])
def test_atm_dropout_replay(dtype):
    k = kernels("atm_attention")
    B, H, NQ, NK, D, p, seed = 2, 3, 40, 90, 32, 0.1, 99
    keep = k.dropout_keep_mask(seed, B, H, NQ, NK, p)
    assert 0.85 < keep.float().mean().item() < 0.95
    assert not torch.equal(keep, k.dropout_keep_mask(seed + 1, B, H, NQ, NK, p))
    run_atm(k, rounded(atm_inputs(B, H, NQ, NK, D), dtype), D ** -0.5, dropout_p=p, seed=seed, keep=keep)


@ids()
@pytest.mark.parametrize("gpu_tiles", [False, True], ids=["interpreter-tiles", "gpu-tiles"])
def test_atm_peaked_logits(gpu_tiles, dtype):
    """q = 3.9 z, d = 64, scale 1/8, and the first 20 of the 50 keys equal to the 20 queries: diagonal
    logits 1.9 |z|^2 ~ 120 (the other keys' logits ~ N(0, 15^2))."""
    k = kernels("atm_attention")
    B, H, NQ, NK, D = 1, 3, 20, 50, 64
    t = atm_inputs(B, H, NQ, NK, D, scale=3.9)
    t["k"][:, :, :NQ] = t["q"]
    t = rounded(t, dtype)
    assert ((t["q"].double() @ t["k"].double().transpose(-2, -1) / 8).amax(-1) > 90).float().mean() > 0.5
    interpreter = not gpu_tiles
    run_atm(k, t, 0.125, k.forward_plan(H, NQ, NK, D, dtype, interpreter=interpreter),
            k.backward_plan(H, NQ, NK, D, dtype, interpreter=interpreter))


# --------------------------------------------------------------------------- #
# cpu (the native C++ kernels of csrc/cpu/atm_attention.cpp)
# --------------------------------------------------------------------------- #
def _cpu_fn(dropout_p=0.0, seed=None):
    def fn(q, k, v):
        if seed is not None:
            torch.manual_seed(seed)  # the same dropout seed on every call
        return semask_fast.atm_attention(q, k, v, dropout_p=dropout_p, backend="cpu")
    return fn


@pytest.mark.parametrize("shape,dropout_p", [((1, 2, 5, 70, 16), 0.0), ((2, 3, 4, 9, 16), 0.0),
                                             ((1, 2, 3, 70, 16), 0.3)],
                         ids=["two-key-blocks", "batch2", "dropout"])
def test_cpu_gradcheck(shape, dropout_p):
    """float64 gradcheck of both outputs on the cpu kernels (dropout with a fixed seed: the same mask
    in every evaluation); past a thousand inputs in fast mode (random directions)."""
    require_backend(OP, "cpu")
    t = {n: x.requires_grad_() for n, x in _inputs(*shape, "cpu").items()}
    fn = _cpu_fn(dropout_p, seed=3 if dropout_p else None)
    fast = sum(x.numel() for x in t.values()) > 1000
    with semask_fast.record_dispatch() as ran:
        assert torch.autograd.gradcheck(fn, (t["q"], t["k"], t["v"]), fast_mode=fast)
    assert ("atm_attention", "cpu", "forward") in ran and ("atm_attention", "cpu", "backward") in ran
    assert {b for _, b, _ in ran} == {"cpu"}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_cpu_odd_head_dim(dtype):
    """head_dim 20: zero padded to 32 for the kernels, sliced back."""
    device = require_backend(OP, "cpu")
    assert_parity(semask_fast.atm_attention, _inputs(2, 3, 30, 70, 20, device), ["q", "k", "v"], dtype,
                  backend="cpu", op=OP)


@pytest.mark.parametrize("head_dim", [20, 32], ids=["d20-padded", "d32"])
def test_channels_last_inputs_and_gradients(kernel_backend, head_dim):
    """q, k, v and the output gradient in channels_last (a dense layout whose last dim is not the
    fastest): computed like contiguous ones, through the cpu backend's head_dim padding too."""
    device = require_backend(OP, kernel_backend)
    t = _inputs(2, 3, 7, 9, head_dim, device)
    cl = {n: x.float().contiguous(memory_format=torch.channels_last).requires_grad_() for n, x in t.items()}
    gout = torch.randn(2, 3, 7, head_dim, device=device).contiguous(memory_format=torch.channels_last)
    gmask = torch.randn(2, 7, 9, device=device)
    with semask_fast.record_dispatch() as ran:
        out, mask = semask_fast.atm_attention(cl["q"], cl["k"], cl["v"], backend=kernel_backend)
        grads = torch.autograd.grad((out, mask), list(cl.values()), (gout, gmask))
    assert {b for _, b, _ in ran} == {kernel_backend}
    r = {n: x.detach().double().requires_grad_() for n, x in cl.items()}  # the float32-rounded inputs
    ref_out, ref_mask = semask_fast.atm_attention(r["q"], r["k"], r["v"], backend="reference")
    ref_grads = torch.autograd.grad((ref_out, ref_mask), list(r.values()), (gout.double(), gmask.double()))
    for what, got, want in zip(("out", "mask", "dq", "dk", "dv"), (out, mask, *grads), (ref_out, ref_mask, *ref_grads)):
        assert_close(got, want, torch.float32, backward=what.startswith("d"), what=what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_cpu_thread_count_invariant(dtype):
    """Outputs and gradients are bitwise the same on 1 and 2 threads (the forward splits the class tokens
    of the one batch item over 2 threads; dQ partials are added in range order; bfloat16 on the matrix
    unit where the machine has one)."""
    require_backend(OP, "cpu")
    t = _inputs(1, 4, 150, 300, 32, "cpu")
    g = torch.Generator().manual_seed(1)
    gout, gmask = (torch.randn(1, 4, 150, 32, generator=g).to(dtype),
                   torch.randn(1, 150, 300, generator=g).to(dtype))
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            x = {k: v.to(dtype).requires_grad_() for k, v in t.items()}
            torch.manual_seed(5)
            out, mask_logits = semask_fast.atm_attention(x["q"], x["k"], x["v"], dropout_p=0.1, backend="cpu")
            torch.autograd.backward([out, mask_logits], [gout, gmask])
            results.append([out.detach(), mask_logits.detach()] + [x[k].grad for k in ("q", "k", "v")])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# (B, h, Nq, Nk, d) at the matrix-unit path's edges: a padded head_dim, odd Nq / Nk, several blocks
# of class tokens, one class token, Nk whose tiles get a padded row stride (tile_ld: 512 -> 528).
MATRIX_UNIT_SHAPES = [(1, 4, 150, 400, 32), (2, 3, 37, 81, 20), (1, 2, 1, 17, 16), (1, 2, 20, 512, 16)]


@pytest.mark.parametrize("unit", [True, False], ids=["matrix-unit", "converted"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("shape", MATRIX_UNIT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_reduced_paths(shape, dtype, unit):
    """float16 / bfloat16 on the matrix unit (AMX, where oneDNN packs the type) and on the converted
    float32 path (oneDNN switched off): both within the dtype's tolerance of float64."""
    if unit and not cpu_matrix_unit(dtype):
        pytest.skip(f"no matrix unit for {dtype} on this machine (AMX; float16 needs AMX-FP16)")
    with onednn(unit):
        assert cpu_matrix_unit(dtype) == unit
        assert_parity(semask_fast.atm_attention, _inputs(*shape, "cpu"), ["q", "k", "v"], dtype, backend="cpu", op=OP)


@pytest.mark.parametrize("forward_on_unit", [True, False], ids=["unit-then-converted", "converted-then-unit"])
@pytest.mark.parametrize("head_dim", [32, 20], ids=["d32", "d20-padded"])
def test_cpu_matrix_unit_switched_between_forward_and_backward(head_dim, forward_on_unit):
    """oneDNN switched between forward (with dropout) and backward (the backward then runs on the other
    path; from the unit to the converted path it recomputes the float32 output with the same seed):
    the same gradients within tolerance as with no switch."""
    if not cpu_matrix_unit(torch.bfloat16):
        pytest.skip("no matrix unit for bfloat16 on this machine")
    t = _inputs(2, 3, 40, 90, head_dim, "cpu")
    g = torch.Generator().manual_seed(3)
    gout, gmask = torch.randn(2, 3, 40, head_dim, generator=g), torch.randn(2, 40, 90, generator=g)
    grads = []
    for switch in (False, True):
        x = {k: v.bfloat16().requires_grad_() for k, v in t.items()}
        torch.manual_seed(11)
        with onednn(forward_on_unit):
            out, mask_logits = semask_fast.atm_attention(x["q"], x["k"], x["v"], dropout_p=0.1, backend="cpu")
        with onednn(forward_on_unit != switch):
            torch.autograd.backward([out, mask_logits], [gout.bfloat16(), gmask.bfloat16()])
        grads.append([x[k].grad for k in ("q", "k", "v")])
    for a, b in zip(*grads):
        assert_close(a, b, torch.bfloat16, backward=True)


# --------------------------------------------------------------------------- #
# cuda sources: csrc/ops/atm_attention.cu under the SIMT harness
# --------------------------------------------------------------------------- #


# ---------------------------------------------------------------- dropout --
@pytest.mark.harness
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_simt_atm_dropout_replay(dtype):
    require_backend("atm_attention", BACKEND)
    b, h, nq, nk, d, p = 2, 3, 19, 45, 16, 0.1
    g = torch.Generator().manual_seed(1)
    t = {"q": randn(g, b, h, nq, d), "k": randn(g, b, h, nk, d), "v": randn(g, b, h, nk, d)}
    _assert_simt_dropout_replay(t, p, dtype, torch_seed=12)


def _assert_simt_dropout_replay(t, p, dtype, torch_seed):
    """The simt kernels' dropout (the seed drawn after torch.manual_seed(torch_seed)) replayed in
    the reference with the host's Philox keep-mask: output, mask logits and every gradient."""
    b, h, nq, _ = t["q"].shape
    torch.manual_seed(torch_seed)
    keep = dropout_keep(_next_seed("simt", "atm_attention"), (b, h, nq, t["k"].shape[2]), p)

    def fn(backend, **kw):
        if backend == "reference":
            return reference.atm_attention(**kw, dropout_p=p, dropout_keep=keep)
        torch.manual_seed(torch_seed)
        return semask_fast.atm_attention(**kw, dropout_p=p, backend=backend)

    assert_parity(fn, t, ["q", "k", "v"], dtype, backend=BACKEND, op="atm_attention")


# ------------------------------------------------------------ edge shapes --
ATM_SHAPES = {
    # (B, heads, Nq, Nk, head_dim)
    "one-query-d128": (1, 1, 1, 40, 128),
    "one-key": (2, 2, 17, 1, 32),
}


@pytest.mark.harness
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("name", list(ATM_SHAPES))
def test_atm_edge_shapes(name, dtype):
    require_backend("atm_attention", BACKEND)
    b, h, nq, nk, d = ATM_SHAPES[name]
    g = torch.Generator().manual_seed(5)
    t = {"q": randn(g, b, h, nq, d), "k": randn(g, b, h, nk, d), "v": randn(g, b, h, nk, d)}
    assert_parity(semask_fast.atm_attention, t, ["q", "k", "v"], dtype, backend=BACKEND, op="atm_attention")


# ------------------------------------------------ ATM forward key splits --
# The ATM forward runs a block per 16 class tokens x key range x batch item (all heads, two
# passes over the range); several ranges are merged by a combine kernel.  `forward_splits(n)`
# replaces the roofline plan within its block.
def _atm_inputs(b, h, nq, nk, d, seed):
    g = torch.Generator().manual_seed(seed)
    return {"q": randn(g, b, h, nq, d), "k": randn(g, b, h, nk, d), "v": randn(g, b, h, nk, d)}


@pytest.mark.harness
def test_atm_split_plan():
    mod = cuda_module("atm_attention")
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


@pytest.mark.harness
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


@pytest.mark.harness
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("name", list(ATM_SPLIT_CASES))
def test_atm_forced_splits(monkeypatch, name, dtype):
    require_backend("atm_attention", BACKEND)
    mod = cuda_module("atm_attention")
    shape, forced, runs = ATM_SPLIT_CASES[name]
    b, h, nq, nk, d = shape
    assert mod.plan_splits(b, h, nq, nk, dtype, d, sms=1, requested=forced) == runs
    calls = spy_atm_library(monkeypatch)
    with mod.forward_splits(forced):
        assert_parity(semask_fast.atm_attention, _atm_inputs(*shape, seed=7), ["q", "k", "v"], dtype, backend=BACKEND,
                      op="atm_attention")
    assert {c["splits"] for c in calls if c["call"] == "forward"} == {runs}


@pytest.mark.harness
@pytest.mark.parametrize("forced", [1, 3])
def test_atm_dropout_replay_splits(forced):
    require_backend("atm_attention", BACKEND)
    mod = cuda_module("atm_attention")
    b, h, nq, nk, d, p = 1, 4, 18, 90, 32, 0.2
    t = _atm_inputs(b, h, nq, nk, d, seed=8)
    with mod.forward_splits(forced):
        _assert_simt_dropout_replay(t, p, torch.float16, torch_seed=13)


@pytest.mark.harness
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
        with cuda_module("atm_attention").forward_splits(forced):
            out, m = semask_fast.atm_attention(t["q"], t["k"], t["v"], backend=BACKEND)
        (out.float().sum() + m.float().square().sum()).backward()
        runs.append([out, m] + [t[n].grad for n in ("q", "k", "v")])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.harness
def test_atm_forward_splits_is_scoped(monkeypatch):
    """forward_splits holds inside its block only, nests, and does not reach other threads."""
    require_backend("atm_attention", BACKEND)
    mod = cuda_module("atm_attention")
    calls = spy_atm_library(monkeypatch)
    q, k, v = (x.float() for x in _atm_inputs(1, 2, 16, 300, 16, seed=3).values())  # 10 key tiles
    planned = mod.plan_splits(1, 2, 16, 300, torch.float32, 16, sms=mod.HARNESS_MULTIPROCESSORS)
    assert planned not in (2, 3)

    def splits_run():
        semask_fast.atm_attention(q, k, v, backend=BACKEND)
        return calls[-1]["splits"]

    assert_override_is_scoped(mod.forward_splits, splits_run, planned)


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


@pytest.mark.harness
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
    fused = {"fused-qkv": {"qkv": randn(g, b, nq, 3, h, d)},
             "segvit-q-and-kv": {"q": randn(g, b, nq, h, d), "kv": randn(g, b, nk, 2, h, d)},
             "sliced-heads": {"q": randn(g, b, h, nq, 15), "k": randn(g, b, h, nk, 15),
                              "v": randn(g, b, h, nk, 15)}}[name]
    calls = spy_atm_library(monkeypatch)
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


@pytest.mark.harness
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
