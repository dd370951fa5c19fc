"""Segmenter by name against a transcription of rstrudel/segmenter (segm/model/{vit,blocks,decoder,segmenter}.py)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semask_fast.models import create
from semask_fast.testing import EXACT, assert_close
from tests.models._fast_vs_reference import assert_cpu_backend_matches_reference

TINY = dict(image_size=32, d_model=64, n_layers=2, n_heads=2)
K = 5


# --------------------------------------------------------------------------- #
# Transcription of the official modules: names, shapes and forward
# --------------------------------------------------------------------------- #
class OfficialFeedForward(nn.Module):
    def __init__(self, dim, hidden_dim, dropout):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class OfficialAttention(nn.Module):
    def __init__(self, dim, heads, dropout):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.attn_drop = nn.Linear(dim, dim * 3), nn.Dropout(dropout)
        self.proj, self.proj_drop = nn.Linear(dim, dim), nn.Dropout(dropout)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(B, N, C)))


class OfficialBlock(nn.Module):
    def __init__(self, dim, heads, mlp_dim, dropout):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn, self.mlp = OfficialAttention(dim, heads, dropout), OfficialFeedForward(dim, mlp_dim, dropout)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class OfficialPatchEmbedding(nn.Module):
    def __init__(self, image_size, patch_size, embed_dim):
        super().__init__()
        self.grid_size = image_size[0] // patch_size, image_size[1] // patch_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)


class OfficialViT(nn.Module):
    def __init__(self, image_size, patch_size, n_layers, d_model, n_heads, dropout=0.0):
        super().__init__()
        self.patch_embed = OfficialPatchEmbedding(image_size, patch_size, d_model)
        self.patch_size = patch_size
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, d_model))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, math.prod(self.patch_embed.grid_size) + 1, d_model))
        self.blocks = nn.ModuleList(OfficialBlock(d_model, n_heads, 4 * d_model, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 1000)
        self.dropout = nn.Dropout(dropout)

    def forward(self, im):
        B, _, H, W = im.shape
        x = self.patch_embed.proj(im).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        pos_embed = self.pos_embed
        if x.shape[1] != pos_embed.shape[1]:  # segm.model.utils.resize_pos_embed
            tok, grid = pos_embed[:, :1], pos_embed[0, 1:]
            grid = grid.reshape(1, *self.patch_embed.grid_size, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(H // self.patch_size, W // self.patch_size), mode="bilinear")
            pos_embed = torch.cat([tok, grid.permute(0, 2, 3, 1).reshape(1, -1, grid.shape[1])], dim=1)
        x = self.dropout(x + pos_embed)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class OfficialMaskTransformer(nn.Module):
    def __init__(self, n_cls, patch_size, d_model, n_layers, dropout=0.1):
        super().__init__()
        self.patch_size, self.n_cls = patch_size, n_cls
        self.blocks = nn.ModuleList(OfficialBlock(d_model, d_model // 64, 4 * d_model, dropout)
                                    for _ in range(n_layers))
        self.cls_emb = nn.Parameter(torch.randn(1, n_cls, d_model))
        self.proj_dec = nn.Linear(d_model, d_model)
        self.proj_patch = nn.Parameter(d_model ** -0.5 * torch.randn(d_model, d_model))
        self.proj_classes = nn.Parameter(d_model ** -0.5 * torch.randn(d_model, d_model))
        self.decoder_norm, self.mask_norm = nn.LayerNorm(d_model), nn.LayerNorm(n_cls)

    def forward(self, x, im_size):
        GS = im_size[0] // self.patch_size
        x = torch.cat((self.proj_dec(x), self.cls_emb.expand(x.size(0), -1, -1)), 1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        patches, cls_seg_feat = x[:, :-self.n_cls] @ self.proj_patch, x[:, -self.n_cls:] @ self.proj_classes
        patches = patches / patches.norm(dim=-1, keepdim=True)
        cls_seg_feat = cls_seg_feat / cls_seg_feat.norm(dim=-1, keepdim=True)
        masks = self.mask_norm(patches @ cls_seg_feat.transpose(1, 2))
        return masks.transpose(1, 2).reshape(x.shape[0], self.n_cls, GS, -1)


class OfficialSegmenter(nn.Module):
    def __init__(self, n_cls, image_size, d_model, n_layers, n_heads, patch_size=16):
        super().__init__()
        self.patch_size = patch_size
        self.encoder = OfficialViT((image_size, image_size), patch_size, n_layers, d_model, n_heads)
        self.decoder = OfficialMaskTransformer(n_cls, patch_size, d_model, 2)

    def forward(self, im):
        H_ori, W_ori = im.shape[2:]
        ps = self.patch_size
        im = F.pad(im, (0, -W_ori % ps, 0, -H_ori % ps))  # segm.model.utils.padding
        H, W = im.shape[2:]
        masks = self.decoder(self.encoder(im)[:, 1:], (H, W))
        return F.interpolate(masks, size=(H, W), mode="bilinear")[:, :, :H_ori, :W_ori]  # unpadding


def _official(seed=0):
    torch.manual_seed(seed)
    off = OfficialSegmenter(K, **TINY).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a swapped parameter shows
        for name, p in off.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return off


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_official_checkpoint_loads_strictly_and_matches_the_official_forward_and_loss():
    off = _official().double()
    model = create("segmenter_vit_small", num_classes=K, backend="reference", **TINY).double().eval()
    result = model.load_official_state_dict({"model": off.state_dict(), "optimizer": {}, "epoch": 3})
    assert result.missing_keys == [] and result.unexpected_keys == []
    images = torch.randn(2, 3, 40, 56, dtype=torch.float64)  # 40x56 needs padding to 48x64
    labels = torch.randint(0, K, (2, 40, 56))
    labels[0, :5] = 255
    expected = off(images)
    logits = model(images)["logits"]
    assert logits.shape == (2, K, 40, 56)
    assert_close(logits, expected, torch.float64, what="logits")
    assert_close(model.loss(images, labels), F.cross_entropy(expected, labels, ignore_index=255), torch.float64,
                 what="loss")


def test_every_trainable_parameter_gets_a_gradient():
    model = create("segmenter_vit_small", num_classes=K, backend="reference", **TINY)
    model.loss(torch.randn(1, 3, 40, 56), torch.randint(0, K, (1, 40, 56))).backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n in trainable if model.get_parameter(n).grad is None] == []
    assert not model.encoder.head.weight.requires_grad  # the unused classifier, kept for the layout


def test_official_loading_reports_missing_and_unexpected_keys():
    sd = _official().state_dict()
    sd.pop("decoder.mask_norm.bias")
    sd["decoder.extra"] = torch.zeros(1)
    model = create("segmenter_vit_small", num_classes=K, **TINY)
    with pytest.raises(RuntimeError, match="decoder.mask_norm.bias"):
        model.load_official_state_dict(sd)
    result = model.load_official_state_dict(sd, strict=False)
    assert result.missing_keys == ["decoder.mask_norm.bias"] and result.unexpected_keys == ["decoder.extra"]
    sd = _official().state_dict()
    sd["encoder.pos_embed"] = torch.zeros(1, 17, 64)
    with pytest.raises(RuntimeError, match="encoder.pos_embed.*shape"):
        model.load_official_state_dict(sd)


def test_aliases_and_checkpoint_file(tmp_path):
    path = tmp_path / "checkpoint.pth"
    off = _official()
    torch.save({"model": off.state_dict(), "n_cls": K}, path)
    model = create("segmenter_vit_small", num_classes=K, checkpoint=str(path), **TINY)
    assert model.backbone is model.encoder and model.decode_head is model.decoder
    assert_close(model.encoder.pos_embed, off.encoder.pos_embed, tol=EXACT)


@pytest.mark.parametrize("name, official", [
    ("segmenter_vit_small", dict(image_size=512, d_model=384, n_layers=12, n_heads=6)),
    ("segmenter_vit_base", dict(image_size=512, d_model=768, n_layers=12, n_heads=12)),
    ("segmenter_vit_large", dict(image_size=640, d_model=1024, n_layers=24, n_heads=16)),
])
def test_named_configs_have_the_official_parameters(name, official):
    """The full-size configs on the meta device (nothing allocated or run): same names and shapes."""
    with torch.device("meta"):
        model = create(name)
        off = OfficialSegmenter(150, **official)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in off.state_dict().items()}
    assert model.decoder.blocks[0].attn.num_heads == official["d_model"] // 64
    if name == "segmenter_vit_large":  # the README's "334M" for Seg-L-Mask/16
        assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 334


def _build(backend, state=None):
    model = create("segmenter_vit_small", num_classes=K, backend=backend, **TINY).eval()
    if state is None:
        model.load_official_state_dict(_official().state_dict())
    else:
        model.load_state_dict(state)
    return model


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_cpu_backend_matches_reference_losses_and_gradients(autocast):
    from tests.conftest import require_backend

    require_backend("mask_similarity", "cpu")
    images, labels = torch.randn(2, 3, 40, 56), torch.randint(0, K, (2, 40, 56))
    labels[1, 10:] = 255
    assert_cpu_backend_matches_reference(_build, "mask_similarity", images, labels, autocast)
