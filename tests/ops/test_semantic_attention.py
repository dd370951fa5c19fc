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


def test_peaked_softmax(kernel_backend):
    """Large unscaled logits (|S| ~ 100): the online softmax must not overflow."""
    device = require_backend(OP, kernel_backend)
    assert_parity(semask_fast.semantic_attention, _inputs(2, 49, 150, 32, device, logit_scale=1.0),
                  ["sq", "sk", "yv"], torch.float32, backend=kernel_backend, op=OP)


def test_triton_windows_per_program():
    """Several windows per program (the packing used for large windowed batches), B_ not a multiple."""
    require_backend(OP, "triton")
    from semask_fast import reference
    from semask_fast.kernels.semantic_attention import semantic_attention_backward, semantic_attention_forward

    t = _inputs(7, 49, 150, 40, "cpu")
    sq, sk, yv = (t[n].float() for n in ("sq", "sk", "yv"))
    gout = torch.randn(7, 49, 40)
    out, lse = semantic_attention_forward(sq, sk, yv, windows_per_program=3)
    grads = semantic_attention_backward(sq, sk, yv, out, lse, gout, windows_per_program=3)
    ref_in = [x.double().requires_grad_() for x in (sq, sk, yv)]
    ref_out = reference.semantic_attention(*ref_in)
    ref_out.backward(gout.double())
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_in):
        torch.testing.assert_close(g.double(), r.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), torch.logsumexp(ref_in[0] @ ref_in[1].transpose(1, 2), -1),
                               atol=1e-5, rtol=1e-5)


def test_triton_rejects_too_many_classes():
    require_backend(OP, "triton")
    t = _inputs(1, 8, 300, 16, "cpu")
    with pytest.raises(ValueError, match="K=300"):
        semask_fast.semantic_attention(t["sq"].float(), t["sk"].float(), t["yv"].float(), backend="triton")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", [(2, 49, 150, 40), (1, 70, 19, 70), (1, 40, 150, 300)],
                         ids=["K150", "K19", "C-tiled"])
def test_triton_gpu_tiles(monkeypatch, shape, dtype):
    """The register-budgeted tiles compiled for GPUs (the interpreter otherwise runs larger ones).

    C = 300 is wider than the key-major backward's C tile on every dtype (several C tiles, dP in
    BLOCK_CD chunks); the other two hold all of C in one tile.  K = 150 runs the two-piece K
    registers (128 + 32), K = 19 one piece."""
    require_backend(OP, "triton")
    from semask_fast.kernels import semantic_attention as kernels

    monkeypatch.setattr(kernels, "INTERPRETER_TILES", False)
    assert_parity(semask_fast.semantic_attention, _inputs(*shape, "cpu"), ["sq", "sk", "yv"], dtype,
                  backend="triton", op=OP)


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


def test_triton_reads_views_in_place(monkeypatch):
    """The Triton backend hands row-strided views to the kernels as they are (no copy)."""
    require_backend(OP, "triton")
    from semask_fast.kernels import semantic_attention as kernels

    seen = []
    launch = kernels.semantic_attention_forward

    def spy(sq, sk, yv, **kw):
        seen.append((sq, sk, yv))
        return launch(sq, sk, yv, **kw)

    monkeypatch.setattr(kernels, "semantic_attention_forward", spy)
    K, C = 19, 24
    qkv = _fused(2, 30, K, C, "cpu")["qkv"].float()
    sq, sk, yv = qkv.split([K, K, C], dim=-1)
    semask_fast.semantic_attention(sq, sk, yv, backend="triton")
    (a, b, c), = seen
    row = 2 * K + C
    assert [t.stride() for t in (a, b, c)] == [(30 * row, row, 1)] * 3
    assert [t.data_ptr() - qkv.data_ptr() for t in (a, b, c)] == [0, 4 * K, 8 * K]
