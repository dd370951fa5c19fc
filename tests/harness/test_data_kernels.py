"""Cases of csrc/ops/window_process.cu and csrc/ops/mask_similarity.cu that the shared op tests do
not reach, run through the SIMT harness (and unchanged on the cuda backend when a GPU exists).

window_process: every vector width of the copy (2, 4, 8, 16 bytes per thread), a misaligned
input pointer, non-contiguous inputs and gradients.  mask_similarity: K spanning several
64-class tiles with the LayerNorm epilogue, depth not a multiple of the 32-deep tile, a single
patch, and the K limit reported as a reason.  All dtypes, outputs and every gradient through
assert_parity (bf16 runs the bf16 tensor-core path of the kernels: the harness has no bf16 dot bug).
"""

import pytest
import torch

import semask_fast
from semask_fast.backends import registry
from semask_fast.backends.registry import BackendNotSupportedError
from semask_fast.testing import assert_parity
from tests.conftest import require_backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ids = {"dtype": lambda d: str(d).replace("torch.", "")}
BACKENDS = [pytest.param("cuda", id="cuda"), pytest.param("simt", id="simt", marks=pytest.mark.harness)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels", [1, 2, 4, 8, 12], ids=lambda c: f"C{c}")
def test_partition_every_vector_width(backend, channels):
    # fp16 rows of 2, 4, 8, 16 and 24 bytes: every branch of the vector width choice.
    device = require_backend("window_partition", backend)
    x = torch.randn(2, 9, 11, channels, dtype=torch.float64, device=device)

    def fn(backend, x):
        return semask_fast.window_partition(x, (4, 5), (2, 1), True, backend=backend)

    assert_parity(fn, {"x": x}, ["x"], torch.float16, backend=backend, op="window_partition", exact=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pad_then_roll", [True, False], ids=["pad-then-roll", "roll-then-pad"])
def test_misaligned_and_non_contiguous_inputs(backend, pad_then_roll):
    device = require_backend("window_merge", backend)
    # A view starting one element into its storage: 2-byte aligned data pointer.
    flat = torch.randn(1 + 2 * 9 * 4 * 5 * 8, device=device).half()
    windows = flat[1:].view(2 * 9, 4, 5, 8)
    out = semask_fast.window_merge(windows, (4, 5), (1, 2), 10, 13, pad_then_roll, backend=backend)
    ref = semask_fast.window_merge(windows, (4, 5), (1, 2), 10, 13, pad_then_roll, backend="reference")
    assert torch.equal(out, ref)
    # Channels-last-like strides on the image side.
    x = torch.randn(2, 8, 10, 12, device=device).half().transpose(1, 2).contiguous().transpose(1, 2)
    assert not x.is_contiguous()
    got = semask_fast.window_partition(x, 4, 2, pad_then_roll, backend=backend)
    assert torch.equal(got, semask_fast.window_partition(x, 4, 2, pad_then_roll, backend="reference"))


def _similarity(norm):
    def fn(backend, patches, classes, norm_weight, norm_bias):
        return semask_fast.mask_similarity(patches, classes, norm=norm, norm_weight=norm_weight,
                                           norm_bias=norm_bias, backend=backend)

    return fn


# (B, Np, K, D)
SIMILARITY_SHAPES = {
    "K300-depth50": (1, 40, 300, 50),
    "one-patch": (2, 1, 7, 33),
    # Depth 2: dp^ is nearly parallel to p^, so the projection dp^ - p^ (p^.dp^) cancels heavily.
    # (At depth 1 the gradient is exactly 0 and fp32 cancellation noise, amplified by 1/|p|,
    # reaches ~2e-4: a known limit of taking p^.dp^ from the scores.)
    "K65-depth2": (1, 33, 65, 2),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids["dtype"])
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm-affine"])
@pytest.mark.parametrize("shape", list(SIMILARITY_SHAPES))
def test_mask_similarity_tiles(backend, shape, norm, dtype):
    device = require_backend("mask_similarity", backend)
    b, n, k, d = SIMILARITY_SHAPES[shape]
    gen = torch.Generator().manual_seed(n * k + d)
    t = {
        "patches": torch.randn(b, n, d, generator=gen, dtype=torch.float64).to(device),
        "classes": torch.randn(b, k, d, generator=gen, dtype=torch.float64).to(device),
        "norm_weight": torch.randn(k, generator=gen, dtype=torch.float64).to(device) if norm else None,
        "norm_bias": torch.randn(k, generator=gen, dtype=torch.float64).to(device) if norm else None,
    }
    assert_parity(_similarity(norm), t, list(t), dtype, backend=backend, op="mask_similarity")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_similarity_class_limit_is_a_reason(backend):
    device = require_backend("mask_similarity", backend)
    # 2000 classes need more shared memory per block than any GPU gives (227 KiB on sm_90).
    p, c = torch.randn(1, 4, 8, device=device), torch.randn(1, 2000, 8, device=device)
    with pytest.raises(BackendNotSupportedError, match="K=2000 classes"):
        semask_fast.mask_similarity(p, c, backend=backend)
    assert registry.reasons("mask_similarity", backend) == []
