"""Drop-in modules: timm parity, patched timm models, official layouts, state_dicts."""

import pytest
import timm
import torch
from timm.models import swin_transformer as timm_swin

import semask_fast
from semask_fast import record_dispatch
from semask_fast.nn import ATMAttention, SemanticAttention, WindowAttention
from semask_fast.testing import REORDERED_FP32, TOLERANCES, assert_close

from tests.conftest import require_backend
from tests.official import OfficialATMAttention, OfficialSemanticAttention


@pytest.fixture(autouse=True)
def _quiet_fallback(recwarn):
    """The reference fallback warning is expected on a CPU machine."""
    yield


def _with_bias(m):
    with torch.no_grad():
        m.relative_position_bias_table.normal_()
    return m


@pytest.mark.parametrize("window,heads,head_dim", [(7, 3, None), ((4, 6), 2, 12)])
def test_window_attention_matches_timm(window, heads, head_dim):
    torch.manual_seed(0)
    t = _with_bias(timm_swin.WindowAttention(32, heads, head_dim=head_dim, window_size=window)).eval()
    m = WindowAttention(32, heads, head_dim=head_dim, window_size=window).eval()
    m.load_state_dict(t.state_dict())
    n = m.window_area
    x = torch.randn(6, n, 32)
    mask = torch.where(torch.rand(3, n, n) < 0.3, -100.0, 0.0)
    for msk in (None, mask):
        assert_close(m(x, msk), t(x, msk), tol=REORDERED_FP32)


def test_window_attention_gradients_match_timm():
    torch.manual_seed(1)
    t = _with_bias(timm_swin.WindowAttention(24, 3, window_size=4))
    m = WindowAttention(24, 3, window_size=4)
    m.load_state_dict(t.state_dict())
    x = torch.randn(4, 16, 24)
    mask = torch.where(torch.rand(2, 16, 16) < 0.3, -100.0, 0.0)
    t(x, mask).square().sum().backward()
    m(x, mask).square().sum().backward()
    for (name, a), b in zip(m.named_parameters(), t.parameters()):
        assert_close(a.grad, b.grad, tol=REORDERED_FP32, what=name)


def test_state_dict_round_trip_with_timm():
    t = timm_swin.WindowAttention(48, 4, window_size=(6, 4))
    m = WindowAttention(48, 4, window_size=(6, 4))
    assert m.state_dict().keys() == t.state_dict().keys()
    m.load_state_dict(t.state_dict())
    t2 = timm_swin.WindowAttention(48, 4, window_size=(6, 4))
    t2.load_state_dict(m.state_dict())
    for k, v in t.state_dict().items():
        assert torch.equal(t2.state_dict()[k], v)
    assert {n for n, _ in m.named_buffers()} == {"relative_position_index"}
    assert torch.equal(m.relative_position_index, t.relative_position_index)


def _twin_swins(**kw):
    torch.manual_seed(2)
    kw = dict(patch_size=4, window_size=4, num_classes=5, drop_path_rate=0.0, **kw)
    orig = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **kw)
    patched = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **kw)
    patched.load_state_dict(orig.state_dict())
    return orig, patched


def _assert_same_outputs_and_grads(orig, patched, x, backend, tols):
    """``tols``: (forward, backward) tolerance of ``patched`` against ``orig``, both in float32."""
    with record_dispatch() as ran:
        out = patched(x)
        out.square().sum().backward()
    assert ran and {op for op, _, _ in ran} == {"window_attention"}
    assert {b for _, b, _ in ran} == {backend}
    ref_out = orig(x)
    assert_close(out, ref_out, tol=tols[0], what="output")
    ref_out.square().sum().backward()
    for (name, a), b in zip(patched.named_parameters(), orig.parameters()):
        assert_close(a.grad, b.grad, tol=tols[1], what=name)


def test_patch_timm_swin_model_same_outputs_and_grads():
    orig, patched = _twin_swins(img_size=(64, 96), embed_dim=24, depths=(2, 2), num_heads=(2, 4))
    assert semask_fast.patch_timm(patched, backend="reference") == 4
    assert not any(type(m) is timm_swin.WindowAttention for m in patched.modules())
    _assert_same_outputs_and_grads(orig, patched, torch.randn(2, 3, 64, 96), "reference",
                                   (REORDERED_FP32, REORDERED_FP32))


def test_patch_timm_with_the_triton_backend():
    """End to end through the Triton kernels (in the interpreter here): a small model."""
    require_backend("window_attention", "triton")
    orig, patched = _twin_swins(img_size=(32, 48), embed_dim=16, depths=(2,), num_heads=(2,))
    assert semask_fast.patch_timm(patched, backend="triton") == 2
    _assert_same_outputs_and_grads(orig, patched, torch.randn(1, 3, 32, 48), "triton",
                                   TOLERANCES[torch.float32])


def test_patch_timm_keeps_mode_and_dropout():
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4,
                              window_size=4, embed_dim=16, depths=(1,), num_heads=(2,), attn_drop_rate=0.2)
    model.eval()
    semask_fast.patch_timm(model)
    attn = [m for m in model.modules() if isinstance(m, WindowAttention)]
    assert attn and all(not m.training and m.attn_drop.p == 0.2 for m in attn)


# ---------------------------------------------------------------- SeMask
def test_semantic_attention_matches_official_and_state_dict():
    torch.manual_seed(3)
    off = OfficialSemanticAttention(16, 7).eval()
    with torch.no_grad():
        off.gamma.fill_(0.7)
    m = SemanticAttention(16, 7).eval()
    assert m.state_dict().keys() == off.state_dict().keys()
    m.load_state_dict(off.state_dict())
    x = torch.randn(5, 9, 16)
    for a, b in zip(m(x), off(x)):
        assert_close(a, b, tol=REORDERED_FP32)


def test_semantic_attention_init_is_the_official_class_init():
    m = SemanticAttention(16, 7)
    assert torch.count_nonzero(m.mlp_res.weight) == 0 and torch.count_nonzero(m.mlp_res.bias) == 0
    assert m.gamma.item() == 0.0 and m.proj_drop.p == 0.1
    assert torch.count_nonzero(m.mlp_cls_q.weight) > 0
    x = torch.randn(2, 4, 16)
    prior, out = m(x)
    assert prior.shape == (2, 4, 7) and torch.equal(out, x)  # gamma = 0: the branch starts silent


def _official_pair(dim, n_cls, gamma=0.7, backend="auto"):
    """Official layer and ours with the same non-trivial weights (mlp_res and gamma non-zero)."""
    off = OfficialSemanticAttention(dim, n_cls)
    with torch.no_grad():
        for p in off.parameters():
            p.normal_(0, 0.1)
        off.gamma.fill_(gamma)
    m = SemanticAttention(dim, n_cls, backend=backend)
    m.load_state_dict(off.state_dict())
    return off, m


@pytest.mark.parametrize("mode", ["eval", "train-p0"])
def test_semantic_attention_fused_path_fwd_bwd_matches_official(mode):
    """The fused-projection / addmm path through the Triton kernels: outputs and every gradient
    (x and all parameters, gamma included) against the official transcription."""
    require_backend("semantic_attention", "triton")
    torch.manual_seed(5)
    off, m = _official_pair(24, 7, backend="triton")
    for mod in (off, m):
        mod.train(mode != "eval")
        mod.proj_drop.p = 0.0  # dropout off in both; train-p0 takes the training branch of the module
    x = torch.randn(3, 20, 24)
    g_prior, g_out = torch.randn(3, 20, 7), torch.randn(3, 20, 24)
    xa = x.clone().requires_grad_()
    with record_dispatch() as ran:
        prior, out = m(xa)
        torch.autograd.backward([prior, out], [g_prior, g_out])
    assert ("semantic_attention", "triton", "forward") in ran and ("semantic_attention", "triton", "backward") in ran
    off.double()  # the official layer in float64 is the ground truth
    xb = x.double().requires_grad_()
    r_prior, r_out = off(xb)
    torch.autograd.backward([r_prior, r_out], [g_prior.double(), g_out.double()])
    assert_close(prior, r_prior, torch.float32, what="prior")
    assert_close(out, r_out, torch.float32, what="output")
    assert_close(xa.grad, xb.grad, torch.float32, backward=True, what="dx")
    theirs = dict(off.named_parameters())
    for name, p in m.named_parameters():
        assert_close(p.grad, theirs[name].grad, torch.float32, backward=True, what=name)


def test_semantic_attention_hands_projection_views_to_the_kernel(semantic_launches):
    """One fused projection GEMM; Sq, Sk, Yv reach the kernel launcher as views of its output (no copy),
    and the returned prior is the Sq view."""
    dim, k, n = 16, 5, 9
    m = SemanticAttention(dim, k, backend="triton").eval()
    prior, _ = m(torch.randn(2, n, dim))
    (sq, sk, yv), = semantic_launches
    row = 2 * k + dim
    assert [t.stride() for t in (sq, sk, yv)] == [(n * row, row, 1)] * 3
    assert [t.data_ptr() - sq.data_ptr() for t in (sk, yv)] == [4 * k, 8 * k]
    assert prior.data_ptr() == sq.data_ptr() and prior.stride() == sq.stride()


def test_semantic_attention_training_dropout_is_the_official_branch():
    """With dropout active the module computes gamma * Dropout(mlp_res(a)) + x as the official code."""
    off, m = _official_pair(16, 7)
    off.train(), m.train()
    x = torch.randn(2, 9, 16)
    torch.manual_seed(11)
    prior, out = m(x)
    torch.manual_seed(11)
    r_prior, r_out = off(x)
    assert_close(prior, r_prior, tol=REORDERED_FP32, what="prior")
    assert_close(out, r_out, tol=REORDERED_FP32, what="output")
    assert not torch.allclose(out, m.eval()(x)[1])  # dropout did act: the test can fail


# ---------------------------------------------------------------- SegViT ATM
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_atm_attention_matches_official(qkv_bias):
    torch.manual_seed(4)
    off = OfficialATMAttention(32, num_heads=4, qkv_bias=qkv_bias)
    m = ATMAttention(32, num_heads=4, qkv_bias=qkv_bias)
    assert m.state_dict().keys() == off.state_dict().keys()
    m.load_state_dict(off.state_dict())
    xq, xk = torch.randn(2, 5, 32, requires_grad=True), torch.randn(2, 11, 32, requires_grad=True)
    (out, logits), (ref_out, ref_logits) = m(xq, xk, xk), off(xq, xk, xk)
    assert out.shape == (5, 2, 32) and logits.shape == (2, 5, 11)
    assert_close(out, ref_out, tol=REORDERED_FP32, what="output")
    assert_close(logits, ref_logits, tol=REORDERED_FP32, what="logits")
    g = torch.autograd.grad((out.square().sum() + logits.sin().sum()), [xq, xk])
    g_ref = torch.autograd.grad((ref_out.square().sum() + ref_logits.sin().sum()), [xq, xk])
    for a, b in zip(g, g_ref):
        assert_close(a, b, tol=REORDERED_FP32)


def test_atm_defaults_are_official():
    m = ATMAttention(64)
    assert m.num_heads == 8 and m.q.bias is None and m.attn_drop.p == 0.0 and m.scale == 8 ** -0.5
