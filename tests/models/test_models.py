"""Model pieces against transcriptions of the official code."""

import pytest
import torch
import torch.nn.functional as F

from semask_fast.models import (ATMDecoderLayer, MaskTransformerHead, SemanticLayer, reinit_linears,
                                semantic_prior_logits, semask_loss)
from semask_fast.testing import REORDERED_FP32, assert_close
from tests.official import OfficialSemanticAttention


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _official_semantic_layer(layer, x, H, W, ws):
    """SWSeMaskBlock as SPEC.md describes it: LN, zero-pad, partition, blocks, reverse, crop."""
    b, _, c = x.shape
    x = layer.norm1(x).view(b, H, W, c)
    hp, wp = -(-H // ws) * ws, -(-W // ws) * ws
    x = F.pad(x, (0, 0, 0, wp - W, 0, hp - H))
    win = x.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
    prior = None
    for blk in layer.class_injection:
        off = OfficialSemanticAttention(c, blk.nc).to(x.dtype)
        off.load_state_dict(blk.state_dict())
        prior, win = off.eval()(win)

    def reverse(t):
        ch = t.shape[-1]
        t = t.view(b, hp // ws, wp // ws, ws, ws, ch).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, ch)
        return t[:, :H, :W]

    return reverse(win).reshape(b, H * W, c), reverse(prior).permute(0, 3, 1, 2)


@pytest.mark.parametrize("hw", [(14, 14), (9, 13)])
def test_semantic_layer_matches_official_order(hw):
    layer = SemanticLayer(16, 5, window_size=7, num_blocks=2, backend="reference").eval()
    reinit_linears(layer)
    with torch.no_grad():
        for blk in layer.class_injection:
            blk.gamma.fill_(0.5)
    x = torch.randn(2, hw[0] * hw[1], 16)
    out, prior = layer(x, *hw)
    exp_out, exp_prior = _official_semantic_layer(layer, x, *hw, 7)
    assert prior.shape == (2, 5, *hw)
    assert_close(out, exp_out, tol=REORDERED_FP32, what="output")
    assert_close(prior, exp_prior, tol=REORDERED_FP32, what="prior")


@pytest.mark.parametrize("ws", [7, None], ids=["windowed-padded", "global"])
def test_semantic_layer_triton_fwd_bwd_matches_official(ws):
    """The whole layer on the Triton backend (fused projection views, addmm epilogue, window copies)
    against the official order in float64: outputs, prior and the input gradient."""
    import copy

    from semask_fast import record_dispatch
    from tests.conftest import require_backend

    require_backend("semantic_attention", "triton")
    hw = (9, 13)
    layer = SemanticLayer(16, 5, window_size=ws, backend="triton").eval()
    reinit_linears(layer)
    with torch.no_grad():
        layer.class_injection[0].gamma.fill_(0.5)
        layer.class_injection[0].mlp_res.bias.normal_()
    x = torch.randn(2, hw[0] * hw[1], 16)
    g_out, g_prior = torch.randn(2, hw[0] * hw[1], 16), torch.randn(2, 5, *hw)
    xa = x.clone().requires_grad_()
    with record_dispatch() as ran:
        out, prior = layer(xa, *hw)
        torch.autograd.backward([out, prior], [g_out, g_prior])
    assert ("semantic_attention", "triton", "backward") in ran
    ref = copy.deepcopy(layer).double()
    xb = x.double().requires_grad_()
    if ws is None:  # one window per image: the official block on the whole normalised image
        off = OfficialSemanticAttention(16, 5).double()
        off.load_state_dict(ref.class_injection[0].state_dict())
        exp_prior, exp_out = off.eval()(ref.norm1(xb))
        exp_prior = exp_prior.view(2, *hw, 5).permute(0, 3, 1, 2)
    else:
        exp_out, exp_prior = _official_semantic_layer(ref, xb, *hw, ws)
    torch.autograd.backward([exp_out, exp_prior], [g_out.double(), g_prior.double()])
    assert_close(out, exp_out, torch.float32, what="output")
    assert_close(prior, exp_prior, torch.float32, what="prior")
    assert_close(xa.grad, xb.grad, torch.float32, backward=True, what="dx")


def test_global_semantic_layer_is_one_window_per_image():
    layer = SemanticLayer(8, 3, window_size=None, backend="reference").eval()
    x = torch.randn(2, 20, 8)
    out, prior = layer(x, 4, 5)
    blk = layer.class_injection[0]
    exp_prior, exp_out = blk(layer.norm1(x))
    assert_close(out, exp_out, tol=REORDERED_FP32, what="output")
    assert_close(prior, exp_prior.view(2, 4, 5, 3).permute(0, 3, 1, 2), tol=REORDERED_FP32, what="prior")


def test_fpn_reinit_rescues_the_semantic_branch():
    """The class's own init gives the branch zero gradient; the FPN model's re-init does not."""
    layer = SemanticLayer(8, 3, window_size=4, backend="reference")
    x = torch.randn(1, 16, 8)

    def grads():
        layer.zero_grad()
        out, prior = layer(x, 4, 4)
        (out.square().sum() + prior.sum()).backward()
        blk = layer.class_injection[0]
        return blk.gamma.grad.abs().item(), blk.mlp_res.weight.grad.abs().max().item()

    assert grads() == (0.0, 0.0)
    assert reinit_linears(layer) == 4
    g_gamma, _ = grads()
    assert g_gamma > 0


def test_semantic_prior_logits_and_loss():
    p0, p1, p2 = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4)
    up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)  # noqa: E731
    assert_close(semantic_prior_logits([p0, p1, p2]), p0 + up(p1) + up(up(p2)), tol=REORDERED_FP32)
    labels = torch.randint(0, 4, (2, 64, 64))
    labels[0, :3] = 255
    main = torch.randn(2, 4, 16, 16)
    big = lambda t: F.interpolate(t, size=(64, 64), mode="bilinear", align_corners=False)  # noqa: E731
    # mmseg 0.x averages over every pixel, the ignored ones counting as zero.
    ce = lambda t: F.cross_entropy(big(t), labels, ignore_index=255, reduction="sum") / labels.numel()  # noqa: E731
    assert_close(semask_loss(main, p0, labels), ce(main) + 0.4 * ce(p0), tol=REORDERED_FP32)


def test_semantic_prior_logits_odd_grids_are_resized_to_stage_0():
    """Odd token grids (17, 9, 5): x2 upsampling overshoots, the official head resizes to stage 0."""
    p0, p1, p2 = torch.randn(1, 3, 17, 17), torch.randn(1, 3, 9, 9), torch.randn(1, 3, 5, 5)
    up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)  # noqa: E731
    fit = lambda t: F.interpolate(t, size=(17, 17), mode="bilinear", align_corners=False)  # noqa: E731
    assert_close(semantic_prior_logits([p0, p1, p2]), p0 + fit(up(p1)) + fit(up(up(p2))), tol=REORDERED_FP32)


def test_ohem_keeps_the_hardest_valid_pixels_of_the_main_term():
    """mmseg's OHEMPixelSampler without threshold: weight 1 on the min_kept * B largest valid losses."""
    main, prior = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    labels = torch.randint(0, 4, (2, 8, 8))
    labels[1, :2] = 255
    pixel = F.cross_entropy(main, labels, ignore_index=255, reduction="none")
    valid = labels != 255
    threshold = pixel[valid].sort(descending=True).values[10 * 2 - 1]
    kept = (pixel >= threshold) & valid
    assert kept.sum() == 20
    expected_main = (pixel * kept).sum() / labels.numel()
    expected_prior = F.cross_entropy(prior, labels, ignore_index=255, reduction="sum") / labels.numel()
    assert_close(semask_loss(main, prior, labels, ohem_min_kept=10), expected_main + 0.4 * expected_prior,
                 tol=REORDERED_FP32)


def test_semask_loss_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        semask_loss(torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.zeros(2, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must have the batch size"):
        semask_loss(torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.zeros(3, 8, 8, dtype=torch.long))


def test_atm_decoder_layer_post_norm_and_mask_logits():
    layer = ATMDecoderLayer(32, 4, backend="reference").eval()
    tgt, mem = torch.randn(6, 2, 32), torch.randn(10, 2, 32)
    out, logits = layer(tgt, mem)
    assert out.shape == (6, 2, 32) and logits.shape == (2, 6, 10)
    t1 = layer.norm1(tgt + layer.self_attn(tgt, tgt, tgt)[0])
    attn = layer.multihead_attn
    q = attn.q(t1.transpose(0, 1)).view(2, 6, 4, 8).transpose(1, 2)
    k = attn.k(mem.transpose(0, 1)).view(2, 10, 4, 8).transpose(1, 2)
    assert_close(logits, ((q @ k.transpose(-2, -1)) * 8 ** -0.5).mean(1), tol=REORDERED_FP32)
    (out.sum() + logits.sum()).backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_mask_transformer_head_matches_transcription():
    head = MaskTransformerHead(5, d_encoder=24, d_model=32, n_layers=2, n_heads=2, backend="reference").eval()
    with torch.no_grad():
        head.mask_norm.weight.uniform_(0.5, 1.5)
        head.mask_norm.bias.normal_()
    x = torch.randn(2, 12, 24)
    masks = head(x, (3, 4))
    assert masks.shape == (2, 5, 3, 4)
    t = torch.cat((head.proj_dec(x), head.cls_emb.expand(2, -1, -1)), 1)
    for blk in head.blocks:
        t = blk(t)
    t = head.decoder_norm(t)
    p, c = t[:, :12] @ head.proj_patch, t[:, 12:] @ head.proj_classes
    p, c = p / p.norm(dim=-1, keepdim=True), c / c.norm(dim=-1, keepdim=True)
    expected = head.mask_norm(p @ c.transpose(1, 2)).transpose(1, 2).reshape(2, 5, 3, 4)
    assert_close(masks, expected, tol=REORDERED_FP32)
