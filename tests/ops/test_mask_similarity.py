"""Every test of ``mask_similarity`` (Segmenter's normalised masks), one section per backend.

Every backend: the output and every gradient (patches, classes, and the fused LayerNorm's
weight and bias when present) are compared with the float64 reference through
``assert_parity``, which also asserts the requested backend ran forward and
backward.  Shapes: Segmenter's (Np patches x K = 150 / 19 classes) scaled down,
odd sizes, batch 1; with and without the ``mask_norm`` epilogue, with and
without its affine parameters; the CUDA kernels' shared-memory limit per device.  Then the
Triton launchers called directly with the GPU tiles (helpers: ``tests/kernels/_launch_parity.py``)
and the cpu kernels (gradcheck, thread-count independence).

bf16 under Triton's interpreter: ``tl.dot`` is wrong on bf16 operands there
(triton issue 11584), so the kernels upcast the two dot operands to fp32 right
before each ``tl.dot`` (``DOT_FP32``).  bf16 loads, the bf16 cast of dS and
bf16 stores are exercised; the bf16 tensor-core product itself is not.
"""

import pytest
import torch

import semask_fast
from semask_fast import reference
from semask_fast.backends.base import record_dispatch
from semask_fast.testing import GRADCHECK, assert_close, assert_parity
from tests.conftest import cpu_matrix_unit, onednn, require_backend
from tests.kernels._launch_parity import assert_matches_reference, grad_outputs_like, ids, kernels, rounded

OP = "mask_similarity"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (B, Np, K, D)
SHAPES = [
    (1, 256, 150, 96),    # ADE20K classes, batch 1
    (2, 100, 19, 64),     # Cityscapes classes
    (3, 37, 9, 33),       # odd sizes
]
# (norm, affine)
EPILOGUES = [(False, False), (True, True), (True, False)]


def _inputs(B, NP, K, D, device, affine, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {"patches": torch.randn(B, NP, D, generator=g, dtype=torch.float64),
         "classes": torch.randn(B, K, D, generator=g, dtype=torch.float64)}
    if affine:
        t["norm_weight"] = 1 + 0.1 * torch.randn(K, generator=g, dtype=torch.float64)
        t["norm_bias"] = 0.1 * torch.randn(K, generator=g, dtype=torch.float64)
    return {n: x.to(device) for n, x in t.items()}


def _op(norm):
    return lambda backend, **t: semask_fast.mask_similarity(**t, norm=norm, backend=backend)


# --------------------------------------------------------------------------- #
# every backend
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("norm,affine", EPILOGUES, ids=["plain", "norm-affine", "norm"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_parity(kernel_backend, shape, norm, affine, dtype):
    device = require_backend(OP, kernel_backend)
    t = _inputs(*shape, device, affine)
    assert_parity(_op(norm), t, list(t), dtype, backend=kernel_backend, op=OP)


def test_parity_fp32_norm_params_with_half_inputs(kernel_backend):
    """Mixed precision as under autocast: fp16 features, fp32 LayerNorm parameters (their grads stay fp32)."""
    device = require_backend(OP, kernel_backend)
    t = _inputs(1, 64, 150, 64, device, affine=True)
    p, c = (t[n].half().requires_grad_() for n in ("patches", "classes"))
    w, b = (t[n].float().requires_grad_() for n in ("norm_weight", "norm_bias"))
    out = semask_fast.mask_similarity(p, c, norm=True, norm_weight=w, norm_bias=b, backend=kernel_backend)
    out.float().square().sum().backward()
    assert out.dtype == torch.float16 and w.grad.dtype == torch.float32
    ref = [x.detach().double().requires_grad_() for x in (p, c, w, b)]
    r = semask_fast.mask_similarity(ref[0], ref[1], norm=True, norm_weight=ref[2], norm_bias=ref[3],
                                    backend="reference")
    r.square().sum().backward()
    assert_close(out, r, torch.float16, what="out")
    for name, x, y in zip(("patches", "classes", "norm_weight", "norm_bias"), (p, c, w, b), ref):
        assert_close(x.grad, y.grad, torch.float16, backward=True, what=f"d{name}")


def test_triton_rejects_too_many_classes():
    t = _inputs(1, 8, 300, 16, require_backend(OP, "triton"), affine=False)
    with pytest.raises(ValueError, match="K=300"):
        semask_fast.mask_similarity(t["patches"].float(), t["classes"].float(), backend="triton")


@pytest.mark.parametrize("dtype, largest", [(torch.float32, 644), (torch.float16, 704)])
def test_cuda_kernels_declare_their_shared_memory_per_device(monkeypatch, dtype, largest):
    # The C++ side owns the limit: on a 99 KiB device (the harness as sm_86) K up to `largest`
    # runs, one class more is refused with the bytes needed and given.
    require_backend(OP, "simt")
    monkeypatch.setenv("SF_SIMT_ARCH", "sm_86")
    t = _inputs(1, 8, largest + 1, 16, "cpu", affine=False)
    p, c = t["patches"].to(dtype), t["classes"].to(dtype)
    with pytest.raises(ValueError, match=rf"K={largest + 1} classes .*shared memory per block \(cpu gives 101376\)"):
        semask_fast.mask_similarity(p, c, backend="simt")
    with record_dispatch() as ran:
        out = semask_fast.mask_similarity(p[:, :, :], c[:, :largest], backend="simt")
    assert [backend for _, backend, _ in ran] == ["simt"]
    ref = semask_fast.mask_similarity(t["patches"], t["classes"][:, :largest], backend="reference")
    assert_close(out, ref, dtype, what="out")


# --------------------------------------------------------------------------- #
# triton launchers with explicit plans (tests/kernels/_launch_parity.py)
# --------------------------------------------------------------------------- #


@ids()
@pytest.mark.parametrize("k_classes", [19, 150])
def test_mask_similarity_gpu_tiles(k_classes, dtype):
    """The GPU tiles with the LayerNorm epilogue: several patch blocks and D chunks."""
    k = kernels("mask_similarity")
    B, NP, D = 1, 70, 40
    g = torch.Generator().manual_seed(0)
    t = dict(patches=torch.randn(B, NP, D, generator=g, dtype=torch.float64),
             classes=torch.randn(B, k_classes, D, generator=g, dtype=torch.float64),
             norm_weight=torch.randn(k_classes, generator=g, dtype=torch.float64),
             norm_bias=torch.randn(k_classes, generator=g, dtype=torch.float64))
    t = rounded(t, dtype)
    out, rp, rc = k.mask_similarity_forward(t["patches"], t["classes"], t["norm_weight"], t["norm_bias"], norm=True,
                                            plan=k.forward_plan(NP, k_classes, D, dtype, interpreter=False))
    (gout,) = grad_outputs_like([out])
    dp, dc, dw, db = k.mask_similarity_backward(t["patches"], t["classes"], t["norm_weight"], rp, rc, gout, norm=True,
                                                plan=k.backward_plan(NP, k_classes, D, dtype, interpreter=False))

    def ref(patches, classes, norm_weight, norm_bias):
        return reference.mask_similarity(patches, classes, norm_weight=norm_weight, norm_bias=norm_bias, norm=True)

    grads = dict(patches=dp, classes=dc, norm_weight=dw.to(dtype), norm_bias=db.to(dtype))
    assert_matches_reference([out], grads, ref, t, [gout])


# --------------------------------------------------------------------------- #
# The native cpu backend: float64 gradcheck on the kernels, thread-count independence
# --------------------------------------------------------------------------- #
def _ran_cpu_only(ran):
    assert ran, "nothing was recorded"
    assert {(op, backend) for op, backend, _ in ran} == {(OP, "cpu")}, ran
    assert {phase for *_, phase in ran} == {"forward", "backward"}, ran


@pytest.mark.parametrize("norm,affine", EPILOGUES, ids=["plain", "norm-affine", "norm"])
def test_cpu_gradcheck_fp64(norm, affine):
    """torch.autograd.gradcheck through the cpu kernels themselves (K and D not whole vectors)."""
    require_backend(OP, "cpu")
    t = {n: x.requires_grad_() for n, x in _inputs(2, 66, 11, 5, "cpu", affine, seed=3).items()}
    names = list(t)

    def fn(*xs):
        return semask_fast.mask_similarity(**dict(zip(names, xs)), norm=norm, backend="cpu")

    with record_dispatch() as ran:
        assert torch.autograd.gradcheck(fn, tuple(t.values()), **GRADCHECK)
    _ran_cpu_only(ran)


# (B, Np, K, D) at the matrix-unit path's edges: odd D (staged rows), odd K, a last block of one row,
# several row blocks, K and D whose tiles get padded row strides (tile_ld: 512 -> 528).
MATRIX_UNIT_SHAPES = [(2, 129, 150, 96), (1, 65, 7, 33), (3, 37, 19, 64), (1, 40, 512, 512)]


@pytest.mark.parametrize("unit", [True, False], ids=["matrix-unit", "vector-units"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("norm,affine", EPILOGUES, ids=["plain", "norm-affine", "norm"])
@pytest.mark.parametrize("shape", MATRIX_UNIT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_reduced_paths(shape, norm, affine, dtype, unit):
    """float16 / bfloat16 on the matrix unit (AMX, where oneDNN packs the type) and on the vector
    units (oneDNN switched off): both within the dtype's tolerance of float64."""
    if unit and not cpu_matrix_unit(dtype):
        pytest.skip(f"no matrix unit for {dtype} on this machine (AMX; float16 needs AMX-FP16)")
    t = _inputs(*shape, "cpu", affine)
    with onednn(unit):
        assert cpu_matrix_unit(dtype) == unit
        assert_parity(_op(norm), t, list(t), dtype, backend="cpu", op=OP)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("norm,affine", [(False, False), (True, True)], ids=["plain", "norm-affine"])
def test_cpu_independent_of_thread_count(norm, affine, dtype):
    """Outputs and every gradient are bitwise the same on 1 and 2 threads (fixed reduction order)."""
    require_backend(OP, "cpu")
    t = _inputs(3, 200, 150, 40, "cpu", affine, seed=1)
    grad = torch.randn(3, 200, 150, generator=torch.Generator().manual_seed(2)).to(dtype)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            x = {k: v.to(dtype if k in ("patches", "classes") else torch.float32).requires_grad_()
                 for k, v in t.items()}
            out = semask_fast.mask_similarity(**x, norm=norm, backend="cpu")
            out.backward(grad)
            results.append([out.detach()] + [v.grad for v in x.values()])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)
