"""The reference ops against independent implementations, and fp64 gradcheck.

Everything else is tested against :mod:`semask_fast.reference`, so it is
checked here against code written differently: timm's own Swin functions,
explicit per-element loops and index arithmetic, einsum formulations.
"""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.models import swin_transformer as timm_swin

from semask_fast import reference as ref
from semask_fast.testing import assert_close



@pytest.fixture(autouse=True)
def _float64_default():
    """Every tensor here is float64: the comparisons are exact to rounding."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _grads(fn, tensors, seed=0):
    """Outputs of fn(*tensors) and gradients of a random projection of them."""
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    outs = fn(*tensors)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    return [o.detach() for o in outs], torch.autograd.grad(loss, tensors)


def _assert_same(fn_a, fn_b, tensors):
    outs_a, grads_a = _grads(fn_a, tensors)
    outs_b, grads_b = _grads(fn_b, tensors)
    for a, b in zip(outs_a, outs_b):
        assert_close(a, b, torch.float64)
    for a, b in zip(grads_a, grads_b):
        assert_close(a, b, torch.float64, backward=True)


# ---------------------------------------------------------------- window attention
def _loop_window_attention(q, k, v, table, ws, shift, grid, mask, scale):
    """Per-element loops; bias index from token coordinates; shift mask from timm's slicing."""
    b_, h, n, d = q.shape
    wh, ww = ws
    if mask is None and any(shift):
        blk = timm_swin.SwinTransformerBlock(dim=h * 4, input_resolution=(grid[0] * wh, grid[1] * ww), num_heads=h,
                                             window_size=ws, shift_size=shift, always_partition=True)
        mask = blk.get_attn_mask(device=q.device, dtype=q.dtype)
    logits = torch.empty(b_, h, n, n, dtype=q.dtype)
    for b, hh, i, j in itertools.product(range(b_), range(h), range(n), range(n)):
        yi, xi, yj, xj = i // ww, i % ww, j // ww, j % ww
        s = (q[b, hh, i] * scale) @ k[b, hh, j]
        if table is not None:
            s = s + table[(yi - yj + wh - 1) * (2 * ww - 1) + (xi - xj + ww - 1), hh]
        if mask is not None:
            s = s + mask[b % mask.shape[0], i, j]
        logits[b, hh, i, j] = s
    return torch.softmax(logits, -1) @ v


@pytest.mark.parametrize("ws,shift,grid,heads", [((2, 2), (1, 1), (2, 2), 2), ((2, 3), (1, 2), (2, 2), 1),
                                                 ((3, 2), (0, 0), (1, 2), 2), ((3, 3), (0, 1), (2, 1), 1)])
def test_window_attention_matches_loops_and_timm_mask(ws, shift, grid, heads):
    n = ws[0] * ws[1]
    b_ = 2 * grid[0] * grid[1]
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b_, heads, n, 4, generator=g) for _ in range(3))
    table = torch.randn((2 * ws[0] - 1) * (2 * ws[1] - 1), heads, generator=g)
    scale = 0.37
    _assert_same(
        lambda q, k, v, t: ref.window_attention(q, k, v, t, window_size=ws, shift_size=shift, grid=grid, scale=scale),
        lambda q, k, v, t: _loop_window_attention(q, k, v, t, ws, shift, grid, None, scale),
        [q, k, v, table])


def test_window_attention_explicit_mask_equals_computed_mask():
    ws, shift, grid = (4, 4), (2, 2), (2, 3)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(12, 2, 16, 8, generator=g) for _ in range(3))
    table = torch.randn(49, 2, generator=g)
    mask = ref.shift_mask(grid, ws, shift, dtype=q.dtype)
    a = ref.window_attention(q, k, v, table, window_size=ws, shift_size=shift, grid=grid)
    b = ref.window_attention(q, k, v, table, window_size=ws, mask=mask)
    assert torch.equal(a, b)


@pytest.mark.parametrize("ws,shift,hw", [((7, 7), (3, 3), (14, 21)), ((4, 6), (2, 3), (8, 12)), ((5, 5), (0, 2), (10, 5))])
def test_shift_mask_matches_timm(ws, shift, hw):
    blk = timm_swin.SwinTransformerBlock(dim=8, input_resolution=hw, num_heads=1, window_size=ws, shift_size=shift,
                                         always_partition=True)
    expected = blk.get_attn_mask(dtype=torch.float32)
    got = ref.shift_mask((hw[0] // ws[0], hw[1] // ws[1]), ws, shift)
    assert torch.equal(got, expected)
    assert set(got.unique().tolist()) <= {0.0, -100.0}


@pytest.mark.parametrize("ws", [(7, 7), (12, 12), (3, 5)])
def test_relative_position_index_matches_timm(ws):
    assert torch.equal(ref.relative_position_index(ws), timm_swin.get_relative_position_index(*ws))


def test_window_attention_matches_timm_module():
    torch.manual_seed(0)
    m = timm_swin.WindowAttention(dim=24, num_heads=3, window_size=(4, 4)).double().eval()
    with torch.no_grad():
        m.relative_position_bias_table.normal_()
    x = torch.randn(6, 16, 24)
    mask = torch.where(torch.rand(3, 16, 16) < 0.3, -100.0, 0.0)
    q, k, v = m.qkv(x).reshape(6, 16, 3, 3, 8).permute(2, 0, 3, 1, 4)
    out = ref.window_attention(q, k, v, m.relative_position_bias_table, window_size=(4, 4), mask=mask)
    expected = m(x, mask)
    assert_close(m.proj(out.transpose(1, 2).reshape(6, 16, 24)), expected, torch.float64)


# ---------------------------------------------------------------- partition / merge
def _index_partition(x, ws, shift, pad_then_roll):
    """Window element -> source pixel by index arithmetic (numpy), zero where padded."""
    b, h, w, c = x.shape
    hp, wp = -(-h // ws[0]) * ws[0], -(-w // ws[1]) * ws[1]
    out = np.zeros((b, hp // ws[0], wp // ws[1], ws[0], ws[1], c))
    xn = x.numpy()
    for wy, wx, iy, ix in itertools.product(range(hp // ws[0]), range(wp // ws[1]), range(ws[0]), range(ws[1])):
        y, xx = wy * ws[0] + iy, wx * ws[1] + ix
        if pad_then_roll:
            sy, sx = (y + shift[0]) % hp, (xx + shift[1]) % wp
            inside = sy < h and sx < w
        else:
            inside = y < h and xx < w
            sy, sx = (y + shift[0]) % h, (xx + shift[1]) % w
        if inside:
            out[:, wy, wx, iy, ix] = xn[:, sy, sx]
    return torch.from_numpy(out).reshape(-1, ws[0], ws[1], c)


@pytest.mark.parametrize("pad_then_roll", [True, False])
@pytest.mark.parametrize("hw,ws,shift", [((7, 9), (4, 4), (2, 2)), ((8, 8), (4, 4), (2, 2)), ((5, 11), (3, 4), (1, 3)),
                                         ((6, 6), (3, 3), (0, 0))])
def test_partition_matches_index_arithmetic(hw, ws, shift, pad_then_roll):
    x = torch.randn(2, *hw, 3)
    got = ref.window_partition(x, ws, shift, pad_then_roll)
    assert torch.equal(got, _index_partition(x, ws, shift, pad_then_roll))


def test_partition_matches_timm_functions_without_padding():
    x = torch.randn(2, 14, 21, 5)
    rolled = torch.roll(x, (-3, -3), (1, 2))
    assert torch.equal(ref.window_partition(x, (7, 7), (3, 3), False), timm_swin.window_partition(rolled, (7, 7)))
    windows = torch.randn(12, 7, 7, 5)
    merged = torch.roll(timm_swin.window_reverse(windows, (7, 7), 14, 21), (3, 3), (1, 2))
    assert torch.equal(ref.window_merge(windows, (7, 7), (3, 3), 14, 21, False), merged)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 13), w=st.integers(1, 13), wh=st.integers(1, 6), ww=st.integers(1, 6),
       data=st.data(), pad_then_roll=st.booleans())
def test_merge_inverts_partition(h, w, wh, ww, data, pad_then_roll):
    sh = data.draw(st.integers(0, wh - 1))
    sw = data.draw(st.integers(0, ww - 1))
    x = torch.randn(2, h, w, 3)
    windows = ref.window_partition(x, (wh, ww), (sh, sw), pad_then_roll)
    assert torch.equal(ref.window_merge(windows, (wh, ww), (sh, sw), h, w, pad_then_roll), x)


def test_shifted_window_attention_pads_with_qkv_bias():
    """Padded tokens must equal the qkv projection of a zero token, as in the models."""
    torch.manual_seed(3)
    lin = torch.nn.Linear(8, 3 * 2 * 4).double()
    table = torch.randn(49, 2)
    x = torch.randn(1, 6, 5, 8)
    for pad_then_roll in (True, False):
        out = ref.shifted_window_attention(lin(x), table, num_heads=2, window_size=(4, 4), shift_size=(2, 2),
                                           pad_then_roll=pad_then_roll, qkv_bias=lin.bias)
        # The model's way: pad/roll the block input, then project every token.
        wins = ref.window_partition(x, (4, 4), (2, 2), pad_then_roll)
        q, k, v = lin(wins.reshape(-1, 16, 8)).reshape(-1, 16, 3, 2, 4).permute(2, 0, 3, 1, 4)
        attn = ref.window_attention(q, k, v, table, window_size=(4, 4), shift_size=(2, 2), grid=(2, 2))
        expected = ref.window_merge(attn.transpose(1, 2).reshape(-1, 4, 4, 8), (4, 4), (2, 2), 6, 5, pad_then_roll)
        assert_close(out, expected, torch.float64)


# ---------------------------------------------------------------- semantic, ATM, mask similarity
def test_semantic_attention_matches_einsum():
    g = torch.Generator().manual_seed(4)
    sq, sk, yv = torch.randn(3, 10, 7, generator=g), torch.randn(3, 10, 7, generator=g), torch.randn(3, 10, 5, generator=g)

    def einsum_version(sq, sk, yv):
        s = torch.einsum("bik,bjk->bij", sq, sk)
        e = torch.exp(s - s.amax(-1, keepdim=True))
        return torch.einsum("bij,bjc->bic", e / e.sum(-1, keepdim=True), yv)

    _assert_same(ref.semantic_attention, einsum_version, [sq, sk, yv])


def test_atm_attention_matches_official_transcription():
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(2, 3, 6, 4, generator=g), torch.randn(2, 3, 9, 4, generator=g), torch.randn(2, 3, 9, 4, generator=g)

    def official(q, k, v):
        attn = (q @ k.transpose(-2, -1)) * 4 ** -0.5
        attn_save = attn.clone()
        out = attn.softmax(dim=-1) @ v
        return out, attn_save.sum(dim=1) / 3

    def per_head(q, k, v):
        outs, logits = [], []
        for hh in range(3):
            s = torch.einsum("bqd,bkd->bqk", q[:, hh], k[:, hh]) / 2.0
            logits.append(s)
            outs.append(torch.einsum("bqk,bkd->bqd", torch.softmax(s, -1), v[:, hh]))
        return torch.stack(outs, 1), torch.stack(logits).mean(0)

    _assert_same(ref.atm_attention, official, [q, k, v])
    _assert_same(ref.atm_attention, per_head, [q, k, v])


@pytest.mark.parametrize("norm", [False, True])
def test_mask_similarity_matches_cosine_similarity(norm):
    g = torch.Generator().manual_seed(6)
    p, c = torch.randn(2, 11, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    w, b = 1 + 0.1 * torch.randn(5, generator=g), 0.1 * torch.randn(5, generator=g)

    def cosine(p, c, w, b):
        s = F.cosine_similarity(p[:, :, None, :], c[:, None, :, :], dim=-1, eps=0.0)
        if norm:
            mu, var = s.mean(-1, keepdim=True), s.var(-1, unbiased=False, keepdim=True)
            s = (s - mu) / torch.sqrt(var + 1e-5) * w + b
        return s

    if norm:
        _assert_same(lambda p, c, w, b: ref.mask_similarity(p, c, norm=True, norm_weight=w, norm_bias=b), cosine,
                     [p, c, w, b])
    else:
        _assert_same(lambda p, c: ref.mask_similarity(p, c), lambda p, c: cosine(p, c, w, b), [p, c])


# ---------------------------------------------------------------- gradcheck
def _gradcheck(fn, *tensors):
    assert torch.autograd.gradcheck(fn, [t.detach().clone().requires_grad_() for t in tensors])


def test_gradcheck_window_attention():
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(4, 2, 6, 3, generator=g) for _ in range(3))
    _gradcheck(lambda q, k, v, t: ref.window_attention(q, k, v, t, window_size=(2, 3), shift_size=(1, 1), grid=(2, 2)),
               q, k, v, torch.randn(15, 2, generator=g))


def test_gradcheck_partition_merge():
    _gradcheck(lambda x: ref.window_partition(x, (3, 3), (1, 2), True), torch.randn(1, 5, 4, 2))
    _gradcheck(lambda w: ref.window_merge(w, (3, 3), (1, 2), 5, 4, False), torch.randn(4, 3, 3, 2))


def test_gradcheck_shifted_window_attention():
    g = torch.Generator().manual_seed(8)
    _gradcheck(lambda x, t, b: ref.shifted_window_attention(x, t, num_heads=1, window_size=(3, 3), shift_size=(1, 1),
                                                            qkv_bias=b),
               torch.randn(1, 4, 5, 6, generator=g), torch.randn(25, 1, generator=g), torch.randn(6, generator=g))


def test_gradcheck_semantic_atm_mask():
    g = torch.Generator().manual_seed(9)
    _gradcheck(ref.semantic_attention, torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g),
               torch.randn(2, 5, 4, generator=g))
    _gradcheck(lambda q, k, v: ref.atm_attention(q, k, v), torch.randn(1, 2, 3, 4, generator=g),
               torch.randn(1, 2, 5, 4, generator=g), torch.randn(1, 2, 5, 4, generator=g))
    _gradcheck(lambda p, c, w, b: ref.mask_similarity(p, c, norm=True, norm_weight=w, norm_bias=b),
               torch.randn(1, 4, 3, generator=g), torch.randn(1, 3, 3, generator=g), torch.randn(3, generator=g),
               torch.randn(3, generator=g))


def test_dropout_keep_mask_replays():
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(2, 1, 4, 3, generator=g) for _ in range(3))
    keep = torch.rand(2, 1, 4, 4, generator=g) > 0.25
    out = ref.window_attention(q, k, v, window_size=(2, 2), dropout_p=0.25, dropout_keep=keep)
    attn = torch.softmax(q * 3 ** -0.5 @ k.transpose(-2, -1), -1) * keep / 0.75
    assert_close(out, attn @ v, torch.float64)
