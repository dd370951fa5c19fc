"""Parity of ``semantic_attention`` (softmax(Sq Sk^T) Yv, no scale) on every kernel backend.

Outputs and all three gradients (dSq, dSk, dYv) are compared with the float64
reference through ``assert_parity``, which also asserts that the requested
backend ran forward and backward.  Shapes are SeMask's scaled down: windowed
(N = 49, 144 with several windows), global (N ~ 400), K = 150 and 19, C up to
1536, odd sizes and batch 1.

bf16 under Triton's interpreter: ``tl.dot`` is wrong on bf16 operands there
(triton issue 11584), so the kernels upcast the two dot operands to fp32 right
before each ``tl.dot`` (``DOT_FP32``).  bf16 loads, casts of P and dS to bf16,
and bf16 stores are exercised; the bf16 tensor-core product itself is not (it
is on a GPU).
"""

import pytest
import torch

import semask_fast
from semask_fast.testing import assert_parity
from tests.conftest import require_backend

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
    (tests/harness/test_attention_kernels.py covers more C tiles).  Two key blocks of 64 and a partial one."""
    device = require_backend(OP, "simt")
    assert_parity(semask_fast.semantic_attention, _inputs(2, 130, 19, C, device), ["sq", "sk", "yv"], dtype,
                  backend="simt", op=OP)


# ------------------------------------------------------------------ cpu backend --
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


@pytest.mark.parametrize("shape", [(6, 49, 150, 96), (2, 200, 19, 40)], ids=["windows", "global-partials"])
def test_cpu_thread_count_invariant(shape):
    """Outputs and gradients are bitwise the same on 1 and 2 threads (blockings depend on the shape only)."""
    require_backend(OP, "cpu")
    t = _inputs(*shape, "cpu", logit_scale=0.5)
    gout = torch.randn(shape[0], shape[1], shape[3], generator=torch.Generator().manual_seed(1))
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            x = {k: v.float().requires_grad_() for k, v in t.items()}
            out = semask_fast.semantic_attention(x["sq"], x["sk"], x["yv"], backend="cpu")
            out.backward(gout)
            results.append([out.detach()] + [x[k].grad for k in ("sq", "sk", "yv")])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)
