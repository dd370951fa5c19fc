"""Property tests: random geometries, every kernel backend against the reference.

Hypothesis draws image sizes, non-square windows, per-axis shifts and both
pad/roll orders; each example runs one small launch, so the example counts are
kept low enough for the Triton interpreter and the SIMT harness.
"""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import semask_fast as sf
from semask_fast.testing import assert_parity
from tests.conftest import require_backend

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ATTENTION_SETTINGS = settings(SETTINGS, max_examples=5)


@st.composite
def geometries(draw):
    wh, ww = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    return dict(H=draw(st.integers(1, 15)), W=draw(st.integers(1, 15)), ws=(wh, ww),
                shift=(draw(st.integers(0, wh - 1)), draw(st.integers(0, ww - 1))),
                pad_then_roll=draw(st.booleans()), B=draw(st.integers(1, 2)), C=draw(st.integers(1, 9)))


@SETTINGS
@given(g=geometries())
def test_partition_and_merge_are_exact_on_random_geometry(kernel_backend, g):
    device = require_backend("window_partition", kernel_backend)
    require_backend("window_merge", kernel_backend)
    x = torch.randn(g["B"], g["H"], g["W"], g["C"], device=device)
    args = (g["ws"], g["shift"])
    assert_parity(lambda backend, x: sf.window_partition(x, *args, g["pad_then_roll"], backend=backend),
                  {"x": x}, ["x"], torch.float32, backend=kernel_backend, op="window_partition", exact=True)
    windows = sf.window_partition(x, *args, g["pad_then_roll"], backend="reference")
    assert_parity(lambda backend, w: sf.window_merge(w, *args, g["H"], g["W"], g["pad_then_roll"], backend=backend),
                  {"w": windows}, ["w"], torch.float32, backend=kernel_backend, op="window_merge", exact=True)


@ATTENTION_SETTINGS
@given(g=geometries(), heads=st.integers(1, 2), head_dim=st.sampled_from([16, 24, 32]))
def test_shifted_window_attention_on_random_geometry(kernel_backend, g, heads, head_dim):
    device = require_backend("shifted_window_attention", kernel_backend)
    wh, ww = g["ws"]
    c3 = 3 * heads * head_dim
    tensors = dict(qkv=torch.randn(g["B"], g["H"], g["W"], c3, device=device),
                   table=torch.randn((2 * wh - 1) * (2 * ww - 1), heads, device=device),
                   qkv_bias=torch.randn(c3, device=device))

    def fn(backend, qkv, table, qkv_bias):
        return sf.shifted_window_attention(qkv, table, num_heads=heads, window_size=g["ws"], shift_size=g["shift"],
                                           pad_then_roll=g["pad_then_roll"], qkv_bias=qkv_bias, backend=backend)

    assert_parity(fn, tensors, ["qkv", "table", "qkv_bias"], torch.float32, backend=kernel_backend,
                  op="shifted_window_attention")


@ATTENTION_SETTINGS
@given(g=geometries())
def test_window_attention_with_grid_on_random_geometry(kernel_backend, g):
    device = require_backend("window_attention", kernel_backend)
    wh, ww = g["ws"]
    grid = (-(-g["H"] // wh), -(-g["W"] // ww))
    b_, n = g["B"] * grid[0] * grid[1], wh * ww
    tensors = {name: torch.randn(b_, 2, n, 16, device=device) for name in ("q", "k", "v")}
    tensors["table"] = torch.randn((2 * wh - 1) * (2 * ww - 1), 2, device=device)

    def fn(backend, q, k, v, table):
        return sf.window_attention(q, k, v, table, window_size=g["ws"], shift_size=g["shift"], grid=grid,
                                   backend=backend)

    assert_parity(fn, tensors, ["q", "k", "v", "table"], torch.float16, backend=kernel_backend, op="window_attention")
