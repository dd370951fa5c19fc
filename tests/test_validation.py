"""Bad input gets a clear error naming the argument and what was expected."""

import pytest
import torch

import semask_fast as sf


def qkv(b=4, h=2, n=16, d=8, **kw):
    return [torch.randn(b, h, n, d, **kw) for _ in range(3)]


def raises(exc, match, fn, *a, **kw):
    with pytest.raises(exc, match=match):
        fn(*a, **kw)


# ---------------------------------------------------------------- window_attention
def test_window_attention_rank_dtype_shape():
    q, k, v = qkv()
    raises(ValueError, r"q must have shape \(B\*nW, heads, N, head_dim\)", sf.window_attention, q[0], k, v, window_size=4)
    raises(TypeError, "q must be a torch.Tensor", sf.window_attention, q.numpy(), k, v, window_size=4)
    raises(TypeError, "q must be float16, bfloat16, float32 or float64", sf.window_attention, q.int(), k, v, window_size=4)
    raises(TypeError, "k has dtype torch.float16 but q has torch.float32", sf.window_attention, q, k.half(), v, window_size=4)
    raises(ValueError, "v must have the shape of q", sf.window_attention, q, k, v[:, :1], window_size=4)
    raises(ValueError, r"N = Wh\*Ww = 25 tokens for window_size=\(5, 5\)", sf.window_attention, q, k, v, window_size=5)


def test_window_attention_geometry():
    q, k, v = qkv()
    raises(ValueError, "shift_size must be smaller than window_size", sf.window_attention, q, k, v, window_size=4,
           shift_size=4, grid=(2, 2))
    raises(ValueError, "grid=.* is required when shift_size > 0", sf.window_attention, q, k, v, window_size=4, shift_size=2)
    raises(ValueError, "grid=\\(3, 1\\) means 3 windows per image, which does not divide the batch", sf.window_attention,
           q, k, v, window_size=4, shift_size=2, grid=(3, 1))
    raises(ValueError, "window_size must be >= 1", sf.window_attention, q, k, v, window_size=(0, 4))
    raises(TypeError, "window_size must be an int or a pair of ints", sf.window_attention, q, k, v, window_size=(4, 4, 1))
    raises(TypeError, "window_size must be an int or a pair of ints", sf.window_attention, q, k, v, window_size=4.0)
    raises(ValueError, "dropout_p must be a float in \\[0, 1\\)", sf.window_attention, q, k, v, window_size=4, dropout_p=1.0)
    raises(TypeError, "scale must be a float or None", sf.window_attention, q, k, v, window_size=4, scale="x")
    raises(TypeError, "mask_value must be a float, got 'x'", sf.window_attention, q, k, v, window_size=4, shift_size=2,
           grid=(2, 2), mask_value="x")
    raises(TypeError, "mask_value must be a float, got None", sf.window_attention, q, k, v, window_size=4,
           mask_value=None)
    raises(ValueError, r"q must have head_dim >= 1 \(dim 3\), got shape \(4, 2, 16, 0\)", sf.window_attention,
           *qkv(d=0), window_size=4)


def test_window_attention_bias_table_and_mask():
    q, k, v = qkv()
    raises(ValueError, r"bias_table must have shape \(49, 2\)", sf.window_attention, q, k, v, torch.randn(48, 2),
           window_size=4)
    raises(ValueError, r"bias_table must have shape \(49, 2\)", sf.window_attention, q, k, v, torch.randn(49, 3),
           window_size=4)
    raises(TypeError, "bias_table must have q's dtype", sf.window_attention, q.half(), k.half(), v.half(),
           torch.randn(49, 2, dtype=torch.float64), window_size=4)
    raises(ValueError, r"mask must have shape \(nW, 16, 16\) with nW dividing", sf.window_attention, q, k, v,
           window_size=4, mask=torch.zeros(3, 16, 16))
    raises(ValueError, r"mask must have shape", sf.window_attention, q, k, v, window_size=4, mask=torch.zeros(2, 16, 15))
    raises(ValueError, "pass either mask or shift_size > 0", sf.window_attention, q, k, v, window_size=4, shift_size=1,
           grid=(2, 2), mask=torch.zeros(4, 16, 16))
    if torch.cuda.is_available():
        raises(ValueError, "bias_table is on", sf.window_attention, q, k, v, torch.randn(49, 2, device="cuda"),
               window_size=4)


def test_a_mask_that_requires_grad_is_rejected():
    """The mask is not differentiated: a mask that requires grad would silently get no gradient."""
    q, k, v = qkv()
    mask = torch.zeros(2, 16, 16, requires_grad=True)
    raises(ValueError, "mask requires grad, but window_attention does not differentiate its mask", sf.window_attention,
           q, k, v, window_size=4, mask=mask)
    with torch.no_grad():
        assert sf.window_attention(q, k, v, window_size=4, mask=mask).shape == q.shape
    assert sf.window_attention(q, k, v, window_size=4, mask=mask.detach()).shape == q.shape


def test_device_mix_is_rejected():
    q, k, v = qkv()
    meta = torch.empty(q.shape, device="meta")
    raises(ValueError, "k is on meta but q is on cpu", sf.window_attention, q, meta, v, window_size=4)


def test_fp32_bias_table_with_half_inputs_is_accepted():
    q, k, v = qkv(dtype=torch.bfloat16)
    out = sf.window_attention(q, k, v, torch.randn(49, 2), window_size=4, backend="reference")
    assert out.dtype == torch.bfloat16


def test_empty_batch_and_non_contiguous_inputs_are_handled():
    q, k, v = qkv(b=0)
    out = sf.window_attention(q, k, v, torch.randn(49, 2), window_size=4, shift_size=2, grid=(2, 2))
    assert out.shape == (0, 2, 16, 8)
    q, k, v = qkv()
    q2 = torch.randn(4, 16, 2, 8).transpose(1, 2)  # non-contiguous
    a = sf.window_attention(q2, k, v, window_size=4, backend="reference")
    b = sf.window_attention(q2.contiguous(), k, v, window_size=4, backend="reference")
    assert torch.equal(a, b)


# ---------------------------------------------------------------- partition / merge
def test_partition_and_merge_errors():
    x = torch.randn(2, 7, 9, 3)
    raises(ValueError, r"x must have shape \(B, H, W, C\)", sf.window_partition, x[0], 4)
    raises(ValueError, "shift_size must be smaller", sf.window_partition, x, 4, 5)
    raises(TypeError, "pad_then_roll must be a bool", sf.window_partition, x, 4, 2, "yes")
    w = sf.window_partition(x, 4, 2)
    assert w.shape == (12, 4, 4, 3)
    raises(ValueError, "windows has 11 windows, not a multiple of the 6 windows", sf.window_merge, w[:11], 4, 2, 7, 9)
    raises(ValueError, "windows must have window dims", sf.window_merge, w, 3, 2, 7, 9)
    raises(ValueError, "windows must have N = 16 tokens", sf.window_merge, w.reshape(12, 8, 6), 4, 2, 7, 9)
    raises(ValueError, "H must be a positive int", sf.window_merge, w, 4, 2, 0, 9)
    raises(ValueError, r"x must have C >= 1 \(dim 3\)", sf.window_partition, x[..., :0], 4)
    raises(ValueError, r"x must have H >= 1 \(dim 1\)", sf.window_partition, x[:, :0], 4)
    raises(ValueError, r"windows must have C >= 1 \(dim 3\)", sf.window_merge, w[..., :0], 4, 2, 7, 9)
    raises(ValueError, r"windows must have shape \(B\*nW, Wh, Ww, C\) or \(B\*nW, N, C\)", sf.window_merge, w[0, 0], 4, 2, 7, 9)
    assert torch.equal(sf.window_merge(w.reshape(12, 16, 3), 4, 2, 7, 9), x)


# ---------------------------------------------------------------- shifted_window_attention
def test_shifted_window_attention_errors():
    qkv_img = torch.randn(1, 7, 9, 48)
    raises(ValueError, "num_heads must be a positive int", sf.shifted_window_attention, qkv_img, num_heads=0, window_size=4)
    raises(ValueError, "qkv's last dim must be 3\\*num_heads\\*head_dim", sf.shifted_window_attention, qkv_img,
           num_heads=5, window_size=4)
    raises(ValueError, r"qkv_bias must have shape \(48,\)", sf.shifted_window_attention, qkv_img, num_heads=2,
           window_size=4, qkv_bias=torch.zeros(47))
    raises(ValueError, r"bias_table must have shape \(49, 2\)", sf.shifted_window_attention, qkv_img,
           torch.zeros(49, 3), num_heads=2, window_size=4)
    raises(ValueError, r"qkv must have W >= 1 \(dim 2\)", sf.shifted_window_attention, qkv_img[:, :, :0],
           num_heads=2, window_size=4)
    raises(ValueError, r"qkv must have 3\*heads\*head_dim >= 1 \(dim 3\)", sf.shifted_window_attention,
           qkv_img[..., :0], num_heads=2, window_size=4)
    raises(TypeError, "mask_value must be a float", sf.shifted_window_attention, qkv_img, num_heads=2, window_size=4,
           mask_value="-100")
    out = sf.shifted_window_attention(qkv_img, torch.zeros(49, 2), num_heads=2, window_size=4, shift_size=2)
    assert out.shape == (1, 7, 9, 16)


# ---------------------------------------------------------------- semantic / atm / mask similarity
def test_semantic_attention_errors():
    sq, sk, yv = torch.randn(2, 9, 5), torch.randn(2, 9, 5), torch.randn(2, 9, 12)
    raises(ValueError, r"sq must have shape \(B_, N, K\)", sf.semantic_attention, sq[0], sk, yv)
    raises(ValueError, "sk must have the shape of sq", sf.semantic_attention, sq, sk[:, :, :4], yv)
    raises(ValueError, r"yv must have shape \(B_, N, C\) = \(2, 9, C\)", sf.semantic_attention, sq, sk, yv[:, :8])
    raises(TypeError, "yv has dtype torch.float16 but sq has torch.float32", sf.semantic_attention, sq, sk, yv.half())
    assert sf.semantic_attention(sq, sk, yv).shape == (2, 9, 12)


def test_atm_attention_errors():
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 11, 8), torch.randn(2, 4, 11, 8)
    raises(ValueError, r"k must have shape \(B, heads, Nk, head_dim\) = \(2, 4, Nk, 8\)", sf.atm_attention, q,
           k[:, :3], v[:, :3])
    raises(ValueError, "v must have the shape of k", sf.atm_attention, q, k, v[:, :, :10])
    raises(ValueError, r"q must have shape \(B, heads, Nq, head_dim\)", sf.atm_attention, q[0], k, v)
    raises(ValueError, r"q must have head_dim >= 1 \(dim 3\)", sf.atm_attention, q[..., :0], k[..., :0], v[..., :0])
    out, logits = sf.atm_attention(q, k, v)
    assert out.shape == (2, 4, 5, 8) and logits.shape == (2, 5, 11)


def test_mask_similarity_errors():
    p, c = torch.randn(2, 10, 8), torch.randn(2, 6, 8)
    raises(ValueError, r"classes must have shape \(B, K, D\) = \(2, K, 8\)", sf.mask_similarity, p, c[:, :, :7])
    raises(ValueError, "norm_weight is given but norm=False", sf.mask_similarity, p, c, norm_weight=torch.ones(6))
    raises(ValueError, r"norm_bias must have shape \(6,\)", sf.mask_similarity, p, c, norm=True, norm_bias=torch.ones(5))
    raises(TypeError, "norm must be a bool, got 'no'", sf.mask_similarity, p, c, norm="no")
    raises(TypeError, "norm_eps must be a float, got None", sf.mask_similarity, p, c, norm=True, norm_eps=None)
    raises(TypeError, "norm_weight must have patches's dtype torch.float32, got torch.float64", sf.mask_similarity, p,
           c, norm=True, norm_weight=torch.ones(6, dtype=torch.float64))
    # float32 affine parameters with half activations (autocast's) are accepted.
    assert sf.mask_similarity(p.bfloat16(), c.bfloat16(), norm=True, norm_weight=torch.ones(6)).dtype == torch.bfloat16
    assert sf.mask_similarity(p, c, norm=True).shape == (2, 10, 6)


def test_unknown_backend_is_rejected():
    q, k, v = qkv()
    raises(ValueError, "backend='gpu' is not a backend", sf.window_attention, q, k, v, window_size=4, backend="gpu")
