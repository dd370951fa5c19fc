"""Bitwise parity of ``window_partition`` and ``window_merge`` on every kernel backend.

Pure data movement, so outputs and gradients must be exact (``exact=True``)
against the torch composition (pad, roll, reshape/permute; and its inverse).
Both orders of pad and roll (SPEC.md section 1), H != W with padding, shift on,
off and on one axis only, non-square windows, batch 1, odd channel counts, in
fp32, fp16 and bf16.  The gradient of a partition drops zero-padded positions.
"""

import pytest
import torch

import semask_fast
from semask_fast.backends.base import record_dispatch
from semask_fast.testing import assert_parity
from tests.conftest import require_backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (B, H, W, C, window, shift)
SHAPES = {
    "swin-t-multiple": (2, 14, 14, 8, (7, 7), (3, 3)),
    "pad-h-ne-w": (1, 10, 13, 5, (7, 7), (3, 3)),
    "no-shift-pad": (3, 9, 16, 3, (7, 7), (0, 0)),
    "nonsquare-window": (1, 9, 20, 7, (4, 6), (1, 2)),
    "shift-one-axis": (2, 11, 6, 33, (3, 4), (0, 2)),
    "ws12-pad": (1, 13, 25, 4, (12, 12), (6, 6)),
}

ids = {"dtype": lambda d: str(d).replace("torch.", "")}


def _grid(H, W, ws):
    return -(-H // ws[0]), -(-W // ws[1])


@pytest.mark.parametrize("pad_then_roll", [True, False], ids=["pad-then-roll", "roll-then-pad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=ids["dtype"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_partition_exact(kernel_backend, name, dtype, pad_then_roll):
    device = require_backend("window_partition", kernel_backend)
    b, H, W, c, ws, shift = SHAPES[name]
    x = torch.randn(b, H, W, c, dtype=torch.float64, device=device)

    def fn(backend, x):
        return semask_fast.window_partition(x, ws, shift, pad_then_roll, backend=backend)

    assert_parity(fn, {"x": x}, ["x"], dtype, backend=kernel_backend, op="window_partition", exact=True)


@pytest.mark.parametrize("pad_then_roll", [True, False], ids=["pad-then-roll", "roll-then-pad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=ids["dtype"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_merge_exact(kernel_backend, name, dtype, pad_then_roll):
    device = require_backend("window_merge", kernel_backend)
    b, H, W, c, ws, shift = SHAPES[name]
    nwh, nww = _grid(H, W, ws)
    win = torch.randn(b * nwh * nww, ws[0], ws[1], c, dtype=torch.float64, device=device)

    def fn(backend, windows):
        return semask_fast.window_merge(windows, ws, shift, H, W, pad_then_roll, backend=backend)

    assert_parity(fn, {"windows": win}, ["windows"], dtype, backend=kernel_backend, op="window_merge", exact=True)


def test_merge_token_layout_and_strided(kernel_backend):
    """(B*nW, N, C) windows, and a non-contiguous channel-sliced input."""
    device = require_backend("window_merge", kernel_backend)
    win = torch.randn(4, 49, 12, dtype=torch.float64, device=device)

    def fn(backend, windows):
        return semask_fast.window_merge(windows[..., 2:10], 7, 3, 14, 14, backend=backend)

    assert_parity(fn, {"windows": win}, ["windows"], torch.float32, backend=kernel_backend, op="window_merge",
                  exact=True)


def test_round_trip(kernel_backend):
    """merge(partition(x)) == x bitwise, with padding and shift."""
    device = require_backend("window_partition", kernel_backend)
    x = torch.randn(2, 10, 13, 6, device=device)
    for order in (True, False):
        win = semask_fast.window_partition(x, 7, 3, order, backend=kernel_backend)
        assert torch.equal(semask_fast.window_merge(win, 7, 3, 10, 13, order, backend=kernel_backend), x)


# --------------------------------------------------------------------------- #
# The native cpu backend: every dtype bitwise (float64 too), gradcheck, thread count
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("pad_then_roll", [True, False], ids=["pad-then-roll", "roll-then-pad"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=ids["dtype"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_cpu_bitwise_with_gradients(name, dtype, pad_then_roll):
    """Partition, merge and both gradients equal the reference composition bit for bit."""
    require_backend("window_partition", "cpu")
    b, H, W, c, ws, shift = SHAPES[name]
    x = torch.randn(b, H, W, c, dtype=torch.float64).to(dtype)
    nwh, nww = _grid(H, W, ws)
    grad_win = torch.randn(b * nwh * nww, ws[0], ws[1], c, dtype=torch.float64).to(dtype)
    results = {}
    for backend in ("cpu", "reference"):
        xs = x.clone().requires_grad_()
        with record_dispatch() as ran:
            win = semask_fast.window_partition(xs, ws, shift, pad_then_roll, backend=backend)
            win.backward(grad_win)
            wins = win.detach().clone().requires_grad_()
            img = semask_fast.window_merge(wins, ws, shift, H, W, pad_then_roll, backend=backend)
            img.backward(x)
        if backend == "cpu":
            assert [r[1] for r in ran] == ["cpu"] * 4, ran
        results[backend] = (win, xs.grad, img, wins.grad)
    for got, want in zip(results["cpu"], results["reference"]):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("pad_then_roll", [True, False], ids=["pad-then-roll", "roll-then-pad"])
def test_cpu_gradcheck_fp64(pad_then_roll):
    require_backend("window_partition", "cpu")
    x = torch.randn(1, 5, 7, 3, dtype=torch.float64, requires_grad=True)
    win = torch.randn(2 * 2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    with record_dispatch() as ran:
        assert torch.autograd.gradcheck(
            lambda t: semask_fast.window_partition(t, (3, 4), (1, 2), pad_then_roll, backend="cpu"), (x,))
        assert torch.autograd.gradcheck(
            lambda t: semask_fast.window_merge(t, (3, 4), (1, 2), 5, 7, pad_then_roll, backend="cpu"), (win,))
    assert {r[1] for r in ran} == {"cpu"} and {r[2] for r in ran} == {"forward", "backward"}, ran


def test_cpu_independent_of_thread_count():
    require_backend("window_partition", "cpu")
    x = torch.randn(4, 57, 57, 96)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            win = semask_fast.window_partition(x, 7, 3, backend="cpu")
            outs.append((win, semask_fast.window_merge(win, 7, 3, 57, 57, backend="cpu")))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[1][1], x)
