"""Every test of ``semantic_attention`` (softmax(Sq Sk^T) Yv, no scale), one section per backend.

Every backend: outputs and all three gradients (dSq, dSk, dYv) are compared with the float64
reference through ``assert_parity``, which also asserts that the requested
backend ran forward and backward.  Shapes are SeMask's scaled down: windowed
(N = 49, 144 with several windows), global (N ~ 400), K = 150 and 19, C up to
1536, odd sizes and batch 1; peaked logits; row-strided views read in place.  Then:

* triton launchers (``semask_fast.kernels.semantic_attention``) called directly with explicit plans
  (helpers: ``tests/kernels/_launch_parity.py``): the GPU tiles (several C tiles, the two-piece K
  registers), several windows per program, and peaked logits (Sq = Sk = 0.9 z over K = 150:
  unscaled diagonal logits ~120, past exp's fp32 range at ~88.7) with one and with several key
  tiles, built with a modest scale over a wide K for the reason given in
  tests/ops/test_window_attention.py (the backward's D = rowsum(dO * O) rounding);
* cpu: gradcheck on the native kernels, thread-count independence;
* cuda sources: csrc/ops/semantic_attention.cu run by the SIMT harness (``harness`` marker): shapes
  at the edges of the tiling (K = 1 and K = 160 classes, C tiles with a remainder, single query /
  key rows, the dSq / dSk / dYv blocks at their C-tile edges), several dYv C tiles read from
  strided inputs, and the backward's traffic (inputs read once, gradients written once).

bf16 under Triton's interpreter: ``tl.dot`` is wrong on bf16 operands there
(triton issue 11584), so the kernels upcast the two dot operands to fp32 right
before each ``tl.dot`` (``DOT_FP32``).  bf16 loads, casts of P and dS to bf16,
and bf16 stores are exercised; the bf16 tensor-core product itself is not (it
is on a GPU).
"""

import dataclasses

import pytest
import torch

import semask_fast
from semask_fast import _build
from semask_fast._traffic import harness_bytes
from semask_fast.testing import assert_close, assert_parity
from tests.conftest import cpu_matrix_unit, onednn, require_backend, require_toolchain
from tests.harness._cuda_sources import BACKEND, IDS, randn
from tests.kernels._launch_parity import ids, kernels, rounded, run_semantic, semantic_inputs

OP = "semantic_attention"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (B_, N, K, C): windowed ws 7 / ws 12 (several windows), global, Cityscapes K, odd sizes, batch 1.
SHAPES = [
    (6, 49, 150, 96),     # SeMask-T stage 1 windows
    (3, 144, 19, 64),     # ws 12, Cityscapes classes
    (1, 400, 150, 48),    # global stage, batch 1
    (1, 40, 150, 1536),   # SeMask-L stage 4 width: one head, C tiled
    (5, 9, 7, 33),        # odd, tiny
    (2, 97, 41, 130),     # odd, > one block of keys and of C
]


def _inputs(B, N, K, C, device, logit_scale=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Scores Sq.Sk^T are unscaled sums over K: keep them O(1..10) as trained priors are.
    sq = torch.randn(B, N, K, generator=g, dtype=torch.float64) * logit_scale
    sk = torch.randn(B, N, K, generator=g, dtype=torch.float64) * logit_scale
    yv = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    return {"sq": sq.to(device), "sk": sk.to(device), "yv": yv.to(device)}


# --------------------------------------------------------------------------- #
# every backend
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_parity(kernel_backend, shape, dtype):
    device = require_backend(OP, kernel_backend)
    assert_parity(semask_fast.semantic_attention, _inputs(*shape, device), ["sq", "sk", "yv"], dtype,
                  backend=kernel_backend, op=OP)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", [(2, 49, 150, 32), (1, 300, 150, 32)], ids=["window", "several-key-blocks"])
def test_peaked_softmax(kernel_backend, shape, dtype):
    """Large unscaled logits (max > 100; exp overflows fp32 past 88.7): a softmax that forgets the
    row maximum fails, with one key block and with the online loop over several, in every dtype."""
    device = require_backend(OP, kernel_backend)
    t = _inputs(*shape, device, logit_scale=1.7)
    assert (t["sq"] @ t["sk"].transpose(-2, -1)).max() > 100
    assert_parity(semask_fast.semantic_attention, t, ["sq", "sk", "yv"], dtype, backend=kernel_backend, op=OP)


def test_triton_rejects_too_many_classes():
    t = _inputs(1, 8, 300, 16, require_backend(OP, "triton"))
    with pytest.raises(ValueError, match="K=300"):
        semask_fast.semantic_attention(t["sq"].float(), t["sk"].float(), t["yv"].float(), backend="triton")


def _fused(B, N, K, C, device, seed=0):
    """One (B_, N, 2K + C) tensor: Sq, Sk, Yv are its column views (the fused-projection layout)."""
    t = _inputs(B, N, K, C, device, seed=seed)
    return {"qkv": torch.cat([t["sq"], t["sk"], t["yv"]], dim=-1)}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", [(3, 49, 150, 40), (1, 70, 19, 200)], ids=["win7", "K19-wideC"])
def test_parity_row_strided_views(kernel_backend, shape, dtype):
    """Sq, Sk, Yv as column slices of one tensor (row stride 2K + C); the gradient lands in that tensor."""
    device = require_backend(OP, kernel_backend)
    K, C = shape[2], shape[3]

    def fn(backend, qkv):
        sq, sk, yv = qkv.split([K, K, C], dim=-1)
        return semask_fast.semantic_attention(sq, sk, yv, backend=backend)

    assert_parity(fn, _fused(*shape, device), ["qkv"], dtype, backend=kernel_backend, op=OP)


@pytest.mark.parametrize("which", ["K", "C"])
def test_parity_size_one_last_dim_with_a_stride(kernel_backend, which):
    """K = 1 (or C = 1) taken as every other column: a last dim of size 1 whose stride is 2 is still
    a contiguous last dim, and is computed (a binding that demands stride 1 rejects it)."""
    device = require_backend(OP, kernel_backend)
    K, C = (1, 8) if which == "K" else (3, 1)
    t = _inputs(2, 16, 2 * K, 2 * C, device)

    def fn(backend, sq, sk, yv):
        return semask_fast.semantic_attention(sq[..., ::2], sk[..., ::2], yv[..., ::2], backend=backend)

    assert_parity(fn, t, ["sq", "sk", "yv"], torch.float32, backend=kernel_backend, op=OP)


def test_triton_reads_views_in_place(semantic_launches):
    """The Triton backend hands row-strided views to the kernels as they are (no copy)."""
    K, C = 19, 24
    qkv = _fused(2, 30, K, C, require_backend(OP, "triton"))["qkv"].float()
    sq, sk, yv = qkv.split([K, K, C], dim=-1)
    semask_fast.semantic_attention(sq, sk, yv, backend="triton")
    (a, b, c), = semantic_launches
    row = 2 * K + C
    assert [t.stride() for t in (a, b, c)] == [(30 * row, row, 1)] * 3
    assert [t.data_ptr() - qkv.data_ptr() for t in (a, b, c)] == [0, 4 * K, 8 * K]


_COPIES = ("copy_", "clone", "_to_copy", "contiguous")


# (backend, its torch.ops namespace, dtype, C): the harness in every dtype; the cpu kernels read fp32
# and fp64 in place (fp16 / bf16 are converted, a copy by design).
_IN_PLACE = [("simt", "semask_fast_simt", dtype, 24) for dtype in DTYPES] + [("cpu", "semask_fast_cpu", torch.float32, 32)]


@pytest.mark.parametrize("backend,namespace,dtype,C", _IN_PLACE,
                         ids=[f"{b}-{str(d).replace('torch.', '')}" for b, _, d, _ in _IN_PLACE])
def test_reads_views_in_place(backend, namespace, dtype, C):
    """The kernel backends hand the row-strided column views of one fused q/k/v tensor to their
    kernels as they are, forward and backward: no aten op copies from the fused tensor's storage,
    and both bindings receive pointers into it with its strides."""
    require_backend(OP, backend)
    from torch.utils._python_dispatch import TorchDispatchMode

    B, N, K = 2, 30, 19
    qkv = _fused(B, N, K, C, "cpu")["qkv"].to(dtype).requires_grad_()
    storage = qkv.untyped_storage().data_ptr()
    copies, calls = [], {}

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if func.namespace == "semask_fast":  # our custom op: run its kernel under the spy
                spec = semask_fast.ops.SPECS[name.removesuffix("_backward")]
                kernel = spec.run_backward if name.endswith("_backward") else spec.run_forward
                with self:
                    return kernel(*args, **(kwargs or {}))
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if name in _COPIES and any(t.untyped_storage().data_ptr() == storage for t in tensors):
                copies.append(str(func))
            if func.namespace == namespace:
                calls[name] = [(t.data_ptr(), t.stride()) for t in tensors]
            return func(*args, **(kwargs or {}))

    with Spy():
        sq, sk, yv = qkv.split([K, K, C], dim=-1)
        semask_fast.semantic_attention(sq, sk, yv, backend=backend).sum().backward()
    assert copies == []
    row, es = 2 * K + C, qkv.element_size()
    views = [(qkv.data_ptr() + es * off, (N * row, row, 1)) for off in (0, K, 2 * K)]
    assert calls["semantic_attention_forward"] == views
    assert calls["semantic_attention_backward"][1:4] == views  # (dout, sq, sk, yv, out, lse)
    assert qkv.grad is not None and qkv.grad.shape == qkv.shape


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("backend", ["simt", "cpu"])
def test_batch_and_last_dim_strides(backend, dtype):
    """Batch stride below the row stride (inputs stored (N, B_, .) and transposed), and Sk with a
    non-unit last-dim stride (the impl copies it; the kernels need contiguous rows)."""
    device = require_backend(OP, backend)
    B, N, K, C = 3, 37, 21, 40
    t = _inputs(B, N, K, C, device)
    t = {"sq": t["sq"].transpose(0, 1).contiguous(), "sk": t["sk"].transpose(1, 2).contiguous(),
         "yv": t["yv"].transpose(0, 1).contiguous()}  # (N, B, K), (B, K, N), (N, B, C)

    def fn(backend, sq, sk, yv):
        return semask_fast.semantic_attention(sq.transpose(0, 1), sk.transpose(1, 2), yv.transpose(0, 1),
                                              backend=backend)

    assert_parity(fn, t, ["sq", "sk", "yv"], dtype, backend=backend, op=OP)


@pytest.mark.parametrize("backend", ["simt", "cpu"])
def test_binding_rejects_strided_rows(backend):
    """The binding itself states its layout requirement (the impl never passes such a tensor)."""
    require_backend(OP, backend)
    from semask_fast.backends import registry

    lib = registry.implementation(OP, backend).library()
    sq = torch.randn(1, 8, 4)
    with pytest.raises(RuntimeError, match="sk must have a contiguous last dim"):
        lib.semantic_attention_forward(sq, torch.randn(1, 4, 8).transpose(1, 2), torch.randn(1, 8, 5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("C", [64, 65, 128, 129])
def test_harness_fused_dyv_edges(C, dtype):
    """fp16 / bf16: up to C = 128 the dSk block computes all of dYv too (one or two 64-column chunks,
    the last one partial); from C = 129 a second block of the same launch computes the columns past 128
    (the cuda sources section below covers more C tiles).  Two key blocks of 64 and a partial one."""
    device = require_backend(OP, "simt")
    assert_parity(semask_fast.semantic_attention, _inputs(2, 130, 19, C, device), ["sq", "sk", "yv"], dtype,
                  backend="simt", op=OP)


# --------------------------------------------------------------------------- #
# triton launchers with explicit plans (tests/kernels/_launch_parity.py)
# --------------------------------------------------------------------------- #


@ids()
@pytest.mark.parametrize("shape", [(2, 49, 150, 40), (1, 70, 19, 70), (1, 40, 150, 300)],
                         ids=["K150", "K19", "C-tiled"])
def test_semantic_gpu_tiles(shape, dtype):
    """The register-budgeted GPU tiles.  C = 300 is wider than the key-major backward's C tile on every
    dtype (several C tiles, dP in BLOCK_CD chunks); the others hold all of C in one tile.  K = 150 runs
    the two-piece K registers (128 + 32), K = 19 one piece."""
    k = kernels("semantic_attention")
    B, N, K, C = shape
    run_semantic(k, rounded(semantic_inputs(*shape), dtype), k.forward_plan(B, N, K, C, dtype, interpreter=False),
                 k.backward_plan(B, N, K, C, dtype, interpreter=False))


def test_semantic_several_windows_per_program():
    """Three windows per program over 7 windows: the last program's third window does not exist."""
    k = kernels("semantic_attention")
    B, N, K, C = 7, 9, 19, 33
    fwd = dataclasses.replace(k.forward_plan(B, N, K, C, torch.float32), per_program=3)
    bwd = {part: dataclasses.replace(p, per_program=3) for part, p in k.backward_plan(B, N, K, C,
                                                                                         torch.float32).items()}
    run_semantic(k, rounded(semantic_inputs(B, N, K, C), torch.float32), fwd, bwd)


@ids()
@pytest.mark.parametrize("n,gpu_tiles", [(49, False), (97, True)], ids=["one-key-tile", "key-loop"])
def test_semantic_peaked_logits(n, gpu_tiles, dtype):
    """Sq = Sk = 0.9 z over K = 150 classes: unscaled diagonal logits 0.81 |z|^2 ~ 120."""
    k = kernels("semantic_attention")
    t = semantic_inputs(2, n, 150, 24, logit_scale=0.9)
    t["sk"] = t["sq"].clone()
    t = rounded(t, dtype)
    assert ((t["sq"].double() @ t["sk"].double().transpose(-2, -1)).amax(-1) > 90).float().mean() > 0.5
    plans = (k.forward_plan(2, n, 150, 24, dtype, interpreter=not gpu_tiles),
             k.backward_plan(2, n, 150, 24, dtype, interpreter=not gpu_tiles))
    assert (plans[0]["BLOCK_N"] < n) == gpu_tiles
    run_semantic(k, t, *plans)


# --------------------------------------------------------------------------- #
# cpu (the native C++ kernels of csrc/cpu/semantic_attention.cpp)
# --------------------------------------------------------------------------- #
# (B_, N, K, C) for the native cpu kernels' own paths: a 48 + 1 query/key tail scored by dot
# products, a padded vector tail, several forward key blocks (online softmax, N > 128) and several
# backward key blocks and ranges (dSq partials, N > 64).
CPU_GRADCHECK_SHAPES = [(2, 17, 5, 7), (1, 27, 4, 19), (1, 70, 3, 5), (1, 131, 2, 3)]


@pytest.mark.parametrize("shape", CPU_GRADCHECK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_gradcheck(shape):
    """float64 gradcheck on the cpu kernels themselves (forward and backward asserted to run there);
    past a thousand inputs in fast mode (random directions: the full Jacobian would take minutes)."""
    require_backend(OP, "cpu")
    t = {n: x.requires_grad_() for n, x in _inputs(*shape, "cpu", logit_scale=1.0).items()}
    fn = lambda sq, sk, yv: semask_fast.semantic_attention(sq, sk, yv, backend="cpu")  # noqa: E731
    fast = sum(x.numel() for x in t.values()) > 1000
    with semask_fast.record_dispatch() as ran:
        assert torch.autograd.gradcheck(fn, (t["sq"], t["sk"], t["yv"]), fast_mode=fast)
    assert ("semantic_attention", "cpu", "forward") in ran and ("semantic_attention", "cpu", "backward") in ran
    assert {b for _, b, _ in ran} == {"cpu"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(6, 49, 150, 96), (2, 200, 19, 40)], ids=["windows", "global-partials"])
def test_cpu_thread_count_invariant(shape, dtype):
    """Outputs and gradients are bitwise the same on 1 and 2 threads (blockings depend on the shape
    only; bfloat16 on the matrix unit where the machine has one)."""
    require_backend(OP, "cpu")
    t = _inputs(*shape, "cpu", logit_scale=0.5)
    gout = torch.randn(shape[0], shape[1], shape[3], generator=torch.Generator().manual_seed(1)).to(dtype)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            x = {k: v.to(dtype).requires_grad_() for k, v in t.items()}
            out = semask_fast.semantic_attention(x["sq"], x["sk"], x["yv"], backend="cpu")
            out.backward(gout)
            results.append([out.detach()] + [x[k].grad for k in ("sq", "sk", "yv")])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# Shapes of the matrix-unit path's edges: odd K and C (staged A rows), one query block with an odd
# count (the transposed A's zero column), several query blocks (packed operands shared), one token,
# N and C whose tiles get padded row strides (sf_cpu_matrix.h tile_ld: 512 columns -> 528).
MATRIX_UNIT_SHAPES = [(2, 49, 150, 96), (1, 131, 19, 40), (2, 33, 7, 9), (3, 1, 4, 6), (1, 300, 150, 48),
                      (1, 512, 9, 512)]


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
        assert_parity(semask_fast.semantic_attention, _inputs(*shape, "cpu"), ["sq", "sk", "yv"], dtype,
                      backend="cpu", op=OP)


@pytest.mark.parametrize("forward_on_unit", [True, False], ids=["unit-then-converted", "converted-then-unit"])
@pytest.mark.parametrize("n", [49, 70], ids=["one-key-block", "two-key-blocks"])
def test_cpu_matrix_unit_switched_between_forward_and_backward(n, forward_on_unit):
    """oneDNN switched between forward and backward (the backward then runs on the other path; from the
    unit to the converted path it recomputes the float32 output it needs): the same gradients within
    tolerance as with no switch."""
    if not cpu_matrix_unit(torch.bfloat16):
        pytest.skip("no matrix unit for bfloat16 on this machine")
    t = _inputs(2, n, 19, 40, "cpu")
    g = torch.Generator().manual_seed(2)
    gout = torch.randn(2, n, 40, generator=g, dtype=torch.float64).bfloat16()
    grads = []
    for switch in (False, True):
        x = {k: v.bfloat16().requires_grad_() for k, v in t.items()}
        with onednn(forward_on_unit):
            out = semask_fast.semantic_attention(x["sq"], x["sk"], x["yv"], backend="cpu")
        with onednn(forward_on_unit != switch):
            out.backward(gout)
        grads.append([x[k].grad for k in ("sq", "sk", "yv")])
    for a, b in zip(*grads):
        assert_close(a, b, torch.bfloat16, backward=True)


# --------------------------------------------------------------------------- #
# cuda sources: csrc/ops/semantic_attention.cu under the SIMT harness
# --------------------------------------------------------------------------- #


# ------------------------------------------------------------ edge shapes --
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
    return {"sq": randn(g, b_, n, k, scale=k ** -0.25), "sk": randn(g, b_, n, k, scale=k ** -0.25),
            "yv": randn(g, b_, n, c)}


@pytest.mark.harness
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("name", list(SEMANTIC_SHAPES))
def test_semantic_shapes(name, dtype):
    require_backend("semantic_attention", BACKEND)
    t = _semantic_inputs(torch.Generator().manual_seed(6), *SEMANTIC_SHAPES[name])
    assert_parity(semask_fast.semantic_attention, t, ["sq", "sk", "yv"], dtype, backend=BACKEND,
                  op="semantic_attention")


# ------------------------------------ semantic backward: strided inputs, traffic --
@pytest.mark.harness
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


@pytest.mark.harness
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
