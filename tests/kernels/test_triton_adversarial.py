"""Inputs that expose plausible kernel bugs the ordinary parity shapes let through (issue 13, item 7).

* Peaked logits (largest logit of most rows ~90-150, beyond exp's fp32 range at ~88.7): a kernel that
  drops the running-max subtraction overflows.  Every dtype, and every tile path of each kernel: the
  window forward's single tile and key loop, the window backward's single-tile and multi-tile paths,
  the semantic forward with one and with several key tiles, the ATM forward's two passes.
* A mild ``mask_value`` (-1.5): masked pairs keep a visible weight, so a shift mask that ignores the
  argument (and adds a constant that saturates the softmax) changes the output.  Every dtype, both
  layouts, both tile paths.

Peaks come from q = k = a z with a wide inner dim (64 or K = 150) and a modest a: the backward's
D = rowsum(dO * O) is computed from the rounded output (as in every flash-attention backward), and
its rounding error reaches dq, dk multiplied by scale * |k|, scale * |q|, so large operands would
measure that known limit instead of the bugs these tests are for.

The launchers are called with explicit plans; results are compared with the float64 reference by the
rules of ``semask_fast.testing``.  Non-finite results always fail.
"""

import pytest
import torch

from semask_fast import reference
from tests.kernels._launch_parity import assert_matches_reference, atm_inputs, grad_outputs_like, ids, kernels, \
    rounded, run_atm, run_semantic, run_window, semantic_inputs, window_inputs

#: Window tiles: 64 = the window (N = 49) as one tile, 16 = four tiles (the key loop / multi-tile backward).
WINDOW_TILES = pytest.mark.parametrize("tile", [64, 16], ids=["one-tile", "four-tiles"])


def _window_plans(k, geo, dtype, tile):
    fwd = k.forward_plan(geo, dtype)
    bwd = k.backward_plan(geo, dtype)
    tiles = dict(BLOCK=tile, NT=-(-geo.n // tile))
    return fwd.with_tiles(**tiles), dict(bwd, main=bwd["main"].with_tiles(**tiles))


def _peaked_window_inputs(dtype):
    """k = q = 3.9 z, d = 64, scale 1/8: the diagonal logit 1.9 |z|^2 is ~120 (above 88.7 in most rows)."""
    t = window_inputs(2, 1, (7, 7), 64)
    t["q"] = t["q"] * 3.9
    t["k"] = t["q"].clone()
    return rounded(t, dtype)


@ids()
@WINDOW_TILES
def test_window_peaked_logits(tile, dtype):
    k = kernels("window_attention")
    t = _peaked_window_inputs(dtype)
    logits = t["q"].double() @ t["k"].double().transpose(-2, -1) / 8
    assert (logits.amax(-1) > 90).float().mean() > 0.5
    geo = k.Geometry((7, 7), 2, 1, 64, grid=(1, 2), shift=(3, 3))
    run_window(k, t, (7, 7), (3, 3), (1, 2), *_window_plans(k, geo, dtype, tile))


@ids()
@WINDOW_TILES
def test_window_mild_mask_value(tile, dtype):
    k = kernels("window_attention")
    t = rounded(window_inputs(2, 2, (7, 7), 16), dtype)
    geo = k.Geometry((7, 7), 2, 2, 16, grid=(1, 2), shift=(3, 3))
    run_window(k, t, (7, 7), (3, 3), (1, 2), *_window_plans(k, geo, dtype, tile), mask_value=-1.5)


@ids()
def test_shifted_window_mild_mask_value_and_peaked(dtype):
    """Image layout, padded (10 x 13 with 7 x 7 windows): mask value -1.5 and a peaked head."""
    k = kernels("window_attention")
    b, H, W, h, d, ws = 1, 10, 13, 2, 64, (7, 7)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(b, H, W, 3, h, d, generator=g, dtype=torch.float64)
    qkv[..., 0, 0, :] *= 3.9  # head 0: q = k = 3.9 z, logits ~120
    qkv[..., 1, 0, :] = qkv[..., 0, 0, :]
    t = dict(qkv=qkv.reshape(b, H, W, 3 * h * d), bias_table=torch.randn(169, h, generator=g, dtype=torch.float64),
             qkv_bias=torch.randn(3 * h * d, generator=g, dtype=torch.float64))
    t = rounded(t, dtype)
    geo = k.Geometry(ws, b * 4, h, d, grid=(2, 2), shift=(3, 3), image_hw=(H, W))
    kw = dict(scale=d ** -0.5, mask_value=-1.5)
    out, lse = k.shifted_window_attention_forward(t["qkv"], geo, t["bias_table"], t["qkv_bias"], **kw)
    (gout,) = grad_outputs_like([out])
    dqkv, d_table, d_bias = k.shifted_window_attention_backward(t["qkv"], out, gout, lse, geo, t["bias_table"],
                                                                t["qkv_bias"], **kw)

    def ref(qkv, bias_table, qkv_bias):
        return reference.shifted_window_attention(qkv, bias_table, qkv_bias=qkv_bias, num_heads=h, window_size=ws,
                                                  shift_size=(3, 3), **kw)

    assert_matches_reference([out], dict(qkv=dqkv, bias_table=d_table, qkv_bias=d_bias), ref, t, [gout])


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
